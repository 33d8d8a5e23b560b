"""SIGTERM (preemption, `scancel`, a job timeout) → a checkpoint before the process exits.

Lightning turns SIGTERM into a `SIGTERMException` at the end of the current training batch (or inside
validation) and then calls every callback's `on_exception`; this callback writes `<checkpoint dir>/last.ckpt`
there, so `--ckpt_path <dir>/last.ckpt` resumes from the last finished step. The write is atomic (the
Trainer's `SafeCheckpointIO`), so a SIGKILL that follows the SIGTERM mid-save leaves the previous file whole.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class CheckpointOnSigterm(L.Callback):
    """Save `last.ckpt` (beside the ModelCheckpoint's files, or under `dirpath`) when SIGTERM stops a fit.

    Args:
        dirpath: folder of the checkpoint; None = the ModelCheckpoint callback's folder.
        filename: file name of the checkpoint.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt"):
        self.dirpath, self.filename = dirpath, filename

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        folder = self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None)
        if folder is None:
            raise ValueError("CheckpointOnSigterm: no dirpath given and no ModelCheckpoint to take it from")
        path = Path(folder) / self.filename
        trainer.save_checkpoint(path)
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path {path}")
