"""`ModelCheckpoint` whose `last.ckpt` follows every validation, also with `save_top_k: 0`.

Lightning 2.6 refreshes `last.ckpt` at a validation only when a top-k file was written at the same step. With
`save_top_k: 0` (our recipes keep no top-k files: there is no monitor worth ranking on synthetic data) the only
`last.ckpt` of a run was the one written when it ended, so a SIGKILL or a crashed node lost the whole run.
Here every validation also writes `last.ckpt` (atomically, through the Trainer's `SafeCheckpointIO`).
"""
from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (same arguments) that writes `last.ckpt` at the end of every validation of a fit."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # The parent skips sanity checks, non-fit stages and a step already saved; so do we.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A smoke run (`--trainer.fast_dev_run true`) writes nothing. Lightning 2.6 skips every other save under
        # fast_dev_run but not this one, and with the logger off the file lands in `./checkpoints/`.
        if trainer.fast_dev_run:
            return
        super().on_train_end(trainer, pl_module)
