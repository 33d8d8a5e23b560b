"""One command, a few minutes, one CUDA GPU: what this platform reaches there.

    .venv/bin/python benchmarks/gpu_check.py [--peak-tflops T] [--steps 300] [--batch 16] [--batches 1 4 16 32]
    .venv/bin/python benchmarks/gpu_check.py --dry-run     # the same code on CPU at test size, in seconds

1. Training: the ~1B stage-2 model (recipes/debug/stage2_meanpool.yaml + benchmarks/configs/gpu_check_1b.overlay.yaml)
   under Lightning's FSDP strategy (`EmuFSDPStrategy`: one unit per block, activation checkpointing on the adapter
   and LLM blocks) in bf16-mixed, `--steps` steps on packed rows of 512 tokens (synthetic captions, collated once
   and cycled, so the data pipeline is not what is timed): tokens/s (non-padding tokens) and MFU = the capacity
   model's FLOPs per step (emu_lightning/capacity/, checked against the FLOP counter) / step time / the card's
   dense bf16 peak (`PEAK_BF16_TFLOPS`, by device name).
2. VRAM table: a few steps per micro-batch size, `torch.cuda.max_memory_allocated` beside the capacity plan's
   prediction for the same step (a size that runs out of memory is marked OOM).
3. Generation: 64 visual embeddings after a short prompt with the KV cache and by the official full recompute,
   alternately (the ratio of their medians), on the same ~1B model.
4. Decoder: images/s of the Emu1 decoder architecture (SD1.5 UNet, 512 px, its recipe's sampler and steps,
   random weights: benchmarks/configs/no_pretrained.overlay.yaml).
Writes benchmarks/results/gpu.json (one check per file, with command, date, machine; a dry run:
benchmarks/out/gpu_check_dry_run.json). `--dry-run` runs every step on CPU with the tiny overlay and the debug
decoder; Lightning's FSDP (FSDP1) needs an accelerator, so the dry run trains under its FSDP2 twin
(`EmuModelParallelStrategy`) and has no allocator statistics (the VRAM table holds the plan only).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # imported as `benchmarks.gpu_check` by the tests
from results_io import run_facts, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGE2 = ROOT / "recipes" / "debug" / "stage2_meanpool.yaml"
CONFIGS = ROOT / "benchmarks" / "configs"
CHECKPOINTED = ["adapter", "llm"]
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets; the first name contained in
# `torch.cuda.get_device_name()` wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H100", 989.4), ("H200", 989.4),
                    ("A100", 312.0))
SIZES = {
    "gpu": dict(overlay=CONFIGS / "gpu_check_1b.overlay.yaml", pack=512, steps=300, warmup=30, batch=16,
                batches=(1, 4, 16, 32), table_steps=6, rounds=3,
                decoder=[ROOT / "recipes" / "emu1" / "decoder.yaml", CONFIGS / "no_pretrained.overlay.yaml"],
                decoder_batch=4, decoder_steps=None),
    "dry": dict(overlay=CONFIGS / "gpu_check_tiny.overlay.yaml", pack=64, steps=2, warmup=1, batch=2,
                batches=(2,), table_steps=1, rounds=1, decoder=[ROOT / "recipes" / "debug" / "decoder.yaml"],
                decoder_batch=1, decoder_steps=1),
}


def peak_tflops(device: torch.device) -> tuple[float, str]:
    """The device's dense bf16 peak and its name; on CPU an estimate (threads × 2.6 GHz × 32 FLOP/cycle)."""
    if device.type == "cpu":
        return torch.get_num_threads() * 2.6e9 * 32 / 1e12, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, name
    raise ValueError(f"no bf16 peak known for {name!r} (known: {[k for k, _ in PEAK_BF16_TFLOPS]}): "
                     "give --peak-tflops")


def build_stage2(overlay: Path):
    from emu_lightning.cli import cli_main

    cli = cli_main(["--config", str(STAGE2), "--config", str(overlay), "--trainer.logger", "false"], run=False)
    return cli.model


