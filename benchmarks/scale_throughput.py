"""Throughput: tokens/s and MFU per stage, FLOPs counted per component, and peak memory vs batch.

    .venv/bin/python benchmarks/scale_throughput.py [--stages stage1 stage2] [--batches B ...] [--steps 3]
        [--peak-tflops T] [--recipe R.yaml --device cuda --bf16] [--name RUN]

For each stage's debug recipe (built by the real CLI) and batch size: one training step (forward, backward,
AdamW) under `torch.utils.flop_counter.FlopCounterMode` gives the FLOPs of each part (frozen encoder forward
only; adapter, LLM, head forward + backward); the fastest of `--steps` timed steps gives tokens/s (non-pad
tokens; the median is kept too) and MFU = achieved FLOP/s / `--peak-tflops`. Memory: parameters + gradients +
AdamW states (counted) and the activations autograd saves (measured with saved-tensor hooks), i.e. the training
step's peak on an accelerator without fragmentation.
`--recipe` times another recipe (e.g. a ~1B stage-2 one) the same way; `--device cuda` moves the system and batch
to the GPU, reports `torch.cuda.max_memory_allocated` as the measured peak, and needs `--peak-tflops` (H100 bf16
dense: 989).
The rows merge under `--name` (default: the stages or recipe, the device and bf16, e.g. `stage1+stage2_cpu`)
into benchmarks/results/scale_throughput.json, with the command, date, machine and wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from results_io import merge_result, run_facts

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"stage1": "recipes/debug/stage1_meanpool.yaml", "stage2": "recipes/debug/stage2_meanpool.yaml"}


def build(recipe: str, B: int):
    from emu_lightning.cli import cli_main

    cli = cli_main(["--config", str(ROOT / recipe), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                    "--trainer.strategy", "auto", "--trainer.logger", "false", "--data.init_args.batch_size",
                    str(B), "--data.init_args.num_workers", "0"], run=False)
    cli.datamodule.setup("fit")
    return cli.model, next(iter(cli.datamodule.train_dataloader()))


def loss_of(system, batch: dict) -> torch.Tensor:
    return system.loss_terms(batch)["loss"] if hasattr(system, "loss_terms") else system.losses(batch)["loss"]


def flops_per_part(system, batch: dict) -> dict[str, int]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        loss_of(system, batch).backward()
    counts = counter.get_flop_counts()
    # A part is named "<System>.<part>" when reached through the system's forward, or by its class when the step
    # calls it directly (stage 2's loss_terms); whatever runs outside the parts is "other".
    names = {name: {f"{type(system).__name__}.{name}", type(part).__name__} for name, part in system.parts.items()}
    out = {name: sum(sum(ops.values()) for k, ops in counts.items() if k in keys) for name, keys in names.items()}
    out["total"] = sum(counts.get("Global", {}).values())
    out["other"] = out["total"] - sum(out[name] for name in names)
    system.zero_grad(set_to_none=True)
    return out


def memory(system, batch: dict) -> dict[str, float]:
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes() if t.device.type != "meta" else 0)
        return t

    params = sum(p.numel() * p.element_size() for p in system.parameters())
    trainable = sum(p.numel() * p.element_size() for p in system.parameters() if p.requires_grad)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(system, batch)
    loss.backward()
    system.zero_grad(set_to_none=True)
    # grads (1×) + AdamW exp_avg, exp_avg_sq (2×) of the trainable weights
    return {"params_mb": params / 2**20, "grads_adam_mb": 3 * trainable / 2**20,
            "activations_mb": sum(saved) / 2**20, "peak_mb": (params + 3 * trainable + sum(saved)) / 2**20}


def matmul_tflops(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """What a large fp32 matmul reaches here: the practical ceiling that MFU is read against."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(label: str, recipe: str, batches: list[int], steps: int, peak_tflops: float, device: torch.device,
        bf16: bool) -> list[dict]:
    rows = []
    for B in batches:
        system, batch = build(recipe, B)
        system.to(device).train()
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        optim = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=1e-5)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        tokens = int((batch["attention_mask"] > 0).sum())   # packed masks number documents
        with autocast:
            flops = flops_per_part(system, batch)
            mem = memory(system, batch)

        def step() -> None:
            with autocast:
                loss = loss_of(system, batch)
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)

        step()   # warm-up (and AdamW state allocation)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):   # each step timed alone: on a shared machine the fastest is the least disturbed
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        dt = min(times)
        if device.type == "cuda":
            mem["measured_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        rows.append({"stage": label, "batch": B, "tokens": tokens, "step_s": dt,
                     "median_step_s": sorted(times)[len(times) // 2], "tokens_per_s": tokens / dt,
                     "tflops_per_step": flops["total"] / 1e12, "achieved_gflops": flops["total"] / dt / 1e9,
                     "mfu": flops["total"] / dt / (peak_tflops * 1e12),
                     "flops_share": {k: v / flops["total"] for k, v in flops.items() if k != "total"}, **mem})
        print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", nargs="+", default=["stage1", "stage2"], choices=sorted(RECIPES))
    p.add_argument("--recipe", default=None, help="time this recipe instead of the debug stages")
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="batch sizes; default stage1 2 4 8, stage2 8 16 (its 4 sources need 8 for one sample each)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as precision: bf16-mixed)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="accelerator peak (TFLOP/s); default: CPU threads × 2.6 GHz × 32 fp32 FLOP/cycle (this "
                        "machine's AMD EPYC: AVX-512 on two 256-bit FMA pipes)")
    p.add_argument("--name", default=None, help="the run's key in benchmarks/results/scale_throughput.json")
    args = p.parse_args()
    start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    if device.type != "cpu" and args.peak_tflops is None:
        raise ValueError(f"--device {args.device}: give the accelerator's --peak-tflops (H100 SXM bf16 dense: 989)")
    peak = args.peak_tflops or torch.get_num_threads() * 2.6e9 * 32 / 1e12
    matmul = matmul_tflops(device)
    default = {"stage1": [2, 4, 8], "stage2": [8, 16]}
    jobs = ([(Path(args.recipe).stem, args.recipe, args.batches or [8])] if args.recipe else
            [(s, RECIPES[s], args.batches or default[s]) for s in args.stages])
    rows = [r for label, recipe, batches in jobs
            for r in run(label, recipe, batches, args.steps, peak, device, args.bf16)]
    name = args.name or "_".join([Path(args.recipe).stem if args.recipe else "+".join(args.stages), args.device,
                                  *(["bf16"] if args.bf16 else [])])
    entry = {**run_facts(), "wall_s": round(time.perf_counter() - start, 1), "steps": args.steps,
             "peak_tflops": peak, "matmul_tflops": matmul, "threads": torch.get_num_threads(), "device": args.device,
             "bf16": args.bf16, "rows": rows}
    out = merge_result("scale_throughput", name, entry)
    print(f"peak {peak:.3f} TFLOP/s assumed, a large matmul reaches {matmul:.3f}; wrote {out} [{name!r}]")


if __name__ == "__main__":
    main()
