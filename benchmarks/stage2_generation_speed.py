"""Generation speed of N visual embeddings: KV-cached loop vs the official full-recompute loop, in one run.

    python benchmarks/stage2_generation_speed.py --tokens 64 --batch 4 --threads 2

Model: the debug stage-2 mean-pool recipe's parts (Llama D 256 × 4 layers), with the adapter grid raised to 8
so N = 64. Prints one table row; both paths are also checked to agree (max abs difference). The row merges
under "N<tokens>_batch<batch>_threads<threads>" into benchmarks/results/stage2_generation_speed.json, with the
command, date and machine.
"""
from __future__ import annotations

import argparse
import time

import torch

from emu_lightning.cli import cli_main
from results_io import merge_result, run_facts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    grid = int(a.tokens ** 0.5)
    cli = cli_main(["--config", "recipes/debug/stage2_meanpool.yaml", "--model.init_args.adapter.init_args.grid",
                    str(grid), "--trainer.logger", "false"], run=False)
    m = cli.model.eval()
    img = torch.randn(3, 64, 64)
    prompts = [[("text", "a small red circle in the top left."), ("image", img), ("text", "then it turns blue.")]] * a.batch
    times = {}
    outs = {}
    for use_cache in (True, False):
        m.generate_image_embeddings(prompts[:1], use_cache=use_cache)  # warm-up
        best = float("inf")
        for _ in range(a.repeats):
            t = time.perf_counter()
            outs[use_cache] = m.generate_image_embeddings(prompts, use_cache=use_cache)
            best = min(best, time.perf_counter() - t)
        times[use_cache] = best
    diff = (outs[True] - outs[False]).abs().max().item()
    print("| N | batch | threads | KV cache (s) | full recompute (s) | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {m.num_image_tokens} | {a.batch} | {a.threads} | {times[True]:.3f} | {times[False]:.3f} | "
          f"{times[False] / times[True]:.1f}× | {diff:.2e} |")
    entry = {**run_facts(), "tokens": m.num_image_tokens, "batch": a.batch, "threads": a.threads,
             "repeats": a.repeats, "timing": "fastest of --repeats", "kv_cache_s": times[True],
             "full_recompute_s": times[False], "speedup": times[False] / times[True], "max_abs_diff": diff}
    merge_result("stage2_generation_speed", f"N{m.num_image_tokens}_batch{a.batch}_threads{a.threads}", entry)


if __name__ == "__main__":
    main()
