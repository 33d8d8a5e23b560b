"""Multi-process launch: the real CLI (`main.py fit`) on a debug stage-2 recipe under torchrun with 2 CPU
processes and FSDP2 reads the launch environment (2 ranks), trains and writes a sharded `last.ckpt`.

Slow (~1 min on 2 cores): `.venv/bin/python -m pytest -q -m slow tests/test_launch_torchrun.py`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_recipe_runs_under_torchrun_with_two_processes(tmp_path):
    small = lambda cls, split: {"class_path": f"emu_lightning.data.synthetic.scenes.{cls}",  # noqa: E731
                                "init_args": {"split": split, "size": 2, "image_size": 64}}
    evals = {"captions": small("SyntheticCaptions", "val")}
    overlay = {
        "trainer": {"accelerator": "cpu", "devices": 2, "num_nodes": 1, "max_steps": 2, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "strategy": {"class_path": "emu_lightning.systems.sharding.EmuModelParallelStrategy",
                                 "init_args": {"activation_checkpointing_parts": ["llm"]}},
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "s2", "version": 0}}},
        "model": {"init_args": {"shots": [0], "video_shots": [0]}},
        "data": {"init_args": {"val": evals, "test": evals, "demos": evals, "batch_size": 8, "eval_batch_size": 2,
                               "num_workers": 0, "num_frames": 2, "max_length": 96}},
    }
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "main.py", "fit",
           "--config", "recipes/debug/stage2_meanpool.yaml", "--config", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log          # both ranks from torchrun's environment
    assert "FSDP2 over 2 processes" in log
    last = tmp_path / "runs" / "s2" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2, sorted(p.name for p in last.parent.rglob("*"))
