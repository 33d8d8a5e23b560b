"""Training throughput to TensorBoard every `log_every_n_steps` batches: `throughput/samples_per_sec` (documents:
a packed batch's `num_documents`, not its rows), `throughput/tokens_per_sec` (non-padding tokens, where the batch has an `attention_mask`) and
`throughput/data_wait_frac`, the share of wall time spent between one batch's end and the next one's start
(waiting for the dataloader, plus loop work outside the step). A fraction near 0 means the model, not the data
pipeline, sets the pace. Rates are per process × world size (ranks run in lockstep)."""
from __future__ import annotations

import time

import lightning as L
import torch


def batch_counts(batch) -> tuple[int, int | None]:
    """(samples, non-padding tokens or None) of a batch dict; a packed batch's samples are its documents."""
    samples, tokens = _counts(batch)
    return int(samples), (int(tokens) if tokens is not None else None)


def _counts(batch) -> tuple[int | torch.Tensor, torch.Tensor | None]:
    # The token count stays a tensor on the batch's device: summed over the window and read once at its end,
    # not synchronised with the device at every step.
    if not isinstance(batch, dict):
        raise TypeError(f"Throughput expects a dict batch; got {type(batch).__name__}")
    lead = _lead(batch)
    mask = batch.get("attention_mask")
    docs = batch.get("num_documents")          # packed rows (data/layout/packing.py): count documents, not rows
    samples = docs if isinstance(docs, torch.Tensor) else int(lead.shape[0])
    return samples, ((mask > 0).sum() if isinstance(mask, torch.Tensor) else None)


def _lead(batch: dict) -> torch.Tensor:
    """The tensor whose first dimension is the batch's rows: `input_ids`, `pixel_values`, or the first tensor."""
    lead = batch.get("input_ids", batch.get("pixel_values"))
    return lead if lead is not None else next(v for v in batch.values() if isinstance(v, torch.Tensor))


class Throughput(L.Callback):
    """Measures the training loop's samples/s, tokens/s and data-wait fraction over windows of batches.

    Args:
        window: batches per measurement (None: the trainer's `log_every_n_steps`).
    """

    def __init__(self, window: int | None = None) -> None:
        self.window = window
        self._reset()
        self._last_end: float | None = None

    def _reset(self) -> None:
        self._batches, self._samples, self._tokens, self._wait, self._busy = 0, 0, 0, 0.0, 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None        # the gap across an epoch boundary or a validation run is not data wait

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._wait += now - self._last_end
        self._start = now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        self._busy += now - self._start
        self._last_end = now
        samples, tokens = _counts(batch)
        self._batches += 1
        self._samples += samples
        if tokens is not None:
            self._tokens = self._tokens + tokens
        if self._batches < (self.window or trainer.log_every_n_steps):
            return
        world, elapsed = trainer.world_size, self._busy + self._wait
        metrics = {"throughput/samples_per_sec": world * float(self._samples) / elapsed,
                   "throughput/data_wait_frac": self._wait / elapsed}
        if tokens is not None:
            metrics["throughput/tokens_per_sec"] = world * int(self._tokens) / elapsed
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=int(_lead(batch).shape[0]))
        self._reset()