def packed_batch(system, rows: int, pack: int, docs: list[dict]) -> dict:
    """`rows` packed rows of up to `pack` tokens from the first documents of `docs` (synthetic captions)."""
    from emu_lightning.data.layout.packing import PackingCollator
    from emu_lightning.data.layout.sequence import SequenceCollator

    collate = PackingCollator(SequenceCollator(system.tokenizer, system.num_image_tokens, max_length=pack))
    lo, hi = 1, len(docs)                  # the most documents that fill no more than `rows` rows (bisection)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(collate(docs[:mid])["input_ids"]) <= rows else (lo, mid - 1)
    n = lo
    batch = collate(docs[:n])
    if len(batch["input_ids"]) != rows:
        raise ValueError(f"{len(docs)} documents do not fill {rows} rows of {pack} tokens")
    return batch


def caption_docs(system, count: int, seed_split: str = "train") -> list[dict]:
    from emu_lightning.data.layout.sequence import Layout
    from emu_lightning.data.modules.captions import image_transform
    from emu_lightning.data.synthetic.scenes import SyntheticCaptions

    tf, layout = image_transform(system.encoder.img_size), Layout("pair", train=False)
    return [{"id": s["id"], "source": "pairs", "segments": layout({**s, "image": tf(s["image"])})}
            for s in SyntheticCaptions(split=seed_split, size=count, image_size=system.encoder.img_size)]


def strategy_for(device: torch.device):
    from emu_lightning.systems.sharding import EmuFSDPStrategy, EmuModelParallelStrategy

    if device.type == "cuda":
        return EmuFSDPStrategy(activation_checkpointing_parts=CHECKPOINTED, sharding_strategy="FULL_SHARD")
    return EmuModelParallelStrategy(activation_checkpointing_parts=CHECKPOINTED, param_dtype="bfloat16")


def train(template, batches: list[dict], steps: int, warmup: int, device: torch.device) -> dict:
    """Fit a fresh copy of `template` for `steps` steps cycling `batches`; the time of the steps after `warmup`,
    tokens/s and (CUDA) the peak allocated bytes."""
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    class Cycle(Dataset):
        def __len__(self) -> int:
            return steps

        def __getitem__(self, i: int) -> dict:
            return batches[i % len(batches)]

    marks: dict[str, float] = {}

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step in (warmup, steps):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                marks[str(trainer.global_step)] = time.perf_counter()

    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        strategy=strategy_for(device), precision="bf16-mixed", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[Clock()])
    baseline = 0
    if device.type == "cuda":               # what earlier fits left allocated is not this fit's
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    trainer.fit(copy.deepcopy(template), train_dataloaders=DataLoader(Cycle(), batch_size=None))
    step_s = (marks[str(steps)] - marks[str(warmup)]) / (steps - warmup)
    tokens = statistics.mean(int((b["attention_mask"] > 0).sum()) for b in batches)
    peak = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None
    return {"step_s": step_s, "tokens_per_step": tokens, "tokens_per_s": tokens / step_s, "peak_bytes": peak}


def planned(template, batch: dict) -> Any:
    """The capacity plan of one step on `batch`: one GPU, FSDP, bf16-mixed, the checkpointed parts."""
    from emu_lightning.capacity.plan import Layout, Workload, plan_step

    return plan_step(template, Workload.of_batch(template, batch),
                     Layout(world=1, fsdp=True, checkpointed=CHECKPOINTED, precision="bf16-mixed"),
                     len(batch["input_ids"]))


