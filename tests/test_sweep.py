"""The sweep runner: grid expansion, run planning (resume, failures), the results table read back from event
files with known values, and one real sweep through the CLI (a good run and a failing one, in parallel).
The real sweep is slow: `.venv/bin/python -m pytest -q -m slow tests/test_sweep.py`.
"""
from __future__ import annotations

import csv
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from emu_lightning.sweeps.runner import expand, load_sweep, overlay, plan, run_sweep
from emu_lightning.sweeps.results import collect, read_scalars, write_results

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "recipes" / "debug" / "stage1_cformer.yaml"


def _sweep(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": str(BASE), **spec}))
    return path


def test_grid_expands_to_every_combination_and_seed(tmp_path):
    path = _sweep(tmp_path, overrides={"trainer.max_steps": 7},
                  grid={"model.init_args.adapter": {"cf": "a.yaml", "mp": "b.yaml"},
                        "model.init_args.regression_weight": [0.1, 1.0, 10.0]},
                  seeds=[0, 1])
    runs = expand(load_sweep(path))
    assert len(runs) == 2 * 3 * 2
    assert len({r.name for r in runs}) == 12 and len({r.config for r in runs}) == 6
    first = runs[0]
    assert first.name == "adapter=cf,regression_weight=0.1,seed=0"
    assert first.labels == {"adapter": "cf", "regression_weight": "0.1"}
    assert first.overrides == {"trainer.max_steps": 7, "model.init_args.adapter": "a.yaml",
                               "model.init_args.regression_weight": 0.1, "seed_everything": 0}
    assert [r.seed for r in runs[:2]] == [0, 1] and runs[0].config == runs[1].config
    assert {r.overrides["model.init_args.regression_weight"] for r in runs} == {0.1, 1.0, 10.0}


def test_runs_list_crossed_with_grid_and_labels(tmp_path):
    path = _sweep(tmp_path, runs=[{"name": "frozen", "overrides": {"model.init_args.policy.trainable": ["llm"]}},
                                  {"name": "trained", "overrides": {}}],
                  grid={"a.x.lr": [1, 2], "b.y.lr": ["../components/adapter_cformer_debug.yaml"]})
    runs = expand(load_sweep(path))
    assert [r.name for r in runs] == ["frozen,a.x.lr=1,b.y.lr=adapter_cformer_debug",
                                      "frozen,a.x.lr=2,b.y.lr=adapter_cformer_debug",
                                      "trained,a.x.lr=1,b.y.lr=adapter_cformer_debug",
                                      "trained,a.x.lr=2,b.y.lr=adapter_cformer_debug"]
    assert runs[0].overrides["model.init_args.policy.trainable"] == ["llm"]
    assert runs[0].seed is None and "seed_everything" not in runs[0].overrides
    # Both keys end in `lr`, so each keeps its full dotted name as its column.
    assert runs[0].labels == {"variant": "frozen", "a.x.lr": "1", "b.y.lr": "adapter_cformer_debug"}
    out = tmp_path / "out"
    for run in runs:
        _status(out / run.name, run, "done")
    text = write_results(collect(runs, out, {"val/acc": "max"}), out, load_sweep(path))
    assert "| variant | a.x.lr | b.y.lr | runs done | val/acc |" in text    # the run names are a column
    assert "| trained | 2 | adapter_cformer_debug | 1/1 | – |" in text


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"a": [1]}, "seed": [0]}, r"unknown key\(s\) \['seed'\]"),
    ({"grid": {"a": []}}, "grid.a is empty"),
    ({"grid": {"a": 3}}, "grid.a must be a list"),
    ({"grid": {"a": ["x/p.yaml", "y/p.yaml"]}}, "equal labels"),
    ({"grid": {"a": [1]}, "metrics": {"val/acc": "largest"}}, "mode must be one of"),
    ({"overrides": {"trainer.max_steps": 3}}, "nothing to sweep"),
    ({"runs": [{"name": "a"}, {"name": "a"}]}, "run names repeat"),
    ({"runs": [{"label": "a"}]}, r"runs\[0\] must be"),
])
def test_bad_sweep_files_name_the_field(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(_sweep(tmp_path, **spec))


def test_missing_base_is_named(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "nope.yaml", "seeds": [0]}))
    with pytest.raises(FileNotFoundError, match="base recipe 'nope.yaml' not found"):
        load_sweep(path)


