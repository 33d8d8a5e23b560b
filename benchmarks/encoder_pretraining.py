"""Encoder pretraining benchmark: does CLIP-style stage 0 teach the debug encoder object shape faster than stage-1
captioning does? (docs/encoder_pretraining.md)

Trains `recipes/debug/stage0_clip.yaml` for --steps on CPU (steps/s measured), then probes the frozen encoder's 64
tokens (8×8 grid, width 192) for per-cell shape and color with the probe of `benchmarks/decoder_learning.py`
(linear and one-hidden-layer MLP on the flattened tokens, standardised; trained on train renders, scored per object
on val). The same probe reads any other run's encoder (`--probe-ckpt`), e.g. the 1600-step stage-1 run whose tokens
probed shape 0.566 (benchmarks/RESULTS.md, "the tuned decoder continued").

    python benchmarks/encoder_pretraining.py --steps 480 --name stage0_clip
    python benchmarks/encoder_pretraining.py --steps 240 --name stage0_clip_shapeneg \
        --model.init_args.shape_negatives true
    python benchmarks/encoder_pretraining.py --name stage0_clip --run benchmarks/out/runs/stage0_clip/version_0
                                                                    # re-probe a finished run (its logs give steps/s)
    python benchmarks/encoder_pretraining.py --name stage1_meanpool_1600 \
        --probe-ckpt benchmarks/out/runs/stage1_meanpool/version_0/checkpoints/last.ckpt
    python benchmarks/encoder_pretraining.py --name stage0_init --probe-ckpt none     # the untrained encoder

The probe is linear by default; `--mlp` adds the one-hidden-layer probe (~20× slower: ~20 min per attribute on one
core). Each arm is one entry of benchmarks/results/encoder_pretraining.json (`results_io`); TensorBoard logs and
checkpoints under benchmarks/out/runs.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from components.adapters.meanpool import MeanPoolProjector
from decoder_learning import probe
from results_io import BENCHMARKS, OUT, merge_result, run_facts

NAME = "encoder_pretraining"   # benchmarks/results/encoder_pretraining.json
RECIPE = "recipes/debug/stage0_clip.yaml"


class _Tokens(torch.nn.Module):
    """The probe's view of an encoder: `condition(x)` = its raw (B,64,192) tokens, what stage 1's mean-pool reads, or
    with `pool` those tokens mean-pooled to a pool×pool grid (what the debug mean-pool adapter projects into the LLM)."""

    def __init__(self, encoder: torch.nn.Module, pool: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooler = None if pool is None else MeanPoolProjector(encoder.embed_dim, 1, grid=pool)

    def condition(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(pixels)
        return tokens if self.pooler is None else self.pooler.pool(tokens)


def encoder_of(ckpt: str | None, **overrides) -> torch.nn.Module:
    """The debug encoder (recipes/components/encoder_eva_debug.yaml), from `ckpt`'s `encoder.*` or untrained."""
    from components.encoders.eva import EVAEncoder
    from emu_lightning.checkpoints.handoff import load_parts

    spec = yaml.safe_load((BENCHMARKS.parent / "recipes/components/encoder_eva_debug.yaml").read_text())
    torch.manual_seed(0)
    encoder = EVAEncoder(**{**spec["init_args"], **overrides})
    if ckpt:
        print(load_parts({"encoder": encoder}, ckpt, {"encoder": "encoder"}), flush=True)
    return encoder.eval()


def train(name: str, steps: int, extra: list[str]) -> tuple[Path, float, dict]:
    from emu_lightning.cli import cli_main

    overlay = {"trainer": {"max_steps": steps, "val_check_interval": steps, "enable_progress_bar": False,
                           "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                      "init_args": {"save_dir": str(OUT / "runs"), "name": name}}}}
    path = OUT / f"{name}.overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    start = time.time()
    cli = cli_main(["fit", "--config", RECIPE, "--config", str(path), *extra])
    wall = time.time() - start
    val = {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if not k.startswith("train/")}
    return Path(cli.trainer.log_dir), wall, val


def logged(run_dir: Path) -> dict:
    """A finished run's steps, steps/s (first to last logged training step) and last validation values, from its
    TensorBoard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    loss = events.Scalars("train/loss")
    rate = (loss[-1].step - loss[0].step) / (loss[-1].wall_time - loss[0].wall_time)
    val = {t: round(events.Scalars(t)[-1].value, 4) for t in events.Tags()["scalars"]
           if t.split("/")[0] in ("val", "heldout")}
    return {"run": str(run_dir), "steps": loss[-1].step + 1, "steps_per_s": round(rate, 3), "val": val,
            "ckpt": str(run_dir / "checkpoints" / "last.ckpt")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=480)
    p.add_argument("--name", default="stage0_clip")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--probe-ckpt", help="probe this checkpoint's encoder instead of training ('none': untrained)")
    p.add_argument("--run", help="a finished stage-0 run dir: probe its last.ckpt, its logs give steps and steps/s")
    p.add_argument("--mlp", action="store_true", help="also the one-hidden-layer MLP probe (slow)")
    p.add_argument("--probe-train", type=int, default=2048, help="train renders of the probe")
    p.add_argument("--probe-val", type=int, default=512, help="val scenes of the probe")
    p.add_argument("--probe-steps", type=int, default=300)
    p.add_argument("--stem", choices=("patch", "conv"), help="the probed encoder's stem; default the recipe fragment's")
    p.add_argument("--pooled", type=int, metavar="GRID",
                   help="probe the tokens mean-pooled to GRID×GRID (the mean-pool adapter's input to its projection)")
    a, extra = p.parse_known_args()   # anything else is a CLI override of the recipe
    torch.set_num_threads(a.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    result: dict = run_facts()
    if a.run:
        result.update(logged(Path(a.run)))
        ckpt = result["ckpt"]
    elif a.probe_ckpt:
        ckpt = None if a.probe_ckpt == "none" else a.probe_ckpt
        result["ckpt"] = ckpt
    else:
        run_dir, wall, val = train(a.name, a.steps, extra)
        ckpt = str(run_dir / "checkpoints" / "last.ckpt")
        result.update({"recipe": RECIPE, "overrides": extra, "steps": a.steps, "wall_s": round(wall, 1),
                       "steps_per_s": round(a.steps / wall, 3), "run": str(run_dir), "ckpt": ckpt, "val": val})
        print(f"{a.steps} steps in {wall:.0f} s ({a.steps / wall:.2f} steps/s); {val}", flush=True)
    start = time.time()
    kinds = ("linear", "mlp") if a.mlp else ("linear",)
    scores = probe(_Tokens(encoder_of(ckpt, **({"stem": a.stem} if a.stem else {})), a.pooled), a.probe_train, a.probe_val, a.probe_steps, kinds)
    result["probe"] = {k: round(v, 3) for k, v in scores.items()}
    result["probe_setup"] = {"stem": a.stem, "n_train": a.probe_train, "n_val": a.probe_val, "steps": a.probe_steps,
                             "features": "encoder tokens (64, 192), flattened" if a.pooled is None else
                             f"encoder tokens mean-pooled to {a.pooled}x{a.pooled}, flattened", "wall_s": round(time.time() - start)}
    print(a.name, result["probe"], flush=True)
    print(f"wrote {merge_result(NAME, a.name, result)}", flush=True)


if __name__ == "__main__":
    main()
