"""After each evaluation epoch: `pl_module.eval_images` (set → rows of (n,3,H,W) images in [0,1], e.g.
input | reconstruction | generation) to TensorBoard as one grid per set, a row per kind."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid


class ImageGridLog(L.Callback):
    """Logs the system's evaluation image rows as `<set>/images`."""

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, rows in getattr(pl_module, "eval_images", {}).items():
            if not rows:
                continue
            side = max(r.shape[-1] for r in rows)   # rows may differ in resolution (input 64 px, output 32 px)
            n = min(len(r) for r in rows)
            images = torch.cat([F.interpolate(r[:n].float(), size=(side, side), mode="nearest") for r in rows])
            grid = make_grid(images.clamp(0, 1), nrow=n, padding=1)
            for logger in trainer.loggers:
                if hasattr(logger.experiment, "add_image"):
                    logger.experiment.add_image(f"{name}/images", grid, trainer.global_step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)
