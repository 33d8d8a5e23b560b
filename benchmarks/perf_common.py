"""Shared pieces of the performance suite (`benchmarks/perf.py`): interleaved timing, result rows, the table.

The machine is shared and noisy (other work can slow a run 3-7×), so every comparison runs its sides
alternately in one process (A, B, A, B, ...) and reports the median of each side, their ratio and the spread
(min-max of the per-round ratios B_i / A_i), never an absolute time alone.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from results_io import machine_facts


@dataclass
class Row:
    """One line of the results table: a measured ratio (or rate) with its medians and spread."""

    benchmark: str
    case: str
    ratio: float                      # the figure of merit (what the aim is stated on)
    aim: str                          # e.g. "≤ 1.03", "≥ 10×"
    a: str = ""                       # side A: "<label> <median>"
    b: str = ""                       # side B
    spread: str = ""                  # min-max of the per-round ratios
    rounds: int = 0
    note: str = ""
    ratio_min: float | None = None    # the same ratio from each side's fastest round (noise only adds time)
    extra: dict = field(default_factory=dict)

    @property
    def meets(self) -> str:
        if not self.aim:
            return "–"
        op, value = self.aim.split()[0], float(self.aim.split()[1].rstrip("×"))
        if op == "≤":
            return "yes" if self.ratio <= value else "no"
        return "yes" if self.ratio >= value else "no"


def interleaved(sides: dict[str, Callable[[], float | None]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every side once per round, alternating the order each round (A B, B A, A B, ...).

    A side returns its own measured seconds, or None to be timed here with `perf_counter` around the call.
    `warmup` rounds run first and are discarded.
    """
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.perf_counter()
            got = sides[n]()
            dt = time.perf_counter() - t0 if got is None else got
            if r >= warmup:
                times[n].append(dt)
    return times


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """(median(num) / median(den), min and max of the per-round ratios num_i / den_i)."""
    per_round = [a / b for a, b in zip(num, den)]
    return statistics.median(num) / statistics.median(den), min(per_round), max(per_round)


def min_ratio(num: list[float], den: list[float]) -> float:
    """min(num) / min(den): each side at its least disturbed round."""
    return min(num) / min(den)


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def machine() -> str:
    """The perf tables' one-line header of `results_io.machine_facts()`."""
    m = machine_facts()
    return (f"{m['cores']} cores ({m['cpu']}), {m['gpu'] or 'no GPU'}, torch {m['torch']}, torch threads "
            f"{m['threads']}, Python {m['python']}")


def table(rows: list[Row]) -> str:
    lines = ["| benchmark | case | ratio (medians) | aim | met | side A (median) | side B (median) | per-round ratios "
             "(min–max) | ratio of minima | rounds | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rmin = "–" if r.ratio_min is None else f"{r.ratio_min:.3f}"
        lines.append(f"| {r.benchmark} | {r.case} | {r.ratio:.3f} | {r.aim} | {r.meets} | {r.a} | {r.b} | {r.spread} | "
                     f"{rmin} | {r.rounds} | {r.note} |")
    return "\n".join(lines)


def set_threads(threads: int) -> None:
    """Fix intra-op threads (and inter-op to 1) so both sides of a pair compete for the same cores."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
