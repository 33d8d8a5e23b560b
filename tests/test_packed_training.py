"""Packing as a stage-2 datamodule option (`pack_length`): each step's documents packed into rows, the same
documents as unpacked, the same losses step after step, and the run counted in documents and tokens."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.helpers import tiny_stage2, tiny_stage2_datamodule


def batches(pack_length: int | None, steps: int) -> tuple[list[dict], object]:
    torch.manual_seed(0)
    system = tiny_stage2("meanpool", warmup=0.0)
    dm = tiny_stage2_datamodule(system, batch_size=6, num_workers=0, max_length=96, pack_length=pack_length)
    loader = iter(dm.train_dataloader())
    out = []
    for _ in range(steps):
        batch = next(loader)
        batch.pop("stream_state")
        out.append(batch)
    return out, system


def test_packed_steps_hold_the_same_documents_in_fewer_rows():
    (plain,), _ = batches(None, 1)
    (packed,), _ = batches(192, 1)
    assert int(packed["num_documents"]) == len(plain["ids"]) == 6                 # the step's documents, all of them
    assert sorted(sum(packed["ids"], [])) == sorted(plain["ids"])
    assert len(packed["input_ids"]) < 6 and packed["input_ids"].shape[1] <= 192
    tokens = lambda b: int((b["attention_mask"] > 0).sum())                       # noqa: E731
    assert tokens(packed) == tokens(plain)


def test_pack_length_shorter_than_max_length_is_refused():
    system = tiny_stage2("meanpool")
    with pytest.raises(ValueError, match="pack_length=64 is shorter than max_length=96"):
        tiny_stage2_datamodule(system, max_length=96, pack_length=64)


@pytest.mark.slow
def test_packed_training_follows_the_unpacked_losses():
    """Two AdamW steps on the same documents, packed and not: the same loss at every step (equal tokens seen).
    Slow (~6 s on a busy core); the losses of one batch packed and not are compared in the default suite
    (tests/test_packing.py)."""
    curves = []
    for pack in (None, 192):
        steps, system = batches(pack, 2)
        optimizer = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=1e-3)
        curve = []
        for batch in steps:
            loss = system.loss_terms(batch)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(float(loss))
        curves.append(curve)
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)
    assert curves[0][-1] < curves[0][0]


def test_fit_counts_documents_and_tokens():
    torch.manual_seed(0)
    system = tiny_stage2("meanpool", warmup=0.0)
    dm = tiny_stage2_datamodule(system, batch_size=6, num_workers=0, max_length=96, pack_length=192)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(system, datamodule=dm)
    assert system.counters["documents"] == 12 and system.counters["tokens"] > 12
    metrics = trainer.callback_metrics
    assert (metrics["train/documents_total"], metrics["train/tokens_total"]) == (12, system.counters["tokens"])
