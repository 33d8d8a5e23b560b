"""A resume never needs the previous stage: `--ckpt_path` restores every part, so the stage-1 checkpoint named by
`init_from` is not read (it may have moved, been deleted, or sit under another working directory).
Slow (two CLI fits): `.venv/bin/python -m pytest -q -m slow tests/test_resume_without_previous_stage.py`.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from emu_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _overlay(tmp: Path, name: str, steps: int) -> str:
    path = tmp / f"{name}_{steps}.yaml"
    path.write_text(yaml.safe_dump({
        "trainer": {"max_steps": steps, "val_check_interval": 2, "limit_val_batches": 0, "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp), "name": name, "version": 0}}},
        "data": {"init_args": {"batch_size": 8, "num_workers": 0}}}))
    return str(path)


@pytest.mark.slow
def test_stage2_resumes_after_its_stage1_checkpoint_is_gone(tmp_path, capsys):
    recipes = ROOT / "recipes" / "debug"
    cli_main(["fit", "--config", str(recipes / "stage1_meanpool.yaml"), "--config", _overlay(tmp_path, "s1", 2)])
    stage1 = tmp_path / "s1" / "version_0" / "checkpoints" / "last.ckpt"
    stage2 = ["fit", "--config", str(recipes / "stage2_meanpool.yaml"), "--model.init_args.init_from", str(stage1)]
    cli_main([*stage2, "--config", _overlay(tmp_path, "s2", 2)])
    last = tmp_path / "s2" / "version_0" / "checkpoints" / "last.ckpt"
    at_2 = torch.load(last, weights_only=True)["state_dict"]
    stage1.unlink()                                            # the previous stage is gone
    capsys.readouterr()
    cli = cli_main([*stage2, "--config", _overlay(tmp_path, "s2", 4), "--ckpt_path", str(last)])
    assert cli.trainer.global_step == 4
    assert "the hand-off from init_from=" in capsys.readouterr().out
    assert cli.model.handoff_report is None                    # nothing was read from init_from
    # the run went on from its own step-2 weights: the frozen encoder is exactly the checkpoint's
    enc = {k: v for k, v in cli.model.state_dict().items() if k.startswith("encoder.")}
    assert enc and all(torch.equal(v, at_2[k]) for k, v in enc.items())
    saved = yaml.safe_load((tmp_path / "s2" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["init_from"] == str(stage1)     # the provenance stays in the config
