"""Encoder probe: how fast can the debug encoder learn object shape when it is told the answer directly?

The debug stage-1 encoder is trained from scratch through captioning. This probe trains the same encoder
(`recipes/components/encoder_eva_debug.yaml` sizes: 64 px, patch 8, 4 blocks, width 192) with a linear read-out
of its mean-pooled token grid straight onto the shape of every cell of the 3×3 scene grid (7 classes: six shapes
or empty), with the stage-1 optimiser (AdamW 1e-3, β .9/.95), batch 32. Its curve is a lower bound on how many
steps captioning needs before the encoder's tokens can tell shapes apart; the gap to the captioning curve is what
the language path costs (docs/synthetic_world.md, "How fast the debug model learns").

    python benchmarks/encoder_probe.py --stem patch --steps 300
    python benchmarks/encoder_probe.py --stem conv --steps 300

Each arm merges its curve (step → accuracy) into benchmarks/results/encoder_probe.json under
"<stem>_grid<grid>", with the command, date, machine, steps, wall time and steps/s, and prints it.
Accuracy is over the objects of 256 val scenes (empty cells are trained on, not scored).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from components.encoders.eva import EVAEncoder
from decoder_learning import object_accuracy
from emu_lightning.data.modules.captions import image_transform
from emu_lightning.data.synthetic.scenes import render, sample_scene
from emu_lightning.data.synthetic.text import POSITIONS
from emu_lightning.metrics.semantic import EMPTY, scene_targets
from results_io import merge_result, run_facts


def batch(split: str, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n scenes from `start`: pixels (n,3,64,64) CLIP-normalised, targets (n,9) shape index per cell or EMPTY."""
    transform = image_transform(64)
    scenes = [sample_scene(split, i) for i in range(start, start + n)]
    return torch.stack([transform(render(scene)) for scene in scenes]), scene_targets(scenes)[0]


def run(stem: str, grid: int, steps: int, every: int, batch_size: int = 32) -> dict[int, float]:
    torch.manual_seed(0)
    enc = EVAEncoder(img_size=64, patch_size=8, depth=4, embed_dim=192, num_heads=3, drop_cls=True, stem=stem)
    head = nn.Linear(enc.embed_dim * grid * grid, len(POSITIONS) * (EMPTY + 1))
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=1e-3, betas=(0.9, 0.95))

    def features(x: torch.Tensor) -> torch.Tensor:
        tokens = enc(x).transpose(1, 2).reshape(len(x), enc.embed_dim, enc.grid, enc.grid)
        return F.adaptive_avg_pool2d(tokens, grid).flatten(1)

    vx, vy = batch("val", 0, 256)
    curve, start = {}, time.time()
    for step in range(1, steps + 1):
        x, y = batch("train", step * batch_size, batch_size)
        loss = F.cross_entropy(head(features(x)).view(-1, EMPTY + 1), y.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            with torch.no_grad():
                pred = head(features(vx)).view(len(vx), len(POSITIONS), EMPTY + 1).argmax(-1)
            curve[step] = round(object_accuracy(pred, vy), 3)
            print(f"{stem} grid {grid} step {step}: shape {curve[step]:.3f} ({time.time() - start:.0f} s)", flush=True)
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stem", choices=["patch", "conv"], default="patch")
    p.add_argument("--grid", type=int, default=4, help="pooled grid the read-out sees (the debug adapter's: 4)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    start = time.time()
    curve = run(a.stem, a.grid, a.steps, a.every)
    wall = time.time() - start   # the val scoring every --every steps included
    merge_result("encoder_probe", f"{a.stem}_grid{a.grid}",
                 {**run_facts(), "steps": a.steps, "batch_size": 32, "wall_s": round(wall, 1),
                  "steps_per_s": round(a.steps / wall, 2), "curve": curve})


if __name__ == "__main__":
    main()