def test_overlay_nests_keys_resolves_paths_and_points_the_logger(tmp_path):
    frag = tmp_path / "frag.yaml"
    frag.write_text("class_path: x.Y\n")
    sweep = load_sweep(_sweep(tmp_path, grid={"model.init_args.adapter": ["frag.yaml"]}, seeds=[3]))
    run = expand(sweep)[0]
    run_dir = tmp_path / "out" / run.name
    nested = overlay(run, sweep, run_dir)
    assert nested["model"]["init_args"]["adapter"] == str(frag)          # absolute: the overlay lives elsewhere
    assert nested["seed_everything"] == 3
    assert nested["trainer"]["logger"]["init_args"] == {"save_dir": str(tmp_path / "out"), "name": run.name,
                                                        "version": ""}


def _status(run_dir: Path, run, state: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").write_text(json.dumps({"state": state, "overrides": run.overrides, "error": "boom"}))


def test_plan_skips_finished_runs_and_keeps_failures_unless_retried(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, grid={"a.b": [1, 2, 3, 4]}))
    runs, out = expand(sweep), tmp_path / "out"
    _status(out / runs[0].name, runs[0], "done")
    _status(out / runs[1].name, runs[1], "failed")
    _status(out / runs[2].name, runs[2], "running")              # the sweep was killed during this run
    assert [r.name for r in plan(runs, out, retry_failed=False)] == [runs[2].name, runs[3].name]
    assert [r.name for r in plan(runs, out, retry_failed=True)] == [r.name for r in runs[1:]]


def test_plan_refuses_a_folder_with_other_overrides(tmp_path):
    sweep = load_sweep(_sweep(tmp_path, grid={"a.b": [1]}))
    run, out = expand(sweep)[0], tmp_path / "out"
    (out / run.name).mkdir(parents=True)
    (out / run.name / "status.json").write_text(json.dumps({"state": "done", "overrides": {"a.b": 5}}))
    with pytest.raises(ValueError, match="recorded overrides .* differ"):
        plan([run], out, retry_failed=False)


def _log(run_dir: Path, series: dict[str, list[tuple[int, float]]]) -> None:
    writer = SummaryWriter(str(run_dir))
    for tag, points in series.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_results_table_reads_the_logged_values(tmp_path):
    """Known values in event files → the exact final/best per run and mean ± std per configuration."""
    sweep = load_sweep(_sweep(tmp_path, grid={"model.init_args.adapter": {"cf": 1, "mp": 2}}, seeds=[0, 1],
                              metrics={"val/acc": "max", "val/loss": "min"}))
    runs, out = expand(sweep), tmp_path / "out"
    values = {  # run → (val/acc curve, val/loss curve)
        runs[0].name: ([(10, 0.2), (20, 0.6), (30, 0.5)], [(10, 2.0), (20, 1.0), (30, 1.5)]),
        runs[1].name: ([(10, 0.4), (20, 0.7), (30, 0.7)], [(10, 1.8), (20, 1.2), (30, 1.1)]),
        runs[2].name: ([(10, 0.9), (20, 0.95), (30, 1.0)], [(10, 0.5), (20, 0.4), (30, 0.3)]),
    }
    for run in runs[:3]:
        acc, loss = values[run.name]
        _log(out / run.name, {"val/acc": acc, "val/loss": loss})
        _status(out / run.name, run, "done")
    _status(out / runs[3].name, runs[3], "failed")                  # mp seed 1 failed: excluded from the mean
    rows = collect(runs, out, sweep.metrics)
    assert len(rows) == 4
    assert rows[0]["val/acc final"] == pytest.approx(0.5) and rows[0]["val/acc best"] == pytest.approx(0.6)
    assert rows[0]["val/loss final"] == pytest.approx(1.5) and rows[0]["val/loss best"] == pytest.approx(1.0)
    assert rows[3]["state"] == "failed" and rows[3]["val/acc final"] is None and rows[3]["error"] == "boom"
    text = write_results(rows, out, sweep)
    final, best = text.split("**Best**")
    # cf: final acc (0.5, 0.7) → 0.6 ± 0.1414; best loss (1.0, 1.1) → 1.05 ± 0.07071. mp: one run done.
    assert "| cf | 2/2 | 0.6 ± 0.14 | 1.3 ± 0.28 |" in final
    assert "| mp | 1/2 | 1 | 0.3 |" in final
    assert "| cf | 2/2 | 0.65 ± 0.071 | 1.05 ± 0.071 |" in best
    assert "`adapter=mp,seed=1`: failed: boom" in text
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == [r.name for r in runs]
    assert float(table[1]["val/acc best"]) == pytest.approx(0.7)


