"""After each evaluation epoch: the first images of each evaluation set, with their generated and reference
captions, to TensorBoard (images as a grid, captions as a markdown table)."""
from __future__ import annotations

import lightning as L
import torch
from torchvision.utils import make_grid

from emu_lightning.data.datamodule import denormalize


class SampleLog(L.Callback):
    """Logs `pl_module.eval_samples` (set → [(image, generated, reference)]) to TensorBoard."""

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for logger in trainer.loggers:
            exp = logger.experiment
            if not hasattr(exp, "add_text"):
                continue
            for name, samples in getattr(pl_module, "eval_samples", {}).items():
                if not samples:
                    continue
                images = denormalize(torch.stack([s[0] for s in samples]).float())
                exp.add_image(f"{name}/samples", make_grid(images, nrow=len(samples)), trainer.global_step)
                table = ["| # | generated | reference |", "|---|---|---|"]
                table += [f"| {i} | {gen} | {ref} |" for i, (_, gen, ref) in enumerate(samples)]
                exp.add_text(f"{name}/captions", "\n".join(table), trainer.global_step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)
