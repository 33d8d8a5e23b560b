"""Sharded training on CPU: FSDP2 (`EmuModelParallelStrategy`, gloo) over 2 processes computes what one
process computes, and its sharded checkpoint resumes to the same weights; torchrun's environment is read.

The 2-process runs are subprocesses (`tests/scripts/fsdp_stage2.py`): torchrun starts both ranks of the sharded
run (about 35 s on 2 cores with the single-process twin), Lightning's own launcher starts rank 1 of the resumed
run. Both are slow: `.venv/bin/python -m pytest -q -m slow tests/test_sharding_fsdp.py` (the default suite checks
the wrapping of every part in process, tests/test_sharding_recipes.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "tests.scripts.fsdp_stage2"


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _losses(out: Path) -> list[list[float]]:
    return [[row[2] for row in json.loads((out / f"losses_rank{r}.json").read_text())] for r in (0, 1)]


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """4 steps over 2 processes started by torchrun, activation checkpointing on the LLM, a sharded checkpoint
    every 2 steps."""
    out = tmp_path_factory.mktemp("sharded")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", SCRIPT,
           str(out), "--mode", "sharded", "--ac", "llm"]
    _check(subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300))
    return out


@pytest.mark.slow
def test_sharded_matches_single_process(sharded_run, tmp_path):
    from tests.scripts.fsdp_stage2 import run

    run(tmp_path, "single")   # the same 4 global batches as 2 accumulated micro-batches each, in this process
    single = [row[2] for row in json.loads((tmp_path / "losses_rank0.json").read_text())]
    sharded = _losses(sharded_run)
    # Rank r at step k saw micro-batch r of step k: the same loss, from weights updated by the same gradients.
    for r in (0, 1):
        assert sharded[r] == pytest.approx(single[r::2], rel=1e-4, abs=1e-5)
    assert single[-2] < single[0] and single[-1] < single[1]    # and it learns
    a, b = torch.load(sharded_run / "final.pt")["state"], torch.load(tmp_path / "final.pt")["state"]
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    final = torch.load(sharded_run / "final.pt")   # torchrun's environment was read: 2 ranks, TorchElastic
    assert (final["env"], final["world_size"], final["global_step"]) == ("TorchElasticEnvironment", 2, 4)
    ckpt = sharded_run / "ckpt" / "step=2.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2   # one shard file per rank


@pytest.mark.slow
def test_sharded_checkpoint_resumes(sharded_run, tmp_path):
    # Resume steps 3-4 from the step-2 shards; here Lightning's own launcher starts rank 1.
    cmd = [sys.executable, "-m", SCRIPT, str(tmp_path), "--mode", "sharded", "--ckpt_path",
           str(sharded_run / "ckpt" / "step=2.ckpt")]
    _check(subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300))
    final = torch.load(tmp_path / "final.pt")
    assert (final["env"], final["world_size"], final["global_step"]) == ("LightningEnvironment", 2, 4)
    straight, resumed = _losses(sharded_run), _losses(tmp_path)
    assert [s[2:] for s in straight] == resumed                 # steps 3-4: bit-identical losses
    a = torch.load(sharded_run / "final.pt")["state"]
    for name, value in final["state"].items():
        assert torch.equal(value, a[name]), name                # and bit-identical weights
