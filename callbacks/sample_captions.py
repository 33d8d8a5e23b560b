"""After each evaluation epoch: the generated and reference captions of the first samples of each evaluation
set as a markdown table in TensorBoard's TEXT tab (`<set>/captions`), in the order of `SampleImages`' grid."""
from __future__ import annotations

import lightning as L


class SampleCaptions(L.Callback):
    """Logs the captions of `pl_module.eval_samples` (set → [(image, generated, reference)]) as text."""

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for logger in trainer.loggers:
            exp = logger.experiment
            if not hasattr(exp, "add_text"):
                continue
            for name, samples in getattr(pl_module, "eval_samples", {}).items():
                if samples:
                    table = ["| # | generated | reference |", "|---|---|---|"]
                    table += [f"| {i} | {gen} | {ref} |" for i, (_, gen, ref) in enumerate(samples)]
                    exp.add_text(f"{name}/captions", "\n".join(table), trainer.global_step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)
