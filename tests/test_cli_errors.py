"""`main.py` failures are one short block naming what to fix, not a traceback ending in a repr of the config.

Each case runs the entry point's `main` (what `main.py` calls) in this process at start-up (no training step): a
width mismatch, a missing data file, a `--ckpt_path` that is not a checkpoint, and a checkpoint of another stage
given as `--ckpt_path` or `init_from` (named with the system that saved it, its parts and the parts the recipe
needs). `EMU_TRACEBACK=1` lets the exception through. Everything written to the process's stderr (fd 2: Lightning's
own log lines too) is what a user would see.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emu_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "debug" / "stage1_meanpool.yaml")


@pytest.fixture
def run(tmp_path, monkeypatch, capfd):
    """`main.py fit --config <recipe> ...` from tmp_path: (exit status, stderr)."""
    monkeypatch.chdir(tmp_path)

    def _run(args: list[str], recipe: str = RECIPE) -> tuple[int, str]:
        capfd.readouterr()
        rc = main(["fit", "--config", recipe, "--trainer.enable_progress_bar", "false", *args])
        return rc, capfd.readouterr().err
    return _run


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
def test_startup_failures_print_one_short_block(tmp_path, run, args, names):
    (tmp_path / "notes.txt").write_text("not weights\n")
    rc, err = run([*args, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert rc == 1, err[-2000:]
    block = _block(err)
    assert len(block) <= 4 and len(err.strip().splitlines()) <= 12, err
    assert all(n in "\n".join(block) for n in names), block
    assert "Traceback" not in err and "Namespace(" not in err


def test_traceback_on_request(run, monkeypatch):
    monkeypatch.setenv("EMU_TRACEBACK", "1")
    with pytest.raises(ValueError, match="out_dim"):
        run(["--model.init_args.adapter.init_args.out_dim", "100"])


def test_a_checkpoint_of_another_stage_is_named_with_both_part_lists(tmp_path, run):
    """A stage-1 checkpoint given as `--ckpt_path` to a decoder fit (before: a jsonargparse failure ending in the
    repr of the whole config), and as `init_from` of a chat fit, whose hand-off needs the regression head too."""
    from tests.helpers import debug_system

    stage1 = debug_system("stage1_meanpool")   # RECIPE's system (same keys and shapes), built without a CLI parse
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
        rc, err = run([*args, *logs], recipe=str(debug / recipe))
        assert rc == 1, err[-2000:]
        block = _block(err)
        assert len(block) <= 4 and len(err.strip().splitlines()) <= 12, err
        assert all(n in "\n".join(block) for n in names), block