def test_read_scalars_counts_a_repeated_step_once(tmp_path):
    """A resumed run re-logs steps after its checkpoint: the later write of a step wins."""
    _log(tmp_path / "run", {"train/loss": [(1, 3.0), (2, 2.0), (3, 9.0)]})
    _log(tmp_path / "run", {"train/loss": [(3, 1.5), (4, 1.0)]})   # second event file, written later
    assert read_scalars(tmp_path / "run")["train/loss"] == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.0)]


@pytest.mark.slow
def test_real_sweep_records_a_failure_resumes_and_tables(tmp_path):
    """Two configurations through the real CLI at once: one trains 2 steps, one has a bad value. The failure
    is recorded with its error, the other finishes; a second invocation runs nothing."""
    small = {"class_path": "emu_lightning.data.synthetic.scenes.SyntheticCaptions",
             "init_args": {"split": "val", "size": 4, "image_size": 64}}
    path = _sweep(tmp_path, overrides={"trainer.max_steps": 2, "trainer.val_check_interval": 2,
                                       "trainer.limit_val_batches": 1, "trainer.log_every_n_steps": 1,
                                       "model.init_args.max_new_tokens": 4, "model.init_args.num_beams": 1,
                                       "data.init_args.val": {"val": small}, "data.init_args.batch_size": 4,
                                       "data.init_args.eval_batch_size": 4, "data.init_args.num_workers": 0},
                  grid={"model.init_args.warmup": {"ok": 0.0, "bad": "not-a-number"}},
                  metrics={"train/loss": "min", "val/cider_greedy": "max"})
    out = tmp_path / "out"
    rows, text = run_sweep(path, out=out, parallel=2, threads=1)
    by = {r["warmup"]: r for r in rows}
    assert by["ok"]["state"] == "done" and by["bad"]["state"] == "failed"
    assert "not-a-number" in by["bad"]["error"] and "warmup" in by["bad"]["error"]
    ok_dir = out / by["ok"]["run"]
    logged = read_scalars(ok_dir)["train/loss"]
    assert [s for s, _ in logged] == [0, 1] and by["ok"]["train/loss final"] == pytest.approx(logged[-1][1])
    assert by["ok"]["val/cider_greedy final"] is not None
    assert "| ok | 1/1 |" in text and "| bad | 0/1 | – | – |" in text
    assert yaml.safe_load((ok_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 2
    assert (ok_dir / "checkpoints" / "last.ckpt").is_file() and (out / "plots" / "train_loss.png").is_file()

    stamps = {r["run"]: json.loads((out / r["run"] / "status.json").read_text())["started"] for r in rows}
    log_size = (ok_dir / "run.log").stat().st_size
    cmd = [sys.executable, "-m", "emu_lightning.sweeps.runner", str(path), "--out", str(out), "--dry-run"]
    listing = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert listing.count("skip") == 2 and "todo" not in listing
    rows_again, _ = run_sweep(path, out=out, parallel=2, threads=1)
    assert {r["run"]: json.loads((out / r["run"] / "status.json").read_text())["started"] for r in rows_again} == stamps
    assert (ok_dir / "run.log").stat().st_size == log_size              # nothing ran again


def test_error_summary_takes_the_exception_line(tmp_path):
    from emu_lightning.sweeps.runner import _error_summary

    log = tmp_path / "run.log"
    log.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "ValueError: sample 3: 2 <image> runs but 3 images\n\nwarning: later noise\n")
    assert _error_summary(log) == "ValueError: sample 3: 2 <image> runs but 3 images"


def _alive_with(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_sigterm_stops_the_sweep_and_its_run_which_is_resumed_next_time(tmp_path):
    import signal
    import time

    path = _sweep(tmp_path, overrides={"trainer.max_steps": 10000, "data.init_args.num_workers": 0},
                  grid={"model.init_args.warmup": [0.0]})
    out = tmp_path / "out"
    sweep = subprocess.Popen([sys.executable, "-m", "emu_lightning.sweeps.runner", str(path), "--out", str(out),
                              "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status = out / "warmup=0.0" / "status.json"
    deadline = time.time() + 60
    while not (status.is_file() and _alive_with(str(out / "warmup=0.0" / "overlay.yaml"))):
        assert time.time() < deadline and sweep.poll() is None, "the run did not start"
        time.sleep(0.2)
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=60) == 143
    assert _alive_with(str(out / "warmup=0.0" / "overlay.yaml")) == []          # the child was stopped too
    assert json.loads(status.read_text())["state"] == "interrupted"
    cmd = [sys.executable, "-m", "emu_lightning.sweeps.runner", str(path), "--out", str(out), "--dry-run"]
    assert subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.startswith("todo  warmup=0.0")


def _assert_as_written(got, spec: dict, run: str) -> None:
    """A component an arm names is built as written: each argument it states, and the class default for each it
    leaves out. jsonargparse carries a replaced component's init_args over where the names fit, so a base recipe's
    head with `whiten: true` would otherwise reach an arm whose head leaves `whiten` out."""
    module, name = spec["class_path"].rsplit(".", 1)
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    stated = spec.get("init_args") or {}
    for arg, param in params.items():
        if arg in stated or param.default is not inspect.Parameter.empty:
            value = got.init_args.get(arg)
            value = value.as_dict() if hasattr(value, "as_dict") else value
            assert value == stated.get(arg, param.default), (run, arg, value, stated.get(arg, param.default))


@pytest.mark.parametrize("sweep_file", sorted((ROOT / "recipes" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_builtin_sweeps_instantiate_every_configuration(sweep_file, tmp_path):
    """Each built-in ablation's runs parse and build through the real CLI with the run's overlay: every varied
    value is in the resolved config, and the model built from it has the adapter class and N it names."""
    from emu_lightning.cli import cli_main

    sweep = load_sweep(sweep_file)
    runs = expand(sweep)
    assert len({r.config for r in runs}) >= 2
    for run in runs:
        run_dir = tmp_path / run.name
        run_dir.mkdir()
        (run_dir / "overlay.yaml").write_text(yaml.safe_dump(overlay(run, sweep, run_dir)))
        cli = cli_main(["--config", str(sweep.base), "--config", str(run_dir / "overlay.yaml")], run=False)
        assert cli.trainer.logger.log_dir.rstrip("/") == str(run_dir)
        for key, value in run.overrides.items():
            got = cli.config[key]
            if isinstance(value, str) and value.endswith(".yaml"):          # a fragment: its class is built
                fragment = yaml.safe_load((sweep_file.parent / value).read_text())
                assert got.class_path == fragment["class_path"]
                _assert_as_written(got, fragment, run.name)
                part = getattr(cli.model, key.rsplit(".", 1)[-1])              # the part the key names
                assert type(part).__name__ == fragment["class_path"].rsplit(".", 1)[-1]
            elif isinstance(value, dict) and "class_path" in value:              # an inline component
                assert got.class_path == value["class_path"]
                _assert_as_written(got, value, run.name)
                part = getattr(cli.model, key.rsplit(".", 1)[-1])
                assert type(part).__name__ == value["class_path"].rsplit(".", 1)[-1]
            else:
                assert (list(got) if isinstance(value, list) else got) == value, (run.name, key, got)
        # N follows the adapter the run names, whatever its kind: an adapter built on its own from the resolved
        # config gives the N the model reads and the datamodule lays out
        spec = cli.config["model.init_args.adapter"]
        module, name = spec.class_path.rsplit(".", 1)
        alone = getattr(importlib.import_module(module), name)(**dict(spec.init_args))
        assert cli.model.num_image_tokens == cli.datamodule.num_image_tokens == alone.num_tokens
