"""Generation speed: N visual embeddings with the KV cache vs the official full-recompute loop, and text
generation tokens/s with and without the cache, in one run (sides alternate).

    python benchmarks/perf_generation.py --tokens 64 --batch 4 --rounds 3 --threads 2

The KV-cached side is what `generate_image_embeddings` runs (`LlamaLM.start_decoding`: static K/V buffers and
direct layer math); a third side, timed in the same rounds, runs the same loop through transformers' forward with
a `DynamicCache` (`generate_visual_cached(..., lean=False)`), the cached loop before the static-cache step.

Model: the debug stage-2 mean-pool recipe's parts (Llama D 256 × 4 layers, random weights), with the adapter grid
raised so N = `--tokens` (64: an 8 × 8 grid). Prompts: `short`, one sentence, an image and a sentence (the
prompt of `stage2_generation_speed.py`); `long`, a four-image interleaved document (`--long-images`). Both loops are
checked to agree (max abs difference). Text: greedy decoding of `--text-tokens` new tokens with no end token (every
prompt generates exactly that many), HF `generate` with `use_cache` True / False. Run alone, the rows merge into
`benchmarks/results/perf_generation.json` (`perf.py` merges its own into `results/perf.json`).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from components.generation import generate_visual_cached
from perf_common import Row, fmt_s, interleaved, machine, min_ratio, ratio_stats, set_threads, table
from results_io import merge_result, run_facts, run_key

SENTENCES = ["a small red circle in the top left.", "then it turns blue.", "a large green square moves right.",
             "the star fades on a gray background.", "two triangles meet in the middle."]


def prompts(kind: str, batch: int, n_images: int) -> list[list[tuple]]:
    g = torch.Generator().manual_seed(0)
    img = lambda: torch.randn(3, 64, 64, generator=g)  # noqa: E731  (CLIP-normalised pixels)
    if kind == "short":
        doc = [("text", SENTENCES[0]), ("image", img()), ("text", SENTENCES[1])]
    else:
        doc = []
        for i in range(n_images):
            doc += [("text", " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(3))), ("image", img())]
        doc += [("text", SENTENCES[-1])]
    return [doc] * batch


def build(tokens: int):
    from emu_lightning.cli import cli_main

    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise ValueError(f"--tokens {tokens} must be a square (the mean-pool adapter's grid²)")
    cli = cli_main(["--config", "recipes/debug/stage2_meanpool.yaml", "--model.init_args.adapter.init_args.grid",
                    str(grid), "--trainer.logger", "false"], run=False)
    return cli.model.eval()


def run(tokens: int = 64, batch: int = 4, rounds: int = 3, threads: int = 2, long_images: int = 4,
        text_tokens: int = 32) -> list[Row]:
    set_threads(threads)
    m = build(tokens)
    rows = []
    for kind in ("short", "long"):
        docs = prompts(kind, batch, long_images)
        embeds, _ = m._prompt(docs, [m.ids.img])
        T = embeds.shape[1]
        outs = {}

        def gen(use_cache, docs=docs):
            outs[use_cache] = m.generate_image_embeddings(docs, use_cache=use_cache)

        def generic(docs=docs):   # the same cached loop stepping transformers' forward with a DynamicCache
            with torch.no_grad():
                outs["generic"] = generate_visual_cached(m.llm, m.regression_head, m.feedback,
                                                         *m._prompt(docs, [m.ids.img]), m.num_image_tokens, lean=False)

        times = interleaved({"cache": lambda: gen(True), "recompute": lambda: gen(False), "generic": generic},
                            rounds=rounds, warmup=1)
        diff = (outs[True] - outs[False]).abs().max().item()
        case = f"{m.num_image_tokens} visual embeddings, {kind} prompt ({T} tokens), batch {batch}"
        r, lo, hi = ratio_stats(times["recompute"], times["cache"])
        rows.append(Row("generation", case, r, "≥ 10×", f"KV cache {fmt_s(statistics.median(times['cache']))}",
                        f"full recompute {fmt_s(statistics.median(times['recompute']))}", f"{lo:.1f}–{hi:.1f}", rounds,
                        f"max abs diff {diff:.1e}", ratio_min=min_ratio(times["recompute"], times["cache"])))
        r, lo, hi = ratio_stats(times["generic"], times["cache"])
        diff = (outs[True] - outs["generic"]).abs().max().item()
        rows.append(Row("generation", case + ": static-cache step / transformers' cached forward", r, "",
                        f"static-cache step {fmt_s(statistics.median(times['cache']))}",
                        f"cached forward {fmt_s(statistics.median(times['generic']))}", f"{lo:.2f}–{hi:.2f}", rounds,
                        "ratio = speed-up of `LlamaLM.start_decoding` over the DynamicCache loop; "
                        f"max abs diff {diff:.1e}",
                        ratio_min=min_ratio(times["generic"], times["cache"])))
    # Text: tokens/s of greedy decoding, cache on and off.
    embeds, mask = m._prompt(prompts("short", batch, long_images), [])

    def text(use_cache: bool) -> None:
        m.llm.generate(embeds, mask, max_new_tokens=text_tokens, eos_token_id=None, pad_token_id=m.ids.pad,
                       use_cache=use_cache)

    with torch.no_grad():
        times = interleaved({"cache": lambda: text(True), "recompute": lambda: text(False)}, rounds=rounds, warmup=1)
    n = batch * text_tokens
    r, lo, hi = ratio_stats(times["recompute"], times["cache"])
    rows.append(Row("generation", f"text, {text_tokens} new tokens × batch {batch}, short prompt ({embeds.shape[1]} tokens)",
                    r, "≥ 1×", f"cache {n / statistics.median(times['cache']):.0f} tokens/s",
                    f"no cache {n / statistics.median(times['recompute']):.0f} tokens/s", f"{lo:.1f}–{hi:.1f}", rounds,
                    "ratio = speed-up of the cache; no target set",
                    ratio_min=min_ratio(times["recompute"], times["cache"])))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--long-images", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=32)
    a = p.parse_args()
    key, start = run_key(), time.perf_counter()
    rows = run(a.tokens, a.batch, a.rounds, a.threads, a.long_images, a.text_tokens)
    print(machine())
    print(table(rows))
    entry = {**run_facts(), "wall_s": round(time.perf_counter() - start, 1),
             "rows": [dataclasses.asdict(r) for r in rows]}
    print(f"wrote {merge_result('perf_generation', key, entry)} [{key!r}]")


if __name__ == "__main__":
    main()
