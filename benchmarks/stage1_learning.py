"""Stage-1 learning benchmark: fit a debug recipe on the synthetic scenes on CPU, then score captions on the
val split and the held-out color-shape split with CIDEr-D and attribute accuracy.

    python benchmarks/stage1_learning.py --recipe recipes/debug/stage1_cformer.yaml --steps 6000 --threads 1
    python benchmarks/stage1_learning.py --report    # table of every run in benchmarks/results/stage1_learning.json
    python benchmarks/stage1_learning.py --recipe ... --name NAME --ckpt PATH   # re-score a finished run

Each run merges its entry (command, date, machine, steps, wall time, steps/s, metrics) under its name into
benchmarks/results/stage1_learning.json; its overlay and TensorBoard logs (checkpoints) go to
benchmarks/out/<name>.overlay.yaml and benchmarks/out/runs/<name>.
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

ROOT = Path(__file__).resolve().parents[1]
NAME = "stage1_learning"   # benchmarks/results/stage1_learning.json
COLUMNS = ["cider_greedy", "shape_acc_greedy", "color_acc_greedy", "size_acc_greedy", "position_acc_greedy",
           "all_acc_greedy", "count_acc_greedy", "pair_shape_acc_greedy", "pair_color_acc_greedy",
           "cider_beam", "shape_acc_beam", "color_acc_beam"]


def overlay(name: str, steps: int, eval_size: int, val_every: int) -> Path:
    synth = lambda split: {"class_path": "emu_lightning.data.synthetic.scenes.SyntheticCaptions",  # noqa: E731
                           "init_args": {"split": split, "size": eval_size, "image_size": 64}}
    cfg = {"trainer": {"max_steps": steps, "val_check_interval": val_every, "enable_progress_bar": False,
                       "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": str(OUT / "runs"), "name": name}}},
           "data": {"init_args": {"val": {"val": synth("val"), "heldout": synth("heldout")},
                                  "train": {"class_path": "emu_lightning.data.synthetic.scenes.SyntheticCaptions",
                                            "init_args": {"split": "train", "size": 1_000_000, "image_size": 64}}}}}
    path = OUT / f"{name}.overlay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(recipe: str, steps: int, threads: int, eval_size: int, name: str | None, extra: list[str]) -> dict:
    from emu_lightning.cli import cli_main

    torch.set_num_threads(threads)
    name = name or Path(recipe).stem
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.time()
    cli = cli_main(["fit", "--config", recipe, "--config", str(overlay(name, steps, eval_size, steps // 4)),
                    "--data.init_args.num_workers", "1", *extra])
    wall = time.time() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    result = {"name": name, **run_facts(), "recipe": recipe, "steps": cli.trainer.global_step,
              "overrides": extra, "wall_s": round(wall, 1),
              "steps_per_s": round(cli.trainer.global_step / wall, 2), "threads": threads, "eval_size": eval_size,
              "logs": os.path.relpath(cli.trainer.log_dir or OUT / "runs" / name, ROOT), "metrics": metrics}
    merge_result(NAME, name, result)
    return result


def rescore(recipe: str, name: str, ckpt: str, threads: int, eval_size: int, extra: list[str]) -> dict:
    """Validate a finished run's checkpoint with the current code; the metrics replace those of run `name`."""
    from emu_lightning.cli import cli_main

    torch.set_num_threads(threads)
    runs = read_results(NAME)
    if name not in runs:
        raise ValueError(f"run {name!r} is not in benchmarks/results/{NAME}.json (runs: {sorted(runs)})")
    result = runs[name]
    cli = cli_main(["validate", "--config", recipe, "--config", str(overlay(name + "_rescore", 1, eval_size, 1)),
                    "--ckpt_path", ckpt, *extra])
    result["metrics"] = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    result["rescored"] = {"from": ckpt, **run_facts()}
    merge_result(NAME, name, result)
    return result


def report() -> str:
    rows = [{"name": k, **r} for k, r in sorted(read_results(NAME).items())]
    head = "| run | steps | steps/s | split | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        for split in ("val", "heldout"):
            vals = [r.get("metrics", {}).get(f"{split}/{c}", float("nan")) for c in COLUMNS]   # stopped runs: none
            steps = r.get("steps", r.get("stopped_at_step"))
            lines.append(f"| {r['name']} | {steps} | {r.get('steps_per_s')} | {split} | "
                         + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/debug/stage1_cformer.yaml")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--name")
    p.add_argument("--report", action="store_true")
    p.add_argument("--ckpt", help="re-score this checkpoint of run --name instead of training")
    a, extra = p.parse_known_args()  # anything else is a CLI override, e.g. --data.init_args.batch_size 16
    if a.ckpt:
        rescore(a.recipe, a.name, a.ckpt, a.threads, a.eval_size, extra)
    elif not a.report:
        r = run(a.recipe, a.steps, a.threads, a.eval_size, a.name, extra)
        print(json.dumps({k: v for k, v in r.items() if k != "metrics"}))
    print(report())


if __name__ == "__main__":
    main()
