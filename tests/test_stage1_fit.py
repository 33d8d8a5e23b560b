"""End to end: the real CLI fits a debug recipe, logs CIDEr and samples to TensorBoard, resumes from `last.ckpt`;
and a short training run in which the stage-1 loss falls clearly.
The default suite fits the mean-pool recipe; the C-Former one runs under
`.venv/bin/python -m pytest -q -m slow tests/test_stage1_fit.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from emu_lightning.cli import cli_main
from tests.helpers import tiny_datamodule, tiny_stage1

ROOT = Path(__file__).resolve().parents[1]


def _overlay(tmp_path: Path, max_steps: int) -> str:
    small = lambda split: {"class_path": "emu_lightning.data.synthetic.scenes.SyntheticCaptions",  # noqa: E731
                           "init_args": {"split": split, "size": 4, "image_size": 64}}
    cfg = {
        "trainer": {"max_steps": max_steps, "val_check_interval": 2, "limit_val_batches": 1,
                    "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "smoke", "version": 0}}},
        "model": {"init_args": {"max_new_tokens": 4, "num_beams": 2}},
        "data": {"init_args": {"val": {"val": small("val"), "heldout": small("heldout")},
                               "test": {"test": small("test"), "heldout": small("heldout")}, "batch_size": 4,
                               "eval_batch_size": 4, "num_workers": 0}},
    }
    path = tmp_path / f"overlay_{max_steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("recipe", [pytest.param("stage1_cformer", marks=pytest.mark.slow), "stage1_meanpool"])
def test_cli_fit_logs_and_resumes(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = str(ROOT / "recipes" / "debug" / f"{recipe}.yaml")
    cli = cli_main(["fit", "--config", base, "--config", _overlay(tmp_path, 2)])
    assert cli.trainer.global_step == 2
    logdir = tmp_path / "runs" / "smoke" / "version_0"
    last = logdir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    from emu_lightning.data.layout.tokenizer import load_tokenizer

    assert load_tokenizer(str(logdir / "tokenizer")).get_vocab() == cli.model.tokenizer.get_vocab()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0, "images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ["train/loss", "val/cider_greedy", "val/cider_beam", "heldout/cider_greedy",
                "val/shape_acc_greedy", "heldout/color_acc_greedy"]:
        assert tag in scalars, (tag, sorted(scalars))
    assert "val/samples" in events.Tags()["images"]
    assert any("val/captions" in t for t in events.Tags()["tensors"])  # add_text lands as a tensor summary
    # Throughput (log_every_n_steps 1): positive rates, a wait fraction in [0, 1).
    for tag in ["throughput/samples_per_sec", "throughput/tokens_per_sec", "lr-AdamW/llm"]:
        assert tag in scalars, (tag, sorted(scalars))
    assert all(e.value > 0 for e in events.Scalars("throughput/samples_per_sec"))
    assert all(0 <= e.value < 1 for e in events.Scalars("throughput/data_wait_frac"))
    # The resolved config: YAML text, and its scalar leaves in the HPARAMS tab (the adapter named by class).
    assert any(t.startswith("config") for t in events.Tags()["tensors"])
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    adapter = "CFormer" if recipe == "stage1_cformer" else "MeanPoolProjector"
    assert hp["model.init_args.adapter.class_path"].string_value.endswith(adapter)
    assert hp["trainer.max_steps"].number_value == 2
    assert "hp_metric" not in scalars          # the model's own hparams are not logged a second time

    resumed = cli_main(["fit", "--config", base, "--config", _overlay(tmp_path, 4), "--ckpt_path", str(last)])
    assert resumed.trainer.global_step == 4

    cli_main(["predict", "--config", base, "--config", _overlay(tmp_path, 4), "--ckpt_path", str(last)])
    rows = [json.loads(line) for line in (tmp_path / "runs/smoke/version_0/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["set"] for r in rows} == {"test", "heldout"}
    assert all(isinstance(r["caption"], str) and r["id"].startswith("synth-") for r in rows)


def test_stage1_loss_falls(tmp_path, monkeypatch):
    """100 steps on 64 fixed scenes (≈ 12 epochs): the caption CE must fall to under half its start.

    At this size the fall is the caption language being learnt; that the model reads the images is
    measured by the learning benchmark (attribute accuracy), which takes minutes, not seconds."""
    monkeypatch.chdir(tmp_path)
    L.seed_everything(0)
    system = tiny_stage1(lr=2e-3, warmup=0.0)
    dm = tiny_datamodule(system, train_size=64, batch_size=8)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(max_steps=100, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, callbacks=[Record()], enable_model_summary=False)
    trainer.fit(system, datamodule=dm)
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert end < 0.5 * start, (start, end)
    assert torch.isfinite(torch.tensor(losses)).all()
    assert list(tmp_path.iterdir()) == []  # logger=False: nothing (e.g. the tokenizer) lands in the working dir


def test_cli_fit_on_real_format_data(tmp_path, monkeypatch):
    """Tar shards (LAION-style) for training and a COCO-captions set for validation, through the same CLI."""
    from tests.helpers import write_tar
    from tests.test_real_data import _good, _write_coco

    monkeypatch.chdir(tmp_path)
    shards = [write_tar(tmp_path / f"shard-{i:03d}.tar", [_good(f"s{i}_{k}") for k in range(8)]) for i in range(2)]
    coco = _write_coco(tmp_path)
    cfg = yaml.safe_load(Path(_overlay(tmp_path, 2)).read_text())
    cfg["data"]["init_args"] = {
        "train": {"class_path": "emu_lightning.data.real.captions.WebDatasetPairs",
                  "init_args": {"urls": str(tmp_path / "shard-{000..001}.tar")}},
        "val": {"coco": {"class_path": "emu_lightning.data.real.captions.CocoCaptions",
                         "init_args": {"annotations": str(coco), "image_dir": str(tmp_path / "img")}}},
        "batch_size": 4, "eval_batch_size": 4, "num_workers": 0}
    overlay = tmp_path / "real.yaml"
    overlay.write_text(yaml.safe_dump(cfg))
    cli = cli_main(["fit", "--config", str(ROOT / "recipes/debug/stage1_meanpool.yaml"), "--config", str(overlay)])
    assert cli.trainer.global_step == 2 and len(shards) == 2
    metrics = cli.trainer.callback_metrics
    assert "coco/cider_greedy" in metrics and "coco/text_loss" in metrics
    assert not any(k.startswith("coco/") and "_acc_" in k for k in metrics)  # no scenes, no attribute accuracy
