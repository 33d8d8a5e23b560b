"""Ablation sweeps: recipe overlays × seeds → one run folder each → a results table and plots.

    python -m emu_lightning.sweeps recipes/sweeps/adapter.yaml [--parallel 2] [--out DIR] [-- --trainer.max_steps 20]

A sweep file names a base recipe and the axes to vary (see `recipes/sweeps/*.yaml`):

    base: ../debug/stage1_cformer.yaml            # relative to the sweep file
    overrides: {trainer.max_steps: 300}            # every run (dotted keys)
    grid:                                          # cartesian product; a list, or label → value
      model.init_args.adapter: {cformer: ../components/adapter_cformer_debug.yaml,
                                meanpool: ../components/adapter_meanpool_debug.yaml}
    runs: [{name: frozen, overrides: {...}}]       # and/or an explicit list (crossed with the grid)
    seeds: [0, 1]                                  # `seed_everything`; results are mean ± std over seeds
    metrics: {val/cider_greedy: max, train/loss: min}

Each run is `main.py <subcommand> --config <base> --config <its overlay>` in a subprocess, logging to
TensorBoard under `<out>/<run>/` (so `tensorboard --logdir <out>` shows the runs side by side) with its
resolved `config.yaml`, `overlay.yaml`, `run.log` and `status.json` there. A run that fails is recorded
with its error and the others go on. Running the same command again skips finished runs and continues an
interrupted one from its `checkpoints/last.ckpt`. The table is read back from the runs' event files
(`emu_lightning/sweeps/results.py`): `results.csv` (a row per run), `results.md` (a row per configuration) and
`plots/<metric>.png`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from emu_lightning.sweeps.results import collect, plot, write_results
from emu_lightning.sweeps.spec import Run, Sweep, exit_on_sigterm, read_status, safe_name, split_passthrough

SEED_KEY = "seed_everything"
VARIANT = "variant"                                # the table column of a `runs:` entry's name
_CHILDREN: set[subprocess.Popen] = set()          # the runs in flight, stopped if the sweep itself is stopped
_STOPPING = threading.Event()
SWEEP_KEYS = {"base", "subcommand", "overrides", "grid", "runs", "seeds", "metrics", "parallel", "out"}
MODES = ("max", "min")


def _label(value: Any) -> str:
    """A short label for a grid value: a fragment path's stem, else the value itself."""
    if isinstance(value, str) and value.endswith((".yaml", ".yml")):
        return Path(value).stem
    return str(value) if not isinstance(value, (dict, list)) else json.dumps(value, sort_keys=True)


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every error names the file and the field."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"sweep file not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a sweep file is a mapping with keys {sorted(SWEEP_KEYS)}; got {type(spec).__name__}")
    unknown = sorted(set(spec) - SWEEP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; expected some of {sorted(SWEEP_KEYS)}")
    if "base" not in spec:
        raise ValueError(f"{path}: missing 'base' (the recipe the overrides apply to)")
    base = (path.parent / spec["base"]).resolve()
    if not base.is_file():
        raise FileNotFoundError(f"{path}: base recipe {spec['base']!r} not found (looked at {base})")
    axes = {}
    for key, values in (spec.get("grid") or {}).items():
        if isinstance(values, list):
            labelled = {_label(v): v for v in values}
            if len(labelled) != len(values):
                raise ValueError(f"{path}: grid.{key} has values with equal labels {values}; give label: value pairs")
        elif isinstance(values, dict):
            labelled = {str(k): v for k, v in values.items()}
        else:
            raise ValueError(f"{path}: grid.{key} must be a list or a label → value mapping; got {values!r}")
        if not labelled:
            raise ValueError(f"{path}: grid.{key} is empty")
        axes[key] = labelled
    runs = spec.get("runs") or []
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or set(run) - {"name", "overrides"} or "name" not in run:
            raise ValueError(f"{path}: runs[{i}] must be {{name: ..., overrides: {{...}}}}; got {run!r}")
    if len({r["name"] for r in runs}) != len(runs):
        raise ValueError(f"{path}: run names repeat: {[r['name'] for r in runs]}")
    metrics = spec.get("metrics") or {}
    if isinstance(metrics, list):
        metrics = {m: "min" if "loss" in m else "max" for m in metrics}
    bad = {m: mode for m, mode in metrics.items() if mode not in MODES}
    if bad:
        raise ValueError(f"{path}: metrics {bad}: the mode must be one of {MODES}")
    seeds = spec.get("seeds") or []
    if not isinstance(seeds, list):
        raise ValueError(f"{path}: seeds must be a list; got {seeds!r}")
    sweep = Sweep(path=path, base=base, subcommand=spec.get("subcommand", "fit"), axes=axes, runs=runs,
                  seeds=seeds, metrics=metrics, overrides=dict(spec.get("overrides") or {}),
                  parallel=int(spec.get("parallel", 1)),
                  out=(path.parent / spec["out"]).resolve() if spec.get("out") else None)
    if not axes and not runs and not seeds:
        raise ValueError(f"{path}: nothing to sweep: give a grid, runs or seeds")
    return sweep


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Dotted key → its last segment, or the full key where two last segments collide."""
    last = [k.split(".")[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


def expand(sweep: Sweep) -> list[Run]:
    """Every configuration (runs × grid) at every seed, in a stable order."""
    short = _short_keys(list(sweep.axes))
    grid = [dict(zip(sweep.axes, combo)) for combo in itertools.product(*(s.keys() for s in sweep.axes.values()))]
    listed = sweep.runs or [None]
    out: list[Run] = []
    for run, point in itertools.product(listed, grid):
        labels, overrides = {}, dict(sweep.overrides)
        if run is not None:
            labels[VARIANT] = run["name"]
            overrides.update(run.get("overrides") or {})
        for key, label in point.items():
            labels[short[key]] = label
            overrides[key] = sweep.axes[key][label]
        config = safe_name(",".join(v if k == VARIANT else f"{k}={v}" for k, v in labels.items())) or "base"
        for seed in sweep.seeds or [None]:
            o = dict(overrides) if seed is None else {**overrides, SEED_KEY: seed}
            name = config if seed is None else f"{config},seed={seed}"
            out.append(Run(name=safe_name(name), config=config, labels=labels, overrides=o, seed=seed))
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{sweep.path}: two runs share a folder name: {names}")
    return out


def _resolve_paths(value: Any, root: Path) -> Any:
    """Strings naming an existing file relative to the sweep file become absolute (overlays live elsewhere)."""
    if isinstance(value, dict):
        return {k: _resolve_paths(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_paths(v, root) for v in value]
    if isinstance(value, str) and not os.path.isabs(value) and (root / value).is_file():
        return str((root / value).resolve())
    return value


def overlay(run: Run, sweep: Sweep, run_dir: Path) -> dict:
    """The run's overrides as a nested YAML overlay, with its TensorBoard logger pointed at `run_dir`."""
    nested: dict = {}
    for key, value in run.overrides.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{sweep.path}: override {key!r} goes inside a non-mapping value")
        node[leaf] = _resolve_paths(value, sweep.path.parent)
    nested.setdefault("trainer", {})["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir.parent), "name": run_dir.name, "version": ""}}
    return nested


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)                   # atomic: a killed sweep never leaves half a status


def _error_summary(log: Path) -> str:
    """What went wrong, from the run's log: the CLI's `error:` block (a config fault), else the last Python
    exception line (`ValueError: ...`), else the last line."""
    lines = [ln.rstrip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    cli = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
    if cli:
        return " ".join(ln.strip() for ln in lines[cli[-1]:])[:1000]
    raised = [ln.strip() for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*", ln)]
    return (raised or lines or ["no output"])[-1][:1000]


def execute(run: Run, sweep: Sweep, out: Path, extra: list[str], threads: int) -> dict:
    """Run one configuration in a subprocess; returns (and writes) its status."""
    run_dir = out / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "overlay.yaml").write_text(yaml.safe_dump(overlay(run, sweep, run_dir), sort_keys=False))
    cmd = [sys.executable, "-c", "import sys; from emu_lightning.cli import main; sys.exit(main())", sweep.subcommand,
           "--config", str(sweep.base), "--config", str(run_dir / "overlay.yaml")]
    if sweep.subcommand == "fit":
        cmd += ["--trainer.enable_progress_bar", "false"]
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.is_file():                               # an interrupted run continues where it stopped
            cmd += ["--ckpt_path", str(last)]
    cmd += extra
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    status = {"name": run.name, "config": run.config, "labels": run.labels, "overrides": run.overrides,
              "seed": run.seed, "state": "running", "command": cmd, "started": time.time()}
    _write_json(run_dir / "status.json", status)
    t0 = time.perf_counter()
    with open(run_dir / "run.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _CHILDREN.add(proc)
        try:
            rc = proc.wait()
        finally:
            _CHILDREN.discard(proc)
    state = "interrupted" if _STOPPING.is_set() else "done" if rc == 0 else "failed"   # interrupted: resumed next time
    status.update(state=state, returncode=rc, wall_s=round(time.perf_counter() - t0, 1))
    if state == "failed":
        status["error"] = _error_summary(run_dir / "run.log")
    _write_json(run_dir / "status.json", status)
    return status


def plan(runs: list[Run], out: Path, retry_failed: bool) -> list[Run]:
    """The runs still to do: not `done`, and not `failed` unless retried (`running` or `interrupted` ones continue
    from their `last.ckpt`). A folder whose recorded overrides
    differ from the sweep file's is an error (the file changed under a half-finished sweep)."""
    todo = []
    for run in runs:
        status = read_status(out / run.name)
        if status is not None and json.loads(json.dumps(run.overrides, default=str)) != status["overrides"]:
            raise ValueError(f"{out / run.name}: recorded overrides {status['overrides']} differ from the sweep "
                             f"file's {run.overrides}; use another --out or remove the folder")
        state = status["state"] if status else None
        if state == "done" or (state == "failed" and not retry_failed):
            continue
        todo.append(run)
    return todo


def run_sweep(path: str | Path, out: str | Path | None = None, parallel: int | None = None,
              threads: int | None = None, extra: list[str] | None = None, retry_failed: bool = False,
              report_only: bool = False) -> tuple[list[dict], str]:
    """Run what is left of a sweep, then write its table and plots; returns (rows, results.md text)."""
    sweep = load_sweep(path)
    runs = expand(sweep)
    out = Path(out).resolve() if out else (sweep.out or Path("runs/sweeps").resolve() / sweep.path.stem)
    out.mkdir(parents=True, exist_ok=True)
    todo = [] if report_only else plan(runs, out, retry_failed)
    parallel = parallel or sweep.parallel
    threads = threads or max(1, (os.cpu_count() or 1) // parallel)
    if todo:
        pool = ThreadPoolExecutor(max_workers=parallel)
        try:
            list(pool.map(lambda r: execute(r, sweep, out, extra or [], threads), todo))
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM): stop the queue and send SIGTERM to the running children, which save
            # `last.ckpt` on the way out; their status stays `running`, so the next invocation resumes them.
            _STOPPING.set()
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in list(_CHILDREN):
                proc.terminate()
            for proc in list(_CHILDREN):
                proc.wait()
            raise
        pool.shutdown()
    rows = collect(runs, out, sweep.metrics)
    text = write_results(rows, out, sweep)
    plot(runs, out, sweep.metrics)
    return rows, text


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_passthrough(argv)
    p = argparse.ArgumentParser(prog="python -m emu_lightning.sweeps", description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="a sweep YAML (recipes/sweeps/*.yaml)")
    p.add_argument("--out", help="the sweep folder (default: the file's `out`, else runs/sweeps/<name>)")
    p.add_argument("--parallel", type=int, help="runs at once (default: the file's `parallel`, else 1)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores // parallel)")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again (default: keep their error)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and what is left, run nothing")
    p.add_argument("--report", action="store_true", help="only rebuild results.csv/.md and the plots")
    args = p.parse_args(argv)
    if args.dry_run:
        sweep = load_sweep(args.sweep)
        out = Path(args.out).resolve() if args.out else (sweep.out or Path("runs/sweeps").resolve() / sweep.path.stem)
        runs = expand(sweep)
        left = {r.name for r in plan(runs, out, args.retry_failed)} if out.is_dir() else {r.name for r in runs}
        for r in runs:
            print(f"{'todo' if r.name in left else 'skip'}  {r.name}  {r.overrides}")
        return 0
    with exit_on_sigterm():   # a scheduler's SIGTERM: stop the children (they save last.ckpt), then exit
        rows, text = run_sweep(args.sweep, args.out, args.parallel, args.threads, extra, args.retry_failed, args.report)
    print(text)
    return 0 if all(r["state"] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
