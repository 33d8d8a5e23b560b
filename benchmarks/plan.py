"""Capacity plan of a stage-2 recipe on a cluster: parameters, memory per GPU, FLOPs, step time, largest micro-batch.

    .venv/bin/python benchmarks/plan.py --recipe recipes/emu2/stage2.yaml --gpus 256 --gpu-memory 80 --peak-tflops 989
        [--mfu 0.4] [--seq-len T] [--images n] [--precision P] [--headroom 0.1] [--json benchmarks/results/plan.json]

The recipe's parts are built on the meta device (no memory, no weights read); its trainer section gives the
sharding (FSDP FULL_SHARD when the strategy is `EmuFSDPStrategy` / `EmuModelParallelStrategy`), the checkpointed
parts and the precision; its data section the sequence length (`max_length`), the images of the heaviest sample
(`num_frames` frames of a video or as many interleaved images) and the documents per step (`batch_size` per GPU ×
the recipe's GPUs × gradient accumulation), kept when `--gpus` differs. The model (emu_lightning/capacity/) is
checked against measured FLOPs and peak memory at debug size (tests/test_capacity.py). `--gpu-memory` is in GiB.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # imported as `benchmarks.plan` by the tests
from results_io import merge_result, run_facts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def build(recipe: str) -> tuple[Any, dict]:
    """The recipe's system on the meta device and its run settings (trainer, data, strategy). Local paths this
    machine lacks (weights, data) are not read; without the recipe's tokenizer the LLM gets the vocabulary of its
    fragment plus the Emu special tokens, as the real tokenizer gives it."""
    import yaml

    from emu_lightning.cli import EmuCLI
    from emu_lightning.data.layout.tokens import SPECIAL_TOKENS
    from emu_lightning.systems.base import PartsSystem

    class PlanCLI(EmuCLI):
        def instantiate_trainer(self, **kwargs: Any) -> None:   # its settings are read; no Trainer is built
            return None

    tokenizer = (yaml.safe_load(Path(recipe).read_text()).get("model", {}).get("init_args", {}).get("tokenizer"))
    here = tokenizer is not None and Path(tokenizer).exists()
    overrides = ["--data.init_args.train", "null", "--data.init_args.val", "null", "--data.init_args.test", "null",
                 "--data.init_args.weights", "null", "--data.init_args.layouts", "null", "--data.init_args.demos",
                 "null", "--model.init_args.init_from", "null", "--trainer.logger", "false",
                 *([] if here else ["--model.init_args.tokenizer", "null"])]
    with torch.device("meta"), warnings.catch_warnings():
        # Given `args`, this script's own command line is not read; Lightning warns whenever it is non-empty.
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within")
        cli = PlanCLI(PartsSystem, subclass_mode_model=True, subclass_mode_data=True, run=False,
                      args=["--config", recipe, *overrides], parser_kwargs={"parser_mode": "omegaconf"},
                      save_config_callback=None)
        system = cli.model
        if not here:
            system.llm.resize_vocab(cli.config.model.init_args.llm.init_args.vocab_size + len(SPECIAL_TOKENS))
    return system, {"trainer": cli.config.trainer, "data": cli.config.data.init_args,
                    "strategy": cli.config_init.trainer.strategy}


def layout_of(run: dict, gpus: int, precision: str | None):
    """The recipe's sharding, checkpointing and precision on `gpus` GPUs."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from emu_lightning.capacity.plan import Layout

    strategy = run["strategy"]
    fsdp = isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))
    if isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy.name != "FULL_SHARD":
        raise ValueError(f"strategy sharding_strategy={strategy.sharding_strategy.name}: the planner models "
                         "FULL_SHARD (weights, gradients and optimizer states divided over every GPU)")
    return Layout(world=gpus, fsdp=fsdp, checkpointed=list(getattr(strategy, "activation_checkpointing_parts", [])),
                  precision=str(precision or run["trainer"].precision))


