"""After each evaluation epoch: the first images of each evaluation set as one grid in TensorBoard
(`<set>/samples`), so a run's inputs can be checked by eye beside its metrics."""
from __future__ import annotations

import lightning as L
import torch
from torchvision.utils import make_grid

from emu_lightning.data.modules.captions import denormalize


class SampleImages(L.Callback):
    """Logs the images of `pl_module.eval_samples` (set → [(image, generated, reference)]) as a grid."""

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for logger in trainer.loggers:
            exp = logger.experiment
            if not hasattr(exp, "add_image"):
                continue
            for name, samples in getattr(pl_module, "eval_samples", {}).items():
                if samples:
                    images = denormalize(torch.stack([s[0] for s in samples]).float())   # (n,3,H,W) in [0,1]
                    exp.add_image(f"{name}/samples", make_grid(images, nrow=len(samples)), trainer.global_step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)