def autocast(device: torch.device):
    """bf16 autocast on CUDA, as a bf16 deployment runs; none on CPU (where bf16 convolutions are emulated)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def timed_pair(a, b, rounds: int) -> tuple[float, float]:
    """Medians of `a` and `b` run alternately (a b, b a, ...) after one warm-up round each."""
    times: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(rounds + 1):
        for key in ("ab" if r % 2 == 0 else "ba"):
            t0 = time.perf_counter()
            (a if key == "a" else b)()
            if r:
                times[key].append(time.perf_counter() - t0)
    return statistics.median(times["a"]), statistics.median(times["b"])


def generation(template, device: torch.device, rounds: int, batch: int = 4) -> dict:
    """KV-cached vs full-recompute generation of one image's embeddings after a short prompt."""
    system = copy.deepcopy(template).to(device).eval()
    image = caption_docs(system, 1, "val")[0]["segments"]
    pixels = next(s[1] for s in image if s[0] == "image")
    docs = [[("text", "a small red circle in the top left."), ("image", pixels), ("text", "then it turns blue.")]]
    docs *= batch

    def run(use_cache: bool):
        def go() -> None:
            with torch.no_grad(), autocast(device):
                system.generate_image_embeddings(docs, use_cache=use_cache)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return go

    cache, recompute = timed_pair(run(True), run(False), rounds)
    prompt = system._prompt(docs, [system.ids.img])[0].shape[1]
    return {"visual_tokens": system.num_image_tokens, "prompt_tokens": prompt, "batch": batch, "cache_s": cache,
            "recompute_s": recompute, "ratio": recompute / cache}