def workload_of(system, run: dict, seq_len: int | None, images: int | None):
    """The heaviest stage-2 sample of the recipe: `max_length` tokens, `num_frames` images (a video, or as many
    interleaved images), every image regressed (Emu1's autoregressive head also regresses each `[/IMG]`)."""
    from emu_lightning.capacity.plan import Workload

    T = seq_len or run["data"].max_length
    n = images if images is not None else run["data"].num_frames
    N = system.adapter.num_tokens
    if n * (N + 2) > T:
        raise ValueError(f"{n} images × ({N} + 2) tokens do not fit in a {T}-token sequence: lower --images or "
                         "raise --seq-len")
    extra = n if system.target_space == "adapter" and system.regression_head.feeds_back else 0
    return Workload(tokens=T, images=n, regressed=n * N + extra)


def plan(recipe: str, gpus: int, gpu_memory_gib: float, peak_tflops: float, mfu: float = 0.4,
         seq_len: int | None = None, images: int | None = None, precision: str | None = None,
         headroom: float = 0.1, built: tuple | None = None) -> dict:
    """The capacity plan as a dict (what `main` prints and writes)."""
    from emu_lightning.capacity.plan import largest_batch, plan_step

    system, run = built or build(recipe)
    layout, work = layout_of(run, gpus, precision), workload_of(system, run, seq_len, images)
    trainer = run["trainer"]
    recipe_gpus = int(trainer.devices) * int(trainer.num_nodes)
    documents = run["data"].batch_size * recipe_gpus * int(trainer.accumulate_grad_batches or 1)
    per_gpu = documents / gpus
    fit = largest_batch(system, work, layout, gpu_memory_gib * GiB, headroom)
    accumulation = math.ceil(per_gpu / fit) if fit else None
    micro = math.ceil(per_gpu / accumulation) if fit else 0    # the step's share, in as few micro-batches as fit
    step = plan_step(system, work, layout, max(micro, 1))
    flops_sample = sum(step.flops_per_sample.values())
    step_flops = documents * flops_sample
    step_s = step_flops / (gpus * mfu * peak_tflops * 1e12)
    return {
        "recipe": recipe, "gpus": gpus, "gpu_memory_gib": gpu_memory_gib, "peak_tflops": peak_tflops, "mfu": mfu,
        "headroom": headroom, "precision": layout.precision, "fsdp": layout.fsdp, "checkpointed": layout.checkpointed,
        "sample": {"tokens": work.tokens, "images": work.images, "regressed": work.regressed,
                   "visual_tokens_per_image": system.adapter.num_tokens},
        "params": step.params,
        "memory_gib": {"weights": step.weights / GiB, "grads": step.grads / GiB, "optimizer": step.optimizer / GiB,
                       "gathered": step.gathered / GiB, "activations_per_sample": step.activations_per_sample / GiB,
                       "total_at_micro_batch": step.total / GiB},
        "phases_per_sample_gib": {k: v / step.batch / GiB for k, v in step.phases.items()},
        "micro_batch_fit": fit, "micro_batch": micro, "documents_per_step": documents, "documents_per_gpu": per_gpu,
        "accumulation": accumulation,
        "tflops_per_sample": {k: v / 1e12 for k, v in step.flops_per_sample.items()},
        "recompute_tflops_per_sample": step.recompute_flops_per_sample / 1e12,
        "pflops_per_step": step_flops / 1e15, "step_s": step_s,
        "tokens_per_s_per_gpu": per_gpu * work.tokens / step_s,
    }


