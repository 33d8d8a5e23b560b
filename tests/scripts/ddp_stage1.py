"""The debug stage-1 recipe through the CLI, one overlay on top: the multi-rank resume tests' subprocess
(`tests/test_ranks.py`).

    python -m tests.scripts.ddp_stage1 OVERLAY [CKPT]

With `trainer.devices: 2` and `strategy: ddp` in the overlay, Lightning starts rank 1 with this same command (gloo on
CPU). Exits with `main.py`'s status.
"""
from __future__ import annotations

import sys

import torch

from tests.resume_helpers import ROOT, args

RECIPE = str(ROOT / "recipes" / "debug" / "stage1_meanpool.yaml")

if __name__ == "__main__":
    from emu_lightning.cli import main

    torch.set_num_threads(1)
    sys.exit(main(args(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None, recipe=RECIPE)))
