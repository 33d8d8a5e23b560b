"""What a sweep is, shared by the runner and the results reader: a `Sweep` (the file, parsed) and its `Run`s,
the folder-safe run names and a run's `status.json`."""
from __future__ import annotations

import json
import re
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Run:
    """One run of a sweep: a configuration (its axis labels and overrides) at one seed."""

    name: str                      # folder name: `<config>` or `<config>,seed=<s>`
    config: str                    # the configuration without the seed: runs with equal config are aggregated
    labels: dict[str, str]         # axis → label, for the table's columns
    overrides: dict[str, Any]      # dotted key → value, the seed included
    seed: Any = None


@dataclass
class Sweep:
    path: Path
    base: Path
    subcommand: str = "fit"
    overrides: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, dict[str, Any]] = field(default_factory=dict)    # dotted key → {label: value}
    runs: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    metrics: dict[str, str] = field(default_factory=dict)            # tag → max | min
    parallel: int = 1
    out: Path | None = None


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "-", text)


def read_status(run_dir: Path) -> dict | None:
    path = run_dir / "status.json"
    return json.loads(path.read_text()) if path.is_file() else None


def split_passthrough(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(own arguments, arguments after `--`, passed to every run's `main.py`); `argv` None = the process's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


@contextmanager
def exit_on_sigterm(code: int = 143):
    """While the block runs, SIGTERM (a scheduler, `kill`) exits with `code` so the runner stops its child runs
    (which save `last.ckpt`); the previous handler comes back after, so a caller in the same process (a test, a
    notebook, a later Lightning fit) is not left with it."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(code))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
