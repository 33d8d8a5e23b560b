"""Decoder sampling: our pipeline (`EmuImagePipeline` → `DecoderSystem.decode` → `sampling.sample`) vs a plain
diffusers `StableDiffusionPipeline`-style loop over the same UNet, scheduler, steps, guidance and seed.

    python benchmarks/perf_decoder.py --batch 8 --rounds 5 --threads 2

Model: the debug decoder recipe (`recipes/debug/decoder.yaml`: 32-px pixel-space UNet, 16 × 192 pooled tokens,
grid path, EMA denoiser), random weights; the conditions are the frozen encoder's pooled tokens of synthetic
val images, the null is the decoder's own (features of an all-zero image), computed once outside both loops.
The plain loop is what diffusers' pipelines do: the condition prepared once (the `cond_norm` LayerNorm and
the grid path's upsampled map, as SD's upscaler pipeline concatenates its image condition each step), then
per step `cat([x] * 2)`, `scale_model_input`, the UNet, the CFG combination and `scheduler.step`. Outputs are
compared (max abs difference, images in [0, 1]).
Run alone, the rows (with command, date, machine, wall time) merge under the run's UTC start time into
benchmarks/results/perf_decoder.json; inside `benchmarks/perf.py` they go to that run's results.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import torch
import torch.nn.functional as F

from perf_common import Row, fmt_s, interleaved, machine, min_ratio, ratio_stats, set_threads, table
from results_io import merge_result, run_facts, run_key


@torch.no_grad()
def plain_diffusers(denoiser, scheduler, cond, null, shape, steps: int, guidance: float, seed: int):
    """A StableDiffusionPipeline-style sampling loop written out (the UNet wrapper's prepare step inlined)."""
    unet = denoiser.unet                                                    # UNet2DConditionModel
    gen = torch.Generator().manual_seed(seed)
    do_cfg = guidance != 1.0
    states = denoiser.norm(torch.cat([null.expand_as(cond), cond]) if do_cfg else cond)  # "encode_prompt", once
    extra = None
    if denoiser.grid_channels:                                              # image condition, concatenated each step
        B2, N, D = states.shape
        side = math.isqrt(N)
        grid = denoiser.grid_proj(states.transpose(1, 2).reshape(B2, D, side, side))
        extra = F.interpolate(grid, size=shape[-2:], mode="nearest")
    scheduler.set_timesteps(steps)
    latents = torch.randn(shape, generator=gen).to(cond) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if extra is not None:
            model_input = torch.cat([model_input, extra], dim=1)
        noise_pred = unet(model_input, t, encoder_hidden_states=states).sample
        if do_cfg:
            noise_uncond, noise_cond = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance * (noise_cond - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, generator=gen).prev_sample
    return ((latents + 1) / 2).clamp(0, 1)                                 # pixel space: the sample is the image


def build(batch: int):
    from emu_lightning.cli import cli_main
    from emu_lightning.data.modules.captions import image_transform
    from emu_lightning.data.synthetic.scenes import SyntheticCaptions

    cli = cli_main(["--config", "recipes/debug/decoder.yaml", "--trainer.logger", "false"], run=False)
    decoder = cli.model.eval()
    ds = SyntheticCaptions(split="val", size=batch, image_size=64)
    transform = image_transform(decoder.encoder.img_size)
    pixels = torch.stack([transform(ds[i]["image"]) for i in range(batch)])
    cond = decoder.condition(pixels)
    return decoder, cond, decoder.null_embedding(cond)


def run(batch: int = 8, rounds: int = 5, threads: int = 2, cases: tuple[str, ...] = ("ddim:25:1.5", "euler:25:3.0"),
        seed: int = 0) -> list[Row]:
    set_threads(threads)
    from components.decoder.sampling import make_scheduler
    from emu_lightning.inference.pipelines import EmuImagePipeline

    decoder, cond, null = build(batch)
    pipe = EmuImagePipeline(decoder)
    shape = (batch, decoder.space.channels, decoder.unet.sample_size, decoder.unet.sample_size)
    rows = []
    for case in cases:
        sampler, steps, guidance = case.split(":")
        steps, guidance = int(steps), float(guidance)
        ref = make_scheduler(sampler, decoder.schedule)
        outs = {}

        def ours():
            outs["ours"] = pipe._decode(cond, null, guidance, steps, sampler, seed)

        def plain():
            scheduler = type(ref).from_config(ref.config)   # a fresh diffusers scheduler, as a pipeline holds one
            outs["plain"] = plain_diffusers(decoder.denoiser(), scheduler, cond, null, shape, steps, guidance, seed)

        times = interleaved({"plain": plain, "ours": ours}, rounds=rounds, warmup=1)
        diff = (outs["ours"] - outs["plain"]).abs().max().item()
        r, lo, hi = ratio_stats(times["ours"], times["plain"])
        rows.append(Row("decoder sampling", f"{sampler} {steps} steps, CFG {guidance}, batch {batch}, "
                        f"{decoder.image_size} px", r, "≤ 1.05", f"plain diffusers {fmt_s(statistics.median(times['plain']))}",
                        f"ours {fmt_s(statistics.median(times['ours']))}", f"{lo:.3f}–{hi:.3f}", rounds,
                        f"max abs diff of the images {diff:.1e}", ratio_min=min_ratio(times["ours"], times["plain"])))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", nargs="+", default=["ddim:25:1.5", "euler:25:3.0"], help="sampler:steps:guidance")
    a = p.parse_args()
    key, start = run_key(), time.perf_counter()
    rows = run(a.batch, a.rounds, a.threads, tuple(a.cases))
    print(machine())
    print(table(rows))
    entry = {**run_facts(), "wall_s": round(time.perf_counter() - start, 1),
             "rows": [dataclasses.asdict(r) for r in rows]}
    print(f"wrote {merge_result('perf_decoder', key, entry)} [{key!r}]")


if __name__ == "__main__":
    main()
