"""End to end: the real CLI fits each debug stage-2 recipe from a stage-1 checkpoint (hand-off), logs per-source
losses and every few-shot / regression metric to TensorBoard, and a `test` run scores the same sets.
The default suite fits the mean-pool recipe; the C-Former one runs under
`.venv/bin/python -m pytest -q -m slow tests/test_stage2_fit.py`.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from emu_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


def _overlay(tmp_path: Path) -> str:
    small = lambda cls, split, n: {"class_path": f"emu_lightning.data.synthetic.scenes.{cls}",  # noqa: E731
                                   "init_args": {"split": split, "size": n, "image_size": 64}}
    # 2 queries per set, 3 candidates per demo pool (2-shot RICES picks 2 of them)
    evals = {"captions": small("SyntheticCaptions", "val", 2), "vqa": small("SyntheticVQA", "val", 2),
             "videos": small("SyntheticVideos", "val", 2)}
    pools = {"captions": small("SyntheticCaptions", "train", 3), "vqa": small("SyntheticVQA", "train", 3),
             "videos": small("SyntheticVideos", "train", 3)}
    cfg = {
        "trainer": {"max_steps": 2, "val_check_interval": 2, "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "s2", "version": 0}}},
        "model": {"init_args": {"max_new_tokens": 3, "answer_max_new_tokens": 2, "shots": [0, 2],
                                "video_shots": [0, 2]}},
        "data": {"init_args": {"val": evals, "test": evals, "demos": pools, "batch_size": 6, "eval_batch_size": 2,
                               "num_workers": 0, "num_frames": 2, "max_length": 96}},
    }
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("adapter", ["meanpool", pytest.param("cformer", marks=pytest.mark.slow)])
def test_cli_fit_from_stage1_logs_per_source_and_few_shot_metrics(adapter, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tests.helpers import debug_system

    stage1 = debug_system(f"stage1_{adapter}")   # the stage-1 debug recipe's system, built without a CLI parse
    torch.save({"state_dict": stage1.state_dict()}, tmp_path / "stage1.ckpt")
    base = str(ROOT / "recipes" / "debug" / f"stage2_{adapter}.yaml")
    cli = cli_main(["fit", "--config", base, "--config", _overlay(tmp_path),
                    "--model.init_args.init_from", str(tmp_path / "stage1.ckpt")])
    assert cli.trainer.global_step == 2 and set(cli.model.handoff_report.loaded) == {"encoder", "adapter", "llm"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "runs" / "s2" / "version_0"
    scalars = set(EventAccumulator(str(logdir), size_guidance={"scalars": 0}).Reload().Tags()["scalars"])
    expected = ["train/loss", "train/text_loss", "train/regression_loss", "train/regression_cos",
                "train/truncated_total", "train/skipped_total"]
    expected += [f"train/{s}/{t}" for s in ("pairs", "documents", "videos", "storyboards")
                 for t in ("text_loss", "regression_loss")]
    expected += [f"captions/cider_{k}" for k in ("k0", "k2_random", "k2_rices")]
    expected += [f"vqa/vqa_acc_{k}" for k in ("k0", "k2_random", "k2_rices")]
    expected += [f"videos/videoqa_acc_{k}" for k in ("k0", "k2_random", "k2_rices")]
    expected += ["captions/gen_cos", "captions/gen_mse", "captions/regression_cos", "vqa/text_loss"]
    missing = [t for t in expected if t not in scalars]
    assert not missing, (missing, sorted(scalars))

    tested = cli_main(["test", "--config", base, "--config", _overlay(tmp_path),
                       "--ckpt_path", str(logdir / "checkpoints" / "last.ckpt")])
    metrics = tested.trainer.callback_metrics
    assert 0.0 <= float(metrics["vqa/vqa_acc_k0"]) <= 1.0 and -1.0 <= float(metrics["captions/gen_cos"]) <= 1.0