def table(p: dict) -> str:
    """The plan as text."""
    s = p["sample"]
    lines = [f"{p['recipe']} on {p['gpus']} GPUs × {p['gpu_memory_gib']:g} GiB, {p['precision']}, "
             f"{'FSDP FULL_SHARD' if p['fsdp'] else 'replicated'}, activation checkpointing on "
             f"{p['checkpointed'] or 'no part'}",
             f"sample: {s['tokens']} tokens, {s['images']} images × {s['visual_tokens_per_image']} visual tokens, "
             f"{s['regressed']} regressed positions",
             f"{'part':<16}{'params':>10}{'trainable':>11}{'TFLOP/sample':>14}"]
    for name, n in p["params"].items():
        lines.append(f"{name:<16}{n['total'] / 1e9:>9.3f}B{n['trainable'] / 1e9:>10.3f}B"
                     f"{p['tflops_per_sample'][name]:>14.1f}")
    total, trainable = (sum(n[k] for n in p["params"].values()) for k in ("total", "trainable"))
    flops = sum(p["tflops_per_sample"].values())
    lines.append(f"{'total':<16}{total / 1e9:>9.3f}B{trainable / 1e9:>10.3f}B{flops:>14.1f}"
                 f"   (+{p['recompute_tflops_per_sample']:.1f} recomputed)")
    m = p["memory_gib"]
    lines.append(f"memory per GPU: weights {m['weights']:.2f} GiB, gradients {m['grads']:.2f}, AdamW "
                 f"{m['optimizer']:.2f}, gathered units {m['gathered']:.2f}; activations "
                 f"{m['activations_per_sample']:.2f} per sample")
    lines.append("  activation phases per sample (GiB): " + ", ".join(
        f"{k} {v:.2f}" for k, v in p["phases_per_sample_gib"].items()))
    if p["micro_batch"]:
        usable = p["gpu_memory_gib"] * (1 - p["headroom"])
        lines.append(f"largest micro-batch that fits: {p['micro_batch_fit']} ({usable:.1f} GiB usable, headroom "
                     f"{p['headroom']:.0%}); at micro-batch {p['micro_batch']}: {m['total_at_micro_batch']:.1f} GiB")
        uneven = "" if float(p["documents_per_gpu"]).is_integer() else " (uneven over the GPUs)"
        lines.append(f"step: {p['documents_per_step']} documents = {p['documents_per_gpu']:g} per GPU{uneven} = "
                     f"micro-batch {p['micro_batch']} × {p['accumulation']} accumulated; "
                     f"{p['pflops_per_step']:.1f} PFLOP; {p['step_s']:.1f} s at {p['mfu']:.0%} MFU of "
                     f"{p['peak_tflops']:g} TFLOP/s ({p['tokens_per_s_per_gpu']:.0f} tokens/s per GPU)")
    else:
        lines.append("not even one sample fits: more GPUs, bf16-true, a shorter --seq-len or fewer --images")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--gpus", type=int, nargs="+", required=True, help="one plan per GPU count")
    p.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU (H100 SXM: 80)")
    p.add_argument("--peak-tflops", type=float, required=True, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the step time assumes")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the recipe's max_length)")
    p.add_argument("--images", type=int, default=None, help="images per sample (default: the recipe's num_frames)")
    p.add_argument("--precision", default=None, help="override the recipe's trainer.precision")
    p.add_argument("--headroom", type=float, default=0.1, help="memory fraction kept free (context, buffers)")
    p.add_argument("--json", type=Path, default=None,
                   help="merge the plans into this results file, keyed '<recipe> on <gpus> GPUs' (plan.json)")
    args = p.parse_args(argv)
    if args.json and args.json.suffix != ".json":
        p.error(f"--json {args.json}: expected a results file named <name>.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    built = build(args.recipe)
    plans = [plan(args.recipe, g, args.gpu_memory, args.peak_tflops, args.mfu, args.seq_len, args.images,
                  args.precision, args.headroom, built) for g in args.gpus]
    for one in plans:
        print(table(one) + "\n")
    if args.json:
        facts = run_facts(argv)
        for one in plans:
            merge_result(args.json.stem, f"{one['recipe']} on {one['gpus']} GPUs", {**facts, **one},
                         results=args.json.parent)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