def decoder_rate(configs: list[Path], device: torch.device, batch: int, steps: int | None, rounds: int) -> dict:
    """Images/s of a decoder recipe's sampling (its sampler, steps and guidance unless `steps` is given)."""
    from emu_lightning.cli import cli_main
    from emu_lightning.data.modules.captions import image_transform
    from emu_lightning.data.synthetic.scenes import SyntheticCaptions

    args = [a for c in configs for a in ("--config", str(c))]
    cli = cli_main([*args, "--data.init_args.train", "null", "--data.init_args.val", "null", "--data.init_args.test",
                    "null", "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                    "--trainer.strategy", "auto", "--trainer.logger", "false"], run=False)
    decoder = cli.model.to(device).eval()
    tf = image_transform(decoder.encoder.img_size)
    pixels = torch.stack([tf(s["image"]) for s in SyntheticCaptions(split="val", size=batch,
                                                                    image_size=decoder.encoder.img_size)])
    steps = steps or decoder.sample_steps

    def sample() -> None:
        with torch.no_grad(), autocast(device):
            cond = decoder.condition(pixels.to(device))
            decoder.decode(cond, None, steps, generator=torch.Generator().manual_seed(0),
                           null=decoder.null_embedding(cond))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seconds, _ = timed_pair(sample, lambda: None, rounds)
    return {"recipe": [str(Path(c).relative_to(ROOT)) for c in configs], "image_size": decoder.image_size,
            "sampler": decoder.sampler, "steps": steps, "guidance": decoder.guidance_scale, "batch": batch,
            "batch_s": seconds, "images_per_s": batch / seconds}


def run(dry_run: bool, out: Path, peak: float | None = None, steps: int | None = None, batch: int | None = None,
        batches: list[int] | None = None, facts: dict | None = None) -> dict:
    size = dict(SIZES["dry" if dry_run else "gpu"])
    size.update({k: v for k, v in (("steps", steps), ("batch", batch), ("batches", batches)) if v})
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run runs on CPU")
    device = torch.device("cpu" if dry_run else "cuda")
    known_peak, name = peak_tflops(device)
    peak = peak or known_peak
    start = time.perf_counter()
    print(f"gpu_check on {name}: bf16 peak {peak:g} TFLOP/s; strategy {type(strategy_for(device)).__name__}"
          + (" (Lightning's FSDP needs an accelerator: the dry run uses the FSDP2 twin)" if dry_run else ""))
    template = build_stage2(size["overlay"])
    sizes = sorted({*size["batches"], size["batch"]})
    docs = caption_docs(template, max(sizes) * (size["pack"] // 64 + 1))   # a caption document: ≥ 64 tokens
    table, main = [], None
    for b in sizes:
        batch_b = packed_batch(template, b, size["pack"], docs)
        plan = planned(template, batch_b)
        long = b == size["batch"]
        try:
            got = train(template, [batch_b], size["steps"] if long else size["table_steps"] + 1,
                        size["warmup"] if long else 1, device)
        except torch.OutOfMemoryError:
            got = None
            torch.cuda.empty_cache()
        row = {"batch": b, "tokens": int((batch_b["attention_mask"] > 0).sum()), "planned_gib": plan.total / 2**30,
               "measured_gib": got and got["peak_bytes"] and got["peak_bytes"] / 2**30,
               "tokens_per_s": got and got["tokens_per_s"], "oom": got is None}
        row["measured_over_planned"] = row["measured_gib"] and row["measured_gib"] / row["planned_gib"]
        table.append(row)
        print(json.dumps(row))
        if long and got:
            flops = sum(plan.flops_per_sample.values()) * b
            main = {"batch": b, "steps": size["steps"], **got, "tflops_per_step": flops / 1e12,
                    "mfu": flops / got["step_s"] / (peak * 1e12)}
    params = {k: sum(p.numel() for p in v.parameters()) for k, v in template.parts.items()}
    result = {**(facts or {}), "device": name, "peak_tflops": peak, "dry_run": dry_run, "params": params,
              "strategy": type(strategy_for(device)).__name__, "precision": "bf16-mixed",
              "checkpointed": CHECKPOINTED, "pack_length": size["pack"], "train": main, "vram": table,
              "generation": generation(template, device, size["rounds"]),
              "decoder": decoder_rate(size["decoder"], device, size["decoder_batch"], size["decoder_steps"],
                                      size["rounds"])}
    result["wall_s"] = time.perf_counter() - start
    if torch.distributed.is_initialized():      # the one-process group the strategies opened
        torch.distributed.destroy_process_group()
    write_json(out, result)
    return result


def report(r: dict) -> str:
    """The results as text."""
    lines = [f"{r['device']}: {r['strategy']}, {r['precision']}, activation checkpointing on {r['checkpointed']}, "
             f"rows of {r['pack_length']} tokens; {sum(r['params'].values()) / 1e9:.2f} B parameters"]
    t = r["train"]
    if t:
        lines.append(f"train: micro-batch {t['batch']}, {t['steps']} steps: {t['step_s'] * 1e3:.1f} ms/step, "
                     f"{t['tokens_per_s']:.0f} tokens/s, {t['tflops_per_step']:.2f} TFLOP/step, MFU {t['mfu']:.1%} "
                     f"of {r['peak_tflops']:g} TFLOP/s")
    lines.append("| micro-batch | tokens | measured GiB | planned GiB | measured / planned | tokens/s |")
    lines.append("|---|---|---|---|---|---|")
    for row in r["vram"]:
        def fmt(v, spec):
            return "OOM" if row["oom"] else "–" if v is None else format(v, spec)
        lines.append(f"| {row['batch']} | {row['tokens']} | {fmt(row['measured_gib'], '.2f')} | "
                     f"{row['planned_gib']:.2f} | {fmt(row['measured_over_planned'], '.2f')} | "
                     f"{fmt(row['tokens_per_s'], '.0f')} |")
    g, d = r["generation"], r["decoder"]
    lines.append(f"generation: {g['visual_tokens']} embeddings after a {g['prompt_tokens']}-token prompt, batch "
                 f"{g['batch']}: KV cache {g['cache_s']:.3f} s, full recompute {g['recompute_s']:.3f} s, "
                 f"{g['ratio']:.1f}×")
    lines.append(f"decoder: {d['image_size']} px, {d['sampler']} {d['steps']} steps, batch {d['batch']}: "
                 f"{d['images_per_s']:.2f} images/s")
    lines.append(f"wall time {r['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same code on CPU at test size")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
    p.add_argument("--steps", type=int, default=None, help="training steps of the throughput run")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (packed rows) of the throughput run")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="micro-batches of the VRAM table")
    p.add_argument("--out", type=Path, default=None,
                   help="default benchmarks/results/gpu.json (a dry run: benchmarks/out/gpu_check_dry_run.json)")
    args = p.parse_args(argv)
    args.out = args.out or ROOT / "benchmarks" / ("out/gpu_check_dry_run.json" if args.dry_run else "results/gpu.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args.dry_run, args.out, args.peak_tflops, args.steps, args.batch, args.batches,
                 facts=run_facts(argv))
    print(report(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
