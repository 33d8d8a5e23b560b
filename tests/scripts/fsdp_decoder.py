"""A tiny visual-decoder fit sharded over 2 CPU processes (FSDP2 via `EmuModelParallelStrategy`, gloo; one unit per
UNet `ResnetBlock2D` / `BasicTransformerBlock`, activation checkpointing on them) or on one process with the same
global batches as 2 accumulated micro-batches: the two compute the same gradients.

    python -m tests.scripts.fsdp_decoder OUT --mode sharded|single [--steps 4] [--ac unet]

The decoder draws its condition drop, noise and timesteps from the global RNG; each micro-batch reseeds it from
(step, micro-batch) so that rank r and the single process's micro-batch r draw the same numbers.
Writes OUT/losses_rank{r}.json ([step, micro-batch, loss] per batch) and, on rank 0, OUT/final.pt (the full UNet
and EMA weights, gathered from the shards). Launched by `tests/test_decoder_fsdp.py` under torchrun.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from emu_lightning.data.modules.captions import image_transform
from emu_lightning.data.synthetic.scenes import SyntheticCaptions
from emu_lightning.systems.sharding import EmuModelParallelStrategy
from tests.helpers import IMAGE_SIZE, tiny_decoder

IMAGES_PER_STEP, STEPS = 4, 4


class StepBatches(Dataset):
    """Item i = this process's images of optimizer step i: its half of the step's 4 when sharded over 2 ranks, or
    micro-batch i % 2 of step i // 2 on one process."""

    def __init__(self, sharded: bool):
        tf = image_transform(IMAGE_SIZE)
        self.pixels = torch.stack([tf(s["image"]) for s in SyntheticCaptions(
            split="train", size=IMAGES_PER_STEP * STEPS, image_size=IMAGE_SIZE)])
        self.sharded = sharded

    def __len__(self) -> int:
        return STEPS * (1 if self.sharded else 2)

    def __getitem__(self, i: int) -> dict:
        step, half = (i, torch.distributed.get_rank()) if self.sharded else divmod(i, 2)
        start = step * IMAGES_PER_STEP + half * IMAGES_PER_STEP // 2
        return {"pixel_values": self.pixels[start:start + IMAGES_PER_STEP // 2]}


class Record(L.Callback):
    def __init__(self, out: Path, sharded: bool):
        self.out, self.sharded, self.rows = out, sharded, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        micro = trainer.global_rank if self.sharded else batch_idx % 2
        torch.manual_seed(1000 * trainer.global_step + micro)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append([trainer.global_step, batch_idx, float(pl_module._terms["loss"])])

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        (self.out / f"losses_rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))
        state = {n.replace("_checkpoint_wrapped_module.", ""): (p.full_tensor() if isinstance(p, DTensor) else p)
                 .detach().clone() for n, p in pl_module.named_parameters() if n.startswith(("unet.", "ema."))}
        if trainer.is_global_zero:
            torch.save({"state": state, "world_size": trainer.world_size, "global_step": trainer.global_step},
                       self.out / "final.pt")


def run(out: Path, mode: str, steps: int = STEPS, ac: str = "unet") -> None:
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    system = tiny_decoder(warmup=0.0, ema_decay=0.9)
    sharded = mode == "sharded"
    if sharded:
        extra = dict(devices=2, strategy=EmuModelParallelStrategy(activation_checkpointing_parts=[a for a in
                                                                                                   ac.split(",") if a]))
    else:
        extra = dict(devices=1, accumulate_grad_batches=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
                        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0,
                        callbacks=[Record(out, sharded)], **extra)
    trainer.fit(system, train_dataloaders=DataLoader(StepBatches(sharded), batch_size=None, shuffle=False))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--mode", choices=["sharded", "single"], required=True)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--ac", default="unet", help="parts with activation checkpointing, comma-separated")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    run(args.out, args.mode, args.steps, args.ac)
