"""The decoder UNet shards and checkpoints per block: its `block_cls` (diffusers' `ResnetBlock2D` and
`BasicTransformerBlock`) are the FSDP units and the only checkpointed modules, and a fit sharded over 2 gloo
processes (FSDP2) computes what one process computes with the same global batches (slow: torchrun and a
single-process twin, ~40 s on 2 cores: `.venv/bin/python -m pytest -q -m slow tests/test_decoder_fsdp.py`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from emu_lightning.systems.sharding import EmuFSDPStrategy, block_units
from tests.helpers import tiny_decoder

ROOT = Path(__file__).resolve().parents[1]


def test_unet_blocks_are_the_units_and_only_they_are_checkpointed(monkeypatch):
    system = tiny_decoder()
    units = block_units(system.parts)
    unet_blocks = units["unet"]
    assert {type(m).__name__ for m in unet_blocks} == {"ResnetBlock2D", "BasicTransformerBlock"}
    inside = sum(p.numel() for b in unet_blocks for p in b.parameters())
    assert inside > 0.85 * sum(p.numel() for p in system.unet.parameters())    # most weights sit in blocks
    monkeypatch.setattr(FSDPStrategy, "_setup_model", lambda self, model: model)
    strategy = EmuFSDPStrategy(activation_checkpointing_parts=["unet"])
    strategy._lightning_module = system
    strategy._setup_model(system)
    wrap = strategy.kwargs["auto_wrap_policy"]._lambda_fn
    check = strategy._activation_checkpointing_kwargs["check_fn"]
    assert [m for m in system.modules() if wrap(m)] == [m for ms in units.values() for m in ms]
    assert [m for m in system.modules() if check(m)] == unet_blocks


@pytest.mark.slow
def test_sharded_decoder_matches_single_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    sharded = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "tests.scripts.fsdp_decoder", str(sharded), "--mode", "sharded", "--ac", "unet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from tests.scripts.fsdp_decoder import run

    run(tmp_path / "single", "single")   # the same 4 global batches as 2 accumulated micro-batches each
    single = [row[2] for row in json.loads((tmp_path / "single" / "losses_rank0.json").read_text())]
    for r in (0, 1):                     # rank r at step k saw micro-batch r of step k, with its random draws
        losses = [row[2] for row in json.loads((sharded / f"losses_rank{r}.json").read_text())]
        assert losses == pytest.approx(single[r::2], rel=1e-4, abs=1e-5)
    a, b = torch.load(sharded / "final.pt")["state"], torch.load(tmp_path / "single" / "final.pt")["state"]
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for name in a:                       # the UNet and its EMA, gathered from the shards
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert torch.load(sharded / "final.pt")["world_size"] == 2
