"""A tiny stage-2 fit, sharded over 2 CPU processes (FSDP2 via `EmuModelParallelStrategy`, gloo) or on one
process with the same global batches as 2 accumulated micro-batches: the two compute the same gradients.

    python -m tests.scripts.fsdp_stage2 OUT --mode sharded|single [--steps 4] [--ckpt_path P] [--ac llm,encoder]

Each epoch is 2 optimizer steps; a checkpoint is saved at each epoch end (sharded: a folder of shards).
Writes OUT/losses_rank{r}.json ([step, micro-batch, loss] per batch) and, on rank 0, OUT/final.pt (the full
weights, gathered from the shards). Launched by `tests/test_sharding_fsdp.py`; Lightning starts rank 1 itself, or
torchrun starts both (`--launcher torchrun`).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from emu_lightning.data.modules.captions import image_transform
from emu_lightning.data.layout.sequence import Layout, SequenceCollator
from emu_lightning.data.synthetic.scenes import SyntheticCaptions
from emu_lightning.systems.policy import StagePolicy
from emu_lightning.systems.sharding import EmuModelParallelStrategy
from tests.helpers import IMAGE_SIZE, tiny_stage2

DOCS_PER_STEP, STEPS_PER_EPOCH = 4, 2


class StepBatches(Dataset):
    """Item i = the collated batch of optimizer step i (mod the epoch) for this process: its half of the 4
    documents when sharded over 2 ranks, or micro-batch i % 2 of step i // 2 on one process."""

    def __init__(self, system, sharded: bool):
        pairs = SyntheticCaptions(split="train", size=DOCS_PER_STEP * STEPS_PER_EPOCH, image_size=IMAGE_SIZE)
        layout = Layout("pair", train=False)
        tf = image_transform(IMAGE_SIZE)
        self.docs = [{"id": s["id"], "source": "pairs", "segments": layout({**s, "image": tf(s["image"])})}
                     for s in pairs]
        self.collate = SequenceCollator(system.tokenizer, system.num_image_tokens, max_length=64)
        self.sharded = sharded

    def __len__(self) -> int:
        return STEPS_PER_EPOCH * (1 if self.sharded else 2)

    def __getitem__(self, i: int) -> dict:
        if self.sharded:
            step, half = i, torch.distributed.get_rank()
        else:
            step, half = divmod(i, 2)
        start = step * DOCS_PER_STEP + half * DOCS_PER_STEP // 2
        return self.collate(self.docs[start:start + DOCS_PER_STEP // 2])


class Record(L.Callback):
    def __init__(self, out: Path):
        self.out, self.rows = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The guard's copy of the step's loss: not divided by the accumulation count, unlike outputs["loss"].
        self.rows.append([trainer.global_step, batch_idx, float(pl_module._terms["loss"])])

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        (self.out / f"losses_rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))
        state = {n.replace("_checkpoint_wrapped_module.", ""): (p.full_tensor() if isinstance(p, DTensor) else p)
                 .detach().clone() for n, p in pl_module.named_parameters()}
        if trainer.is_global_zero:
            torch.save({"state": state, "env": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
                        "world_size": trainer.world_size, "global_step": trainer.global_step}, self.out / "final.pt")


def run(out: Path, mode: str, steps: int = 4, ckpt_path: str | None = None, ac: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    system = tiny_stage2("meanpool", warmup=0.0)
    # Built here rather than by the CLI, whose saved hyper-parameters are plain dicts: allow the policy object in
    # the weights_only load of the sharded checkpoint's metadata.
    torch.serialization.add_safe_globals([StagePolicy])
    sharded = mode == "sharded"
    if sharded:
        strategy = EmuModelParallelStrategy(activation_checkpointing_parts=[a for a in ac.split(",") if a])
        extra = dict(devices=2, strategy=strategy)
    else:
        extra = dict(devices=1, accumulate_grad_batches=2)
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", filename="{step}", save_top_k=-1,
                           every_n_train_steps=STEPS_PER_EPOCH)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
                        num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=[Record(out), ckpt], **extra)
    loader = DataLoader(StepBatches(system, sharded), batch_size=None, shuffle=False)
    trainer.fit(system, train_dataloaders=loader, ckpt_path=ckpt_path)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--mode", choices=["sharded", "single"], required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ckpt_path", default=None)
    p.add_argument("--ac", default="", help="parts with activation checkpointing, comma-separated")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    run(args.out, args.mode, args.steps, args.ckpt_path, args.ac)
