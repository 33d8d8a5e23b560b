"""`main.py` failures are one short block naming what to fix, not a traceback ending in a repr of the config.

Each case runs the real entry point in a subprocess at start-up (no training step): a width mismatch, a missing
data file, a `--ckpt_path` that is not a checkpoint, and a checkpoint of another stage given as `--ckpt_path` or
`init_from` (named with the system that saved it, its parts and the parts the recipe needs). `EMU_TRACEBACK=1`
brings the full traceback back.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "debug" / "stage1_meanpool.yaml")


def _run(args: list[str], cwd: Path, recipe: str = RECIPE, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "fit", "--config", recipe,
                           "--trainer.enable_progress_bar", "false", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)


def _block(stderr: str) -> list[str]:
    lines = stderr.strip().splitlines()
    start = max(i for i, ln in enumerate(lines) if ln.startswith("error:"))
    return lines[start:]


@pytest.mark.parametrize("args, names", [
    (["--model.init_args.adapter.init_args.out_dim", "100"], ["adapter.out_dim=100", "llm.hidden_dim=256"]),
    (["--data.init_args.train", "{class_path: emu_lightning.data.real.captions.CocoCaptions, "
      "init_args: {annotations: /nowhere/captions.json, image_dir: /nowhere}}"], ["/nowhere/captions.json"]),
    (["--ckpt_path", "notes.txt"], ["notes.txt: not a torch checkpoint", "last.ckpt"]),
], ids=["widths", "data file", "checkpoint"])
def test_startup_failures_print_one_short_block(tmp_path, args, names):
    (tmp_path / "notes.txt").write_text("not weights\n")
    result = _run([*args, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")], tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    block = _block(result.stderr)
    assert len(block) <= 4 and len(result.stderr.strip().splitlines()) <= 12, result.stderr
    assert all(n in "\n".join(block) for n in names), block
    assert "Traceback" not in result.stderr and "Namespace(" not in result.stderr


def test_traceback_on_request(tmp_path):
    result = _run(["--model.init_args.adapter.init_args.out_dim", "100"], tmp_path, EMU_TRACEBACK="1")
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr


def test_a_checkpoint_of_another_stage_is_named_with_both_part_lists(tmp_path):
    """A stage-1 checkpoint given as `--ckpt_path` to a decoder fit (before: a jsonargparse failure ending in the
    repr of the whole config), and as `init_from` of a chat fit, whose hand-off needs the regression head too."""
    from emu_lightning.cli import cli_main

    stage1 = cli_main(["--config", RECIPE], run=False).model
    # What a stage-1 fit saves, as far as the checks read it: its state and LightningCLI's class path.
    torch.save({"state_dict": stage1.state_dict(), "epoch": 0, "global_step": 10,
                "hyper_parameters": {"_class_path": "emu_lightning.systems.stage1.Stage1System"}}, tmp_path / "s1.ckpt")
    debug = ROOT / "recipes" / "debug"
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    have = "s1.ckpt is a checkpoint of Stage1System with parts ['adapter', 'encoder', 'llm']"
    for args, recipe, names in [
            (["--ckpt_path", "s1.ckpt"], "decoder.yaml",
             [have, "this recipe (DecoderSystem) needs ['adapter', 'ema', 'encoder', 'unet']", "init_from"]),
            (["--model.init_args.init_from", "s1.ckpt"], "chat.yaml",
             [have, "this recipe (ChatSystem) needs ['adapter', 'encoder', 'llm', 'regression_head']",
              "no keys under ['regression_head']"])]:
        result = _run([*args, *logs], tmp_path, recipe=str(debug / recipe))
        assert result.returncode == 1, result.stderr[-2000:]
        block = _block(result.stderr)
        assert len(block) <= 4 and len(result.stderr.strip().splitlines()) <= 12, result.stderr
        assert all(n in "\n".join(block) for n in names), block
