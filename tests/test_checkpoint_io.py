"""Checkpoint safety: every load is `weights_only` (a file pickling an arbitrary object is refused, naming the file
and the object, and its payload never runs), a save is atomic (a kill mid-write, or a disk that fills up, keeps the
previous file), and the system's RNG states, counters and guard counts survive the round trip."""
from __future__ import annotations

import errno
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from emu_lightning.checkpoints.io import SafeCheckpointIO, atomic_torch_save, safe_load
from emu_lightning.checkpoints.handoff import read_state_dict
from emu_lightning.checkpoints import io as checkpoint_io
from emu_lightning.cli import cli_main, main
from emu_lightning.systems.base import PartsSystem
from emu_lightning.systems.policy import StagePolicy
from tests.resume_helpers import ROOT, args, overlay


class Payload:
    """Unpickling this creates `marker`: the proof that a load ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _crafted(tmp_path: Path) -> tuple[Path, Path]:
    marker, path = tmp_path / "payload_ran", tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"llm.w": torch.zeros(2)}, "hyper_parameters": Payload(marker)}, path)
    return path, marker


def test_a_checkpoint_with_a_pickled_object_is_refused_everywhere(tmp_path, monkeypatch):
    path, marker = _crafted(tmp_path)
    refused = rf"{re.escape(str(path))}: refused to load: the file pickles an object that is not a tensor.*Unsupported global: GLOBAL"
    with pytest.raises(ValueError, match=refused):
        safe_load(path)
    with pytest.raises(ValueError, match=refused):              # the stage hand-off (init_from)
        read_state_dict(str(path))
    with pytest.raises(ValueError, match=refused):              # Lightning's resume (--ckpt_path) via the CLI plugin
        monkeypatch.chdir(tmp_path)
        cli_main(args(overlay(tmp_path, 2), str(path)))
    with pytest.raises(ValueError, match="weights_only=False was asked for"):
        SafeCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()
    torch.load(path, weights_only=False)                        # the control: an unsafe load does run it
    assert marker.exists()


def test_truncated_and_missing_checkpoints_are_named(tmp_path):
    whole = tmp_path / "whole.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(1000)}}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:3000])
    with pytest.raises(ValueError, match=rf"{re.escape(str(cut))}: not a torch checkpoint, or a truncated"):
        safe_load(cut)
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        safe_load(tmp_path / "absent.ckpt")
    assert torch.equal(safe_load(whole)["state_dict"]["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []   # no temporary left behind


KILLED_SAVE = """
import sys, time, torch
from pathlib import Path
from emu_lightning.checkpoints import io as checkpoint_io
path = Path(sys.argv[1])
checkpoint_io.atomic_torch_save({"version": torch.tensor(1), "w": torch.ones(100_000)}, path)
real = torch.save
def stalling(obj, f):
    real(obj, f)            # every byte is written... but never renamed: the kill comes first
    f.flush()
    Path(str(path) + ".stalled").touch()
    time.sleep(60)
checkpoint_io.torch.save = stalling
checkpoint_io.atomic_torch_save({"version": torch.tensor(2), "w": torch.zeros(100_000)}, path)
"""


def test_rng_states_counters_and_guard_ride_in_a_weights_only_checkpoint(tmp_path):
    """`PartsSystem.on_save_checkpoint` → file → `on_load_checkpoint` → `on_train_start`: the process RNGs (torch,
    Python, NumPy) draw after the restore what they drew after the save, and the counters and guard counts return."""
    saved = PartsSystem(StagePolicy(trainable=[], lr={}))
    saved.counters.update(truncated=3, skipped=5)
    saved.guard.record(4, "loss", {"loss": float("nan")})
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    checkpoint: dict = {}
    saved.on_save_checkpoint(checkpoint)
    after_save = torch.rand(4), random.random(), np.random.rand(2)
    atomic_torch_save(checkpoint, tmp_path / "last.ckpt")

    torch.manual_seed(9)            # the resumed process's own streams
    random.seed(9)
    np.random.seed(9)
    resumed = PartsSystem(StagePolicy(trainable=[], lr={}))
    resumed.on_load_checkpoint(safe_load(tmp_path / "last.ckpt"))
    assert resumed.counters == {"truncated": 3, "skipped": 5}
    assert resumed.guard.state_dict() == {"total": 1, "steps": [4]}
    torch.rand(3)                   # e.g. building the DataLoader iterator draws between the load and the start
    resumed.on_train_start()
    torch.testing.assert_close(torch.rand(4), after_save[0], rtol=0, atol=0)
    assert random.random() == after_save[1] and np.array_equal(np.random.rand(2), after_save[2])


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path)], cwd=ROOT)
    start = time.time()
    while not Path(str(path) + ".stalled").exists():
        assert proc.poll() is None and time.time() - start < 60, f"the save never stalled (rc {proc.returncode})"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert int(safe_load(path)["version"]) == 1                     # the previous checkpoint, whole
    partial = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(partial) == 1 and int(safe_load(partial[0])["version"]) == 2   # the new one never took its name


SOURCES = ["emu_lightning", "components", "callbacks", "benchmarks"]


def test_a_full_disk_during_a_save_names_the_file_and_the_space_and_keeps_the_previous_checkpoint(
        tmp_path, monkeypatch, capsys):
    """The step-4 save of a fit runs out of space part-way through writing: the run stops with one short block that
    names the checkpoint, the space it needs and the space free; the step-2 `last.ckpt` is whole, no temp file left."""
    real_save, saves = torch.save, []

    def full_disk(obj, f):
        saves.append(1)
        if len(saves) == 1:
            return real_save(obj, f)
        f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk)
    assert main(args(overlay(tmp_path, max_steps=4, every=2))) == 1
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    block = capsys.readouterr().err.strip().splitlines()
    assert len(block) <= 4, block
    assert block[0].startswith("error: OSError: [Errno 28] no space left to save") and str(last) in block[0], block
    assert re.search(r"needs about [\d.,]+ MiB .*, [\d.,]+ MiB is free in ", block[0]), block
    assert "the previous last.ckpt is kept whole" in block[0], block
    assert safe_load(last)["global_step"] == 2
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


def test_every_torch_load_in_the_code_is_weights_only():
    loads = []
    for folder in SOURCES:
        for file in sorted((ROOT / folder).rglob("*.py")):
            for m in re.finditer(r"torch\.load\(.*", file.read_text()):   # each call fits on its line
                loads.append((file.relative_to(ROOT).as_posix(), m.group(0)))
    assert loads, "no torch.load found: the scan is broken"
    unsafe = [(f, call) for f, call in loads if "weights_only=True" not in call
              and not (f == "emu_lightning/inference/pipelines.py" and "weights_only=weights_only" in call)]
    assert not unsafe, unsafe


@pytest.mark.parametrize("content", [b"hello\n", b"\x89PNG\r\n\x1a\n" + bytes(64), b""], ids=["text", "png", "empty"])
def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path, content):
    """Text, an image or an empty file given as a checkpoint: a ValueError naming the file and what to pass,
    not whatever the unpickler trips over (KeyError, IndexError, ...)."""
    path = tmp_path / "notes.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not a torch checkpoint.*pass a Lightning \.ckpt"):
        safe_load(path)
