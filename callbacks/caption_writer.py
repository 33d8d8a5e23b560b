"""`main.py predict`: writes each predicted caption as a JSON line `{"id", "caption"}` to
`<log_dir>/predictions.jsonl` (or `path`), one file per rank."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class CaptionWriter(BasePredictionWriter):
    """Args:
        path: output file; None = `predictions.jsonl` in the trainer's log dir (rank suffix when distributed).
    """

    def __init__(self, path: str | None = None):
        super().__init__(write_interval="batch")
        self.path = path
        self._file: Any = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.path or Path(trainer.log_dir or ".") / "predictions.jsonl")
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        names = getattr(trainer.datamodule, "test_names", None) or []
        split = names[dataloader_idx] if dataloader_idx < len(names) else dataloader_idx
        for row in prediction:
            self._file.write(json.dumps({**row, "set": split}) + "\n")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._file.close()
