"""Single-purpose callbacks: the throughput arithmetic on a controlled clock, the config flattening that
feeds TensorBoard's HPARAMS tab (both also run inside the real CLI fit in test_stage1_fit.py), and `last.ckpt`
at every validation."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

import callbacks.throughput as throughput
from callbacks.checkpoint import LastCheckpoint
from callbacks.hparams import flatten_config
from callbacks.throughput import Throughput, batch_counts


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Module:
    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log_dict(self, metrics: dict, **kwargs) -> None:
        self.logged.append(metrics)


def test_throughput_rates_and_data_wait_on_a_known_clock(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    trainer, module = SimpleNamespace(world_size=2, log_every_n_steps=2), _Module()
    cb = Throughput()
    batch = {"input_ids": torch.zeros(4, 10, dtype=torch.long),
             "attention_mask": torch.tensor([[1] * 10, [1] * 5 + [0] * 5, [1] * 10, [0] * 10])}
    cb.on_train_epoch_start(trainer, module)
    for wait, busy in [(0.5, 3.0), (1.0, 3.0)]:       # the first batch's wait is before any batch: not counted
        clock.now += wait
        cb.on_train_batch_start(trainer, module, batch, 0)
        clock.now += busy
        cb.on_train_batch_end(trainer, module, None, batch, 0)
    assert len(module.logged) == 1
    m = module.logged[0]
    elapsed = 3.0 + 1.0 + 3.0                          # busy + wait + busy
    assert m["throughput/samples_per_sec"] == pytest.approx(2 * 8 / elapsed)
    assert m["throughput/tokens_per_sec"] == pytest.approx(2 * 2 * 25 / elapsed)
    assert m["throughput/data_wait_frac"] == pytest.approx(1.0 / elapsed)


def test_throughput_ignores_the_gap_across_validation(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    trainer, module = SimpleNamespace(world_size=1, log_every_n_steps=2), _Module()
    cb, batch = Throughput(), {"pixel_values": torch.zeros(3, 3, 8, 8)}
    cb.on_train_batch_start(trainer, module, batch, 0)
    clock.now += 1.0
    cb.on_train_batch_end(trainer, module, None, batch, 0)
    clock.now += 50.0                                  # a validation run
    cb.on_validation_end(trainer, module)
    cb.on_train_batch_start(trainer, module, batch, 1)
    clock.now += 1.0
    cb.on_train_batch_end(trainer, module, None, batch, 1)
    m = module.logged[0]
    assert m["throughput/data_wait_frac"] == 0.0 and m["throughput/samples_per_sec"] == pytest.approx(3.0)
    assert "throughput/tokens_per_sec" not in m        # no attention mask: no token count


def test_batch_counts_needs_a_dict():
    assert batch_counts({"input_ids": torch.zeros(5, 2)}) == (5, None)
    with pytest.raises(TypeError, match="dict batch"):
        batch_counts([torch.zeros(2)])
    # A packed row's mask numbers its documents (0 = padding): tokens are the non-zero entries, not the sum.
    packed = {"input_ids": torch.zeros(1, 6, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 2, 2, 3, 0]])}
    assert int(batch_counts(packed)[1]) == 5
    # Its samples are the documents the collator packed (`num_documents`), not its rows.
    assert batch_counts({**packed, "num_documents": torch.tensor(3)}) == (3, 5)


def test_flatten_config_gives_tensorboard_scalars():
    flat = flatten_config({"model": {"init_args": {"lr": 1e-3, "trainable": ["adapter", "llm"], "x": None,
                                                   "adapter": {"class_path": "a.B"}}}, "seed_everything": 0})
    assert flat == {"model.init_args.lr": 1e-3, "model.init_args.trainable": "[adapter, llm]",
                    "model.init_args.x": "None", "model.init_args.adapter.class_path": "a.B", "seed_everything": 0}


class _LastSeen(L.Callback):
    """The step stored in last.ckpt (or None) at the first batch after each validation (Lightning runs checkpoint
    callbacks after all others, so on_validation_end here would be too early)."""

    def __init__(self, path) -> None:
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 or trainer.global_step % 2:
            return
        stored = torch.load(self.path, weights_only=False)["global_step"] if self.path.exists() else None
        self.seen.append((trainer.global_step, stored))


def _fit_with(checkpoint: ModelCheckpoint, tmp_path) -> list:
    seen = _LastSeen(tmp_path / "last.ckpt")
    trainer = L.Trainer(max_steps=6, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[checkpoint, seen], default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    return seen.seen


def test_last_checkpoint_follows_every_validation_with_save_top_k_0(tmp_path):
    seen = _fit_with(LastCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0), tmp_path)
    assert seen == [(2, 2), (4, 4)]
    assert list(tmp_path.glob("*.ckpt")) == [tmp_path / "last.ckpt"]      # no top-k files


def test_plain_model_checkpoint_with_save_top_k_0_writes_no_last_mid_run(tmp_path):
    """The control, and the reason LastCheckpoint exists: Lightning's own callback leaves no checkpoint until the
    fit ends. If a Lightning upgrade fixes this, this test says so and LastCheckpoint can go."""
    seen = _fit_with(ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0), tmp_path)
    assert seen == [(2, None), (4, None)]
    assert (tmp_path / "last.ckpt").exists()                               # written at the end of the fit


@pytest.mark.parametrize("name", ["callbacks.yaml", "callbacks_decoder.yaml"])
def test_shared_callbacks_use_last_checkpoint(name):
    from tests.resume_helpers import ROOT
    entries = yaml.safe_load((ROOT / "recipes" / "_base" / name).read_text())
    paths = [e["class_path"] for e in entries]
    assert "callbacks.checkpoint.LastCheckpoint" in paths and "lightning.pytorch.callbacks.ModelCheckpoint" not in paths


def test_fast_dev_run_leaves_no_checkpoint(tmp_path, monkeypatch, one_thread):
    """Lightning's smoke test through the CLI writes no checkpoint, in the working directory or anywhere."""
    from emu_lightning.cli import cli_main

    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "debug" / "stage1_meanpool.yaml"
    cli = cli_main(["fit", "--config", str(recipe), "--trainer.fast_dev_run", "true",
                    "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
                    "--data.init_args.eval_batch_size", "4", "--model.init_args.max_new_tokens", "2"])
    assert cli.trainer.global_step == 1
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
