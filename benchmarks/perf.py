"""The performance suite: every benchmark in one run, one table of ratios.

    python benchmarks/perf.py                       # all four: 3.5-4 minutes measured on the 2-core CPU machine
    python benchmarks/perf.py --only generation     # one of: overhead data generation decoder
    python benchmarks/perf.py --quick               # fewer rounds and steps: a smoke run (~3 minutes)

Each part also runs alone (`benchmarks/perf_overhead.py`, `perf_data.py`, `perf_generation.py`,
`perf_decoder.py`) with its own options. Every pair is measured alternately in this one process (A, B, B, A, ...)
and reported as the ratio of the medians with the min-max of the per-round ratios: the machine's noise hits
both sides of a pair alike. Torch runs `--threads` intra-op threads (default 2) and 1 inter-op thread.
The table (markdown) goes to `benchmarks/out/perf_<UTC time>.md`; the rows merge into
`benchmarks/results/perf.json` under the run's UTC start (a `--quick` smoke run writes only the table).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # `python benchmarks/perf.py` from the repository root
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import perf_data  # noqa: E402
import perf_decoder  # noqa: E402
import perf_generation  # noqa: E402
import perf_overhead  # noqa: E402
from perf_common import machine, set_threads, table  # noqa: E402
from results_io import merge_result, run_facts  # noqa: E402

PARTS = ("overhead", "data", "generation", "decoder")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer rounds and steps (a smoke run, not for reporting)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    a = p.parse_args()
    set_threads(a.threads)
    q = a.quick
    runs = {
        "overhead": lambda: perf_overhead.run(steps=4 if q else 12, rounds=1 if q else 3, threads=a.threads),
        "data": lambda: perf_data.run(rounds=1 if q else 3, batches=2 if q else 8, steps=2 if q else 6,
                                      threads=a.threads),
        "generation": lambda: perf_generation.run(rounds=1 if q else 4, threads=a.threads,
                                                  text_tokens=8 if q else 32),
        "decoder": lambda: perf_decoder.run(batch=4, rounds=1 if q else 5, threads=a.threads),
    }
    rows, seconds = [], {}
    start = time.perf_counter()
    for part in a.only:
        t0 = time.perf_counter()
        rows += runs[part]()
        seconds[part] = time.perf_counter() - t0
        print(f"[perf] {part}: {seconds[part]:.0f} s", flush=True)
    total = time.perf_counter() - start
    stamp = datetime.now(timezone.utc)
    command = "python benchmarks/perf.py " + " ".join(sys.argv[1:])
    header = (f"{stamp:%Y-%m-%d %H:%M} UTC; {machine()}\n\ncommand: `{command.strip()}`; wall "
              f"{total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})")
    text = header + "\n\n" + table(rows)
    print()
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    key = f"{stamp:%Y%m%dT%H%M%S}"
    name = f"perf_{key}" + ("_quick" if q else "")
    (a.out / f"{name}.md").write_text(text + "\n")
    print(f"\nwritten: {a.out / name}.md")
    if not q:   # a smoke run is not for reporting
        path = merge_result("perf", key, {**run_facts(), "wall_s": round(total, 1),
                                          "wall_s_by_part": {k: round(v, 1) for k, v in seconds.items()},
                                          "header": header, "rows": [dataclasses.asdict(r) for r in rows]})
        print(f"merged into {path} as {key}")


if __name__ == "__main__":
    main()
