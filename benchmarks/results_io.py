"""Where benchmark measurements go: one committed file per benchmark, `benchmarks/results/<name>.json`.

Each file maps a run key (a run name, an arm, a configuration) to that run's entry; a new run is merged into the
file, never replacing the other runs. An entry carries what the run was (`command`, `date`, `machine`: cores,
torch threads, CPU, GPU, torch) beside its numbers; `run_facts()` gives those three. Bulky artefacts
(checkpoints, TensorBoard logs, overlays) stay in the git-ignored `benchmarks/out/`.

The merge holds an exclusive lock (arms evaluated in parallel merge one at a time) and writes a temporary file in
the same folder, then `os.replace`s it over the old one, so a reader never sees a half-written file.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"   # committed: one <name>.json per benchmark
OUT = BENCHMARKS / "out"           # git-ignored scratch: checkpoints, logs, overlays


def machine_facts() -> dict:
    """The facts of this machine a timing depends on: cores, torch threads, CPU and GPU names, versions."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}


def run_facts(argv: list[str] | None = None) -> dict:
    """`command` (as typed, from the repository root), `date` (UTC, ISO 8601) and `machine` of this run.

    Args:
        argv: the script's arguments; default `sys.argv[1:]`.
    """
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(BENCHMARKS.parent)
    except ValueError:   # run from elsewhere (a test runner): keep the path as given
        pass
    args = sys.argv[1:] if argv is None else argv
    return {"command": shlex.join(["python", str(script), *map(str, args)]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_facts()}


def run_key() -> str:
    """A key for a run that has no name of its own: its UTC start, e.g. "20261207T054244"."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")


def read_results(name: str, results: Path = RESULTS) -> dict:
    """The runs in `results/<name>.json` (run key → entry); {} when the file does not exist yet.

    Raises:
        ValueError: the file is not valid JSON or not an object; the message names the file.
    """
    path = results / f"{name}.json"
    if not path.is_file():
        return {}
    try:
        runs = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or move it aside before merging a run into it") from e
    if not isinstance(runs, dict):
        raise ValueError(f"{path}: expected an object of run key → entry, found a {type(runs).__name__}")
    return runs


def write_json(path: Path, data: object) -> None:
    """Write `data` as JSON to `path` atomically: a temporary file in the same folder, then `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); the results file keeps its old mode, a new one gets 0644.
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def merge_result(name: str, key: str, entry: dict, results: Path = RESULTS) -> Path:
    """Set run `key` of `results/<name>.json` to `entry`, keeping every other run; returns the file's path.

    Args:
        name: the benchmark's name, e.g. "stage1_learning".
        key: the run's key in the file, e.g. the run name; an entry already under it is replaced.
        entry: the run's JSON-serialisable entry, e.g. `{**run_facts(), "steps": ..., "metrics": ...}`.
        results: the folder of results files.
    """
    path = results / f"{name}.json"
    results.mkdir(parents=True, exist_ok=True)
    # Read-modify-write one process at a time: the lock is on the folder itself, so no lock file is left behind.
    fd = os.open(results, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        runs = read_results(name, results)
        runs[key] = entry
        write_json(path, runs)
    finally:
        os.close(fd)   # closing releases the lock
    return path
