"""The results of a sweep, read back from its runs' TensorBoard event files: `results.csv` (a row per run),
`results.md` (a row per configuration, mean ± sample std over seeds) and `plots/<metric>.png`.

`final` is a metric's value at the last logged step; `best` its max or min over the run (the sweep file's
`metrics` give the mode; otherwise `min` for tags containing "loss", else `max`).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from emu_lightning.sweeps.spec import Run, Sweep, read_status, safe_name


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the run's TensorBoard event files: tag → [(step, value)] sorted by step (the last
    write of a step wins, so a resumed run's repeated steps count once)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, tuple[float, float]]] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                prev = series.setdefault(tag, {}).get(e.step)
                if prev is None or e.wall_time >= prev[0]:
                    series[tag][e.step] = (e.wall_time, e.value)
    return {tag: sorted((s, v) for s, (_, v) in points.items()) for tag, points in series.items()}


def _default_tags(tags) -> list[str]:
    """Without a `metrics` list: every scalar but the learning rates, the epoch counter and `hp_metric`."""
    return sorted(t for t in tags if not t.startswith(("lr-", "epoch", "hp_metric")))


def _mode(tag: str, metrics: dict[str, str]) -> str:
    return metrics.get(tag, "min" if "loss" in tag else "max")


def collect(runs: list[Run], out: Path, metrics: dict[str, str]) -> list[dict]:
    """One row per run: labels, seed, state, wall time and each metric's final and best value."""
    rows = []
    for run in runs:
        status = read_status(out / run.name) or {"state": "not run"}
        scalars = read_scalars(out / run.name) if (out / run.name).is_dir() else {}
        row = {"run": run.name, "config": run.config, **run.labels, "seed": run.seed, "state": status["state"],
               "wall_s": status.get("wall_s"), "error": status.get("error", "")}
        for tag in metrics or _default_tags(scalars):
            points = scalars.get(tag, [])
            values = [v for _, v in points if math.isfinite(v)]
            pick = max if _mode(tag, metrics) == "max" else min
            row[f"{tag} final"] = points[-1][1] if points else None
            row[f"{tag} best"] = pick(values) if values else None
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))   # sample std over seeds
    return f"{mean:.4g} ± {std:.2g}"


def write_results(rows: list[dict], out: Path, sweep: Sweep) -> str:
    """`results.csv` (every run) and `results.md` (configurations, mean ± std over seeds); returns the md."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    metric_cols = [c for c in columns if c.endswith((" final", " best"))]
    label_cols = [c for c in columns if c not in metric_cols and c not in
                  {"run", "config", "seed", "state", "wall_s", "error"}]
    tags = list(dict.fromkeys(c.rsplit(" ", 1)[0] for c in metric_cols))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    lines = [f"# Sweep `{sweep.path.name}`", "",
             f"Base recipe `{sweep.base.name}`, {len(rows)} runs. Values are mean ± sample std over the finished "
             f"runs of each configuration ({len(sweep.seeds) or 1} seed(s) each).", ""]
    for kind, what in (("final", "the last logged value"),
                       ("best", "the best value over the run (" + ", ".join(f"{t} {_mode(t, sweep.metrics)}"
                                                                             for t in tags) + ")")):
        lines += [f"**{kind.capitalize()}**: {what}.", "",
                  "| " + " | ".join(label_cols + ["runs done"] + tags) + " |",
                  "|" + "---|" * (len(label_cols) + 1 + len(tags))]
        for config in configs:
            group = [r for r in rows if r["config"] == config]
            done = [r for r in group if r["state"] == "done"]
            cells = [str(group[0].get(c, "")) for c in label_cols] + [f"{len(done)}/{len(group)}"]
            cells += [_mean_std([r[f"{t} {kind}"] for r in done if r.get(f"{t} {kind}") is not None]) for t in tags]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    failed = [r for r in rows if r["state"] != "done"]
    if failed:
        lines += ["Runs not done:", ""]
        lines += [f"- `{r['run']}`: {r['state']}" + (f": {r['error']}" if r["error"] else "") for r in failed]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def plot(runs: list[Run], out: Path, metrics: dict[str, str]) -> list[Path]:
    """`plots/<metric>.png`: each configuration's curve over steps, mean over seeds, band = min..max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = {r.name: read_scalars(out / r.name) for r in runs if (out / r.name).is_dir()}
    tags = list(metrics) or _default_tags({t: None for s in scalars.values() for t in s})
    (out / "plots").mkdir(exist_ok=True)
    written = []
    for tag in tags:
        if not any(tag in s for s in scalars.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for config in dict.fromkeys(r.config for r in runs):
            curves = [dict(scalars[r.name][tag]) for r in runs if r.config == config and tag in scalars.get(r.name, {})]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            vals = [[c[s] for c in curves] for s in steps]
            ax.plot(steps, [sum(v) / len(v) for v in vals], marker="o" if len(steps) < 20 else None, label=config)
            if len(curves) > 1:
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2)
        ax.set(xlabel="step", ylabel=tag, title=tag)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        path = out / "plots" / (safe_name(tag.replace("/", "_")) + ".png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
