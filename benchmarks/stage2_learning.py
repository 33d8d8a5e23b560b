"""Stage-2 learning benchmark: fit a debug stage-2 recipe on CPU from a stage-1 checkpoint, then report text CE,
regression quality (teacher-forced and free KV-cached generation), few-shot CIDEr-D, VQA and video-QA accuracy.

    python benchmarks/stage2_learning.py --recipe recipes/debug/stage2_meanpool.yaml --steps 600 --threads 1 \
        --init-from benchmarks/out/runs/stage1_meanpool/version_0/checkpoints/last.ckpt --name stage2_meanpool
    python benchmarks/stage2_learning.py --report

Each run merges its entry (command, date, machine, steps, wall time, steps/s, metrics) under its name into
benchmarks/results/stage2_learning.json; its overlay and TensorBoard logs (checkpoints) go to benchmarks/out/.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import yaml

from results_io import OUT, merge_result, read_results, run_facts
from stage1_learning import ROOT

NAME = "stage2_learning"   # benchmarks/results/stage2_learning.json

SETS = ("val_captions", "val_vqa", "val_videos")


def overlay(name: str, steps: int, eval_size: int, val_every: int) -> Path:
    synth = lambda cls, split, n: {"class_path": f"emu_lightning.data.synthetic.scenes.{cls}",  # noqa: E731
                                   "init_args": {"split": split, "size": n, "image_size": 64}}
    cfg = {"trainer": {"max_steps": steps, "val_check_interval": val_every, "enable_progress_bar": False,
                       "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": str(OUT / "runs"), "name": name}}},
           "data": {"init_args": {"val": {"val_captions": synth("SyntheticCaptions", "val", eval_size),
                                          "val_vqa": synth("SyntheticVQA", "val", eval_size),
                                          "val_videos": synth("SyntheticVideos", "val", eval_size // 2)}}}}
    path = OUT / f"{name}.overlay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(a: argparse.Namespace, extra: list[str]) -> dict:
    from emu_lightning.cli import cli_main

    torch.set_num_threads(a.threads)
    name = a.name or Path(a.recipe).stem
    OUT.mkdir(parents=True, exist_ok=True)
    init = ["--model.init_args.init_from", a.init_from] if a.init_from else []
    start = time.time()
    cli = cli_main(["fit", "--config", a.recipe, "--config", str(overlay(name, a.steps, a.eval_size, a.val_every or a.steps)),
                    "--data.init_args.num_workers", "1", *init, *extra])
    wall = time.time() - start
    result = {"name": name, **run_facts(), "recipe": a.recipe, "init_from": a.init_from,
              "steps": cli.trainer.global_step, "overrides": extra, "wall_s": round(wall, 1),
              "steps_per_s": round(cli.trainer.global_step / wall, 2), "threads": a.threads, "eval_size": a.eval_size,
              "logs": os.path.relpath(cli.trainer.log_dir or OUT / "runs" / name, ROOT),
              "metrics": {k: float(v) for k, v in cli.trainer.callback_metrics.items()}}
    merge_result(NAME, name, result)
    return result


def report() -> str:
    rows = [{"name": k, **r} for k, r in sorted(read_results(NAME).items())]
    cols = ["train text CE", "val text CE", "reg cos (teacher-forced)", "gen cos", "gen mse"]
    shots = ["k0", "k2_random", "k4_random", "k8_random", "k2_rices", "k4_rices", "k8_rices"]
    out = ["| run | steps | steps/s | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for r in rows:
        m = r["metrics"]
        vals = [m.get("train/text_loss"), m.get("val_captions/text_loss"), m.get("val_captions/regression_cos"),
                m.get("val_captions/gen_cos"), m.get("val_captions/gen_mse")]
        out.append(f"| {r['name']} | {r['steps']} | {r['steps_per_s']} | "
                   + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
    out += ["", "| run | metric | " + " | ".join(shots) + " |", "|" + "---|" * (len(shots) + 2)]
    for r in rows:
        for metric in ("val_captions/cider", "val_vqa/vqa_acc", "val_videos/videoqa_acc"):
            vals = [r["metrics"].get(f"{metric}_{s}") for s in shots]
            out.append(f"| {r['name']} | {metric} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/debug/stage2_meanpool.yaml")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--val-every", type=int, default=0, help="validation interval in steps (0: at the end only)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--init-from", help="stage-1 checkpoint handed off to the stage-2 system")
    p.add_argument("--name")
    p.add_argument("--report", action="store_true")
    a, extra = p.parse_known_args()  # anything else is a CLI override
    if not a.report:
        r = run(a, extra)
        print(json.dumps({k: v for k, v in r.items() if k != "metrics"}))
    print(report())


if __name__ == "__main__":
    main()
