"""Kill and resume, stage 1: the map-style caption loader (`ResumableMapLoader`) keeps its place within the epoch in
the checkpoint, so a stage-1 run stopped after a checkpoint and resumed ends with the same weights, bit for bit on
CPU, as the uninterrupted run, also across an epoch boundary and with DataLoader workers.
The default suite resumes at step 5 without workers; the epoch-boundary case with 2 DataLoader workers is slow:
`.venv/bin/python -m pytest -q -m slow tests/test_resume_stage1.py`.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from emu_lightning.checkpoints.io import safe_load
from emu_lightning.cli import cli_main
from emu_lightning.data.modules.captions import EpochSampler
from tests.resume_helpers import ROOT, args, assert_same_weights

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPE = str(ROOT / "recipes" / "debug" / "stage1_meanpool.yaml")
STEPS, BATCH, EPOCH = 8, 2, 5     # 10 training images: 5 batches an epoch, so the run crosses one boundary;
                                  # checkpoints every 2 steps, the last at STEPS


def _overlay(tmp: Path, name: str, num_workers: int, crash_at: int | None = None) -> str:
    run = tmp / name
    run.mkdir(parents=True, exist_ok=True)
    cfg = {"trainer": {
               "max_steps": STEPS, "val_check_interval": None, "limit_val_batches": 0, "log_every_n_steps": 1,
               "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
               "default_root_dir": str(run),
               "callbacks": [
                   {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "ckpt"), "every_n_train_steps": 2, "save_last": True,
                                  "save_top_k": 0}},
                   {"class_path": "tests.resume_helpers.StepMarker",
                    "init_args": {"marks": str(run / "marks"), "crash_at": crash_at}}]},
           "data": {"init_args": {
               "train": {"class_path": "emu_lightning.data.synthetic.scenes.SyntheticCaptions",
                         "init_args": {"split": "train", "size": BATCH * EPOCH, "image_size": 64}},
               "val": {}, "batch_size": BATCH, "num_workers": num_workers}}}
    path = run / "overlay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _fit(tmp: Path, name: str, num_workers: int, ckpt: Path | None = None, crash_at: int | None = None) -> Path:
    cli = cli_main(args(_overlay(tmp, name, num_workers, crash_at), str(ckpt) if ckpt else None, recipe=RECIPE))
    assert cli.trainer.global_step == STEPS
    last = tmp / name / "ckpt" / "last.ckpt"
    assert safe_load(last)["global_step"] == STEPS    # the weights compared are the final ones
    return last


@pytest.mark.parametrize("crash_at, num_workers", [(5, 0), pytest.param(7, 2, marks=pytest.mark.slow)])
def test_stage1_resume_mid_epoch_gives_identical_weights(tmp_path, crash_at, num_workers):
    ref = _fit(tmp_path, "ref", num_workers)
    with pytest.raises(KeyError, match=f"after step {crash_at}"):
        _fit(tmp_path, "cut", num_workers, crash_at=crash_at)
    ckpt = tmp_path / "cut" / "ckpt" / "last.ckpt"
    saved = safe_load(ckpt)
    step = (crash_at - 1) // 2 * 2                  # checkpoints every 2 steps: 4 (epoch 0) or 6 (epoch 1)
    assert saved["global_step"] == step
    saved_loader = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert saved_loader["world_size"] == 1, saved_loader
    position = saved_loader["ranks"][0]
    assert position["batches"] == step % EPOCH and position["batch_size"] == BATCH, position
    assert position["samples"] == step % EPOCH * BATCH, position
    assert_same_weights(ref, _fit(tmp_path, "cut", num_workers, ckpt=ckpt))

    # The comparison has teeth: the same resume without the saved position trains on other batches.
    del saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    torch.save(saved, tmp_path / "no_position.ckpt")
    blind = _fit(tmp_path, "blind", num_workers, ckpt=tmp_path / "no_position.ckpt")
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_same_weights(ref, blind)


def test_epoch_sampler_orders_and_resumes():
    torch.manual_seed(0)
    s = EpochSampler(10)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(10)) and len({seed for _, seed in first}) == 1
    assert [i for i, _ in list(s)] != [i for i, _ in first]          # a new order each epoch
    s.resume(first[0][1], 4)
    assert list(s) == first[4:]                                      # that epoch's order, less what was read
    assert len(list(s)) == 10                                        # the resume is used once


def test_resume_with_another_batch_size_is_an_error():
    from emu_lightning.data.modules.captions import ResumableMapLoader

    loader = ResumableMapLoader(list(range(8)), batch_size=2)
    with pytest.raises(ValueError, match="batches of 4, this run's batch_size is 2"):
        loader.load_state_dict({"seed": 1, "batches": 1, "batch_size": 4})
