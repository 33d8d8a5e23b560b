"""`python -m emu_lightning.chain`: chain files, hand-offs, resume, samples, and the README's stage commands.

The tiny chain of the README (`recipes/chains/tiny_emu.yaml`, five stages) runs end to end at 2 steps per
stage under `-m slow` (about 4 minutes on 2 busy cores):
    .venv/bin/python -m pytest -q -m slow tests/test_chain.py
The default suite runs a two-stage chain (stage 1 → decoder) with its samples, and the rerun that skips it; a
failing stage stopping the chain is slow too.
"""
from __future__ import annotations

import json
import re
import shlex
import signal
from pathlib import Path

import pytest
import yaml

from emu_lightning.chain.run import load_chain, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "chains" / "tiny_emu.yaml"
SMALL = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "0",
         "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0"]


def _write(tmp: Path, spec: dict) -> Path:
    path = tmp / "chain.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _recipe(name: str) -> str:
    return str(ROOT / "recipes" / "debug" / f"{name}.yaml")


@pytest.mark.parametrize("spec, message", [
    ({"stages": []}, "non-empty `stages`"),
    ({"stages": [{"name": "a", "recipe": "nope.yaml"}]}, "recipe 'nope.yaml' not found"),
    ({"stages": [{"name": "a", "recipe": "R", "init_from": "b"}]}, "init_from 'b' is not an earlier stage"),
    ({"stages": [{"name": "a", "recipe": "R"}, {"name": "a", "recipe": "R"}]}, "'a' is used twice"),
    ({"stages": [{"name": "a", "recipe": "R", "lr": 1}]}, "unknown keys ['lr']"),
    ({"stages": [{"name": "a", "recipe": "R"}], "samples": {"caption": "z"}}, "samples.caption names 'z'"),
    ({"stages": [{"name": "a", "recipe": "R"}], "samples": {"generate": "a"}}, "generate and samples.decoder"),
])
def test_chain_file_errors_name_the_entry(tmp_path, spec, message, capsys):
    for stage in spec["stages"]:
        stage["recipe"] = _recipe("stage1_meanpool") if stage["recipe"] == "R" else stage["recipe"]
    path = _write(tmp_path, spec)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        load_chain(path)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def _readme_block(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip()]


def _logger_name(recipe: Path) -> str:
    logger = yaml.safe_load(recipe.read_text())["trainer"]["logger"]
    return logger["init_args"]["name"]


def test_readme_stage_commands_are_the_tiny_chain(capsys):
    """The README's step-by-step commands train the same recipes with the same hand-offs as the one-command
    chain, and each hand-off points at the run folder its parent recipe logs to (so they work as printed)."""
    chain = load_chain(TINY)
    by_name = {s.name: s for s in chain.stages}
    lines = _readme_block("Train each stage")
    assert len(lines) == len(chain.stages)
    for line, stage in zip(lines, chain.stages):
        argv = shlex.split(line)
        assert argv[:4] == [".venv/bin/python", "main.py", "fit", "--config"], line
        assert (ROOT / argv[4]).resolve() == stage.recipe, line
        opts = dict(zip(argv[5::2], argv[6::2]))
        if stage.init_from is None:
            assert "--model.init_args.init_from" not in opts, line
            continue
        parent = by_name[stage.init_from].recipe
        assert opts["--model.init_args.init_from"] == f"runs/{_logger_name(parent)}/version_0/checkpoints/last.ckpt"
    # --print shows the same recipes and hand-offs, with the chain's own run folders
    assert main([str(TINY), "--out", "runs/tiny_emu", "--print"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert [shlex.split(p)[4] for p in printed] == [shlex.split(ln)[4] for ln in lines]
    assert "runs/tiny_emu/stage1/checkpoints/last.ckpt" in printed[1]


def _check_samples(out: Path, kinds: set[str]) -> None:
    samples = out / "samples"
    index = (samples / "index.md").read_text()
    files = {"captions": "captions.jsonl", "answers": "answers.jsonl", "generate": "generate.jsonl"}
    for kind, name in files.items():
        assert (samples / name).is_file() == (kind in kinds), name
    for kind in kinds:
        rows = [json.loads(x) for x in (samples / files[kind]).read_text().splitlines()]
        assert rows and all((samples / r["image"]).is_file() and r["image"] in index for r in rows)
        if kind == "captions":
            assert all(isinstance(r["caption"], str) for r in rows)
        if kind == "answers":
            assert all(r["question"].endswith("?") and isinstance(r["answer"], str) for r in rows)


def test_two_stage_chain_hands_off_resumes_and_samples(tmp_path, one_thread):
    path = _write(tmp_path, {
        "stages": [{"name": "s1", "recipe": _recipe("stage1_meanpool")},
                   {"name": "dec", "recipe": _recipe("decoder"), "init_from": "s1",
                    "overrides": {"model.init_args.sample_steps": 2}}],
        "samples": {"images": 2, "caption": "s1", "max_new_tokens": 4}})
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--threads", "1", "--", *SMALL]) == 0
    for stage in ("s1", "dec"):
        status = json.loads((out / stage / "status.json").read_text())
        assert status["state"] == "done" and (out / stage / "checkpoints" / "last.ckpt").is_file()
    handoff = yaml.safe_load((out / "dec" / "overlay.yaml").read_text())["model"]["init_args"]["init_from"]
    assert handoff == str(out / "s1" / "checkpoints" / "last.ckpt")
    _check_samples(out, {"captions"})
    # a second invocation trains nothing: both stages are done
    before = {s: (out / s / "checkpoints" / "last.ckpt").stat().st_mtime_ns for s in ("s1", "dec")}
    assert main([str(path), "--out", str(out), "--no-samples", "--", *SMALL]) == 0
    assert before == {s: (out / s / "checkpoints" / "last.ckpt").stat().st_mtime_ns for s in ("s1", "dec")}


@pytest.mark.slow
def test_failed_stage_stops_the_chain_and_names_its_log(tmp_path, one_thread, capsys):
    path = _write(tmp_path, {"stages": [{"name": "s1", "recipe": _recipe("stage1_meanpool"),
                                         "overrides": {"model.init_args.no_such_arg": 1}},
                                        {"name": "s2", "recipe": _recipe("stage2_meanpool"), "init_from": "s1"}]})
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    assert main([str(path), "--out", str(out), "--threads", "1", "--", *SMALL]) == 1
    assert signal.getsignal(signal.SIGTERM) is before    # the runner's SIGTERM exit does not outlive it
    err = capsys.readouterr().err
    assert "stage s1 failed" in err and str(out / "s1" / "run.log") in err
    assert not (out / "s2").exists()


@pytest.mark.slow
def test_tiny_emu_chain_end_to_end(tmp_path, one_thread):
    out = tmp_path / "tiny_emu"
    assert main([str(TINY), "--out", str(out), "--threads", "1", "--", *SMALL]) == 0
    for stage in load_chain(TINY).stages:
        assert json.loads((out / stage.name / "status.json").read_text())["state"] == "done"
    _check_samples(out, {"captions", "answers", "generate"})
