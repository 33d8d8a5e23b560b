"""Platform overhead: the debug stage-2 model trained through Lightning (`Stage2System` + Trainer) vs a
hand-written bare PyTorch loop over the same model, optimizer, schedule and batches.

    python benchmarks/perf_overhead.py --steps 8 --rounds 6 --threads 2

The recipe's model is built once (`cli_main(..., run=False)`), its datamodule makes `--steps` training batches
once (in this process, stream state dropped), and both sides walk the same batches from the same initial
weights, so the comparison isolates what Lightning and the system add per step: `training_step`'s logging, the
NaN/Inf guard, callbacks, the loop itself. Validation is off.

The machine is shared (other work slows it 3-7× in bursts of seconds), so the sides are paired step by step:
during each Lightning fit a callback runs one bare step on a twin of the model per Lightning step, alternately
just before and just after it, and each Lightning step is timed as the wall time between consecutive
`on_train_batch_start`s less the bare step inside. Configurations, alternated over `--rounds` fits each:

- `lightning+recipe`: `Trainer.fit` with the recipe's callbacks (progress bar, LR monitor, checkpoint, audit,
  sample logs, throughput, ...), a TensorBoard logger in a temporary folder and the recipe's `log_every_n_steps`;
- `lightning-min`: `Trainer.fit` without callbacks, logger, checkpointing, progress bar or model summary;
- `bare`: forward (`loss_terms`: the training loss alone) → backward → clip_grad_norm_(recipe value) → step →
  zero_grad → LambdaLR step; the optimizer and schedule come from the system's `configure_optimizers`.

Also reported: the fixed cost of a fit outside its steps (Trainer construction, fit-start hooks, epoch end, the
final checkpoint, teardown), and the NaN/Inf guard's gradient test in its old and its current form. Each
fit's per-step losses are checked to equal the bare twin's (same work).
Run alone, the rows (with command, date, machine, wall time) merge under the run's UTC start time into
benchmarks/results/perf_overhead.json; inside `benchmarks/perf.py` they go to that run's results.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader

from perf_common import Row, fmt_s, interleaved, machine, min_ratio, ratio_stats, set_threads, table
from results_io import merge_result, run_facts, run_key

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "debug" / "stage2_meanpool.yaml"


def _identity(batch):
    return batch


def build(recipe: Path = RECIPE, steps: int = 20):
    """The recipe's system, `steps` prepared training batches (dicts of CPU tensors), its Trainer and datamodule
    (the datamodule keeps the recipe's `num_workers`; the batches are made in this process)."""
    from emu_lightning.cli import cli_main

    cli = cli_main(["--config", str(recipe), "--trainer.logger", "false"], run=False)
    model, dm = cli.model, cli.datamodule
    workers, dm.num_workers = dm.num_workers, 0
    batches = []
    for batch in dm.train_dataloader():
        batch = dict(batch)
        batch.pop("stream_state", None)
        batches.append(batch)
        if len(batches) == steps:
            break
    dm.num_workers = workers
    return model, batches, cli.trainer, dm


def recipe_callbacks(recipe: Path = RECIPE) -> list[L.Callback]:
    """Fresh instances of the recipe's `trainer.callbacks` (a list, or the path of a YAML list)."""
    spec = yaml.safe_load(recipe.read_text())["trainer"]["callbacks"]
    if isinstance(spec, str):
        spec = yaml.safe_load((recipe.parent / spec).read_text())
    out = []
    for item in spec:
        module, _, name = item["class_path"].rpartition(".")
        out.append(getattr(importlib.import_module(module), name)(**item.get("init_args", {})))
    return out


class BareStepper:
    """The bare loop, one step at a time, on its own copy of the model (the Lightning side trains the other):
    forward (`loss_terms`) → backward → clip_grad_norm_ → step → zero_grad → LambdaLR step."""

    def __init__(self, model, initial: dict, steps: int, clip: float | None) -> None:
        self.m = model
        model.load_state_dict(initial)
        model.zero_grad(set_to_none=True)
        model._trainer = SimpleNamespace(estimated_stepping_batches=steps)  # what configure_optimizers reads
        try:
            conf = model.configure_optimizers()
        finally:
            model._trainer = None
        self.opt, self.sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.clip = clip
        model.train()
        # `loss_terms` is the training loss alone; a tree from before it existed computes the per-source terms too.
        self.loss_fn = getattr(model, "loss_terms", None) or (lambda batch: model.losses(batch)[0])
        self.losses: list[float] = []

    def step(self, batch: dict) -> float:
        t0 = time.perf_counter()
        loss = self.loss_fn(batch)["loss"]
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        dt = time.perf_counter() - t0
        self.losses.append(float(loss))
        return dt


class _Paired(L.Callback):
    """Runs one bare step per Lightning step, alternately before the Lightning step (in `on_train_batch_start`)
    and after it (in `on_train_batch_end`), so both sides of every pair see the same moment of machine noise.
    A Lightning step is the wall time between consecutive `on_train_batch_start`s less the bare step inside."""

    def __init__(self, bare: BareStepper, batches: list[dict]) -> None:
        self.bare, self.batches = bare, batches
        self.light: list[float] = []
        self.bare_t: list[float] = []
        self.losses: list[float] = []
        self.mark = self.first = self.last_end = None
        self.inside = 0.0

    def _bare_step(self, i: int) -> None:
        dt = self.bare.step(self.batches[i])
        self.bare_t.append(dt)
        self.inside += dt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.mark is None:
            self.first = now
        else:
            self.light.append(now - self.mark - self.inside)
        self.mark, self.inside = now, 0.0
        if batch_idx % 2 == 0:
            self._bare_step(batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        if batch_idx % 2 == 1:
            self._bare_step(batch_idx)
        self.last_end = time.perf_counter()


class Runner:
    """The Lightning side on `model`, the bare side on a twin; every fit restarts both from the same weights."""

    def __init__(self, model, batches: list[dict], clip: float | None, log_every: int) -> None:
        self.model, self.batches, self.clip, self.log_every = model, batches, clip, log_every
        self.initial = copy.deepcopy(model.state_dict())
        self.twin = None
        self.tmp = tempfile.TemporaryDirectory()
        self.last: dict[str, dict] = {}

    def loader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, shuffle=False, collate_fn=_identity)

    def reset(self) -> None:
        self.model.load_state_dict(self.initial)
        self.model.zero_grad(set_to_none=True)   # Lightning zeroes before each step, so its last step's grads stay
        self.model.guard.__init__(self.model.guard.max_bad_steps, self.model.guard.window)

    def bare(self) -> float:
        """The whole bare loop over the batches on `model` (seconds); for model rates (`perf_data`)."""
        self.reset()
        stepper = BareStepper(self.model, self.initial, len(self.batches), self.clip)
        return sum(stepper.step(b) for b in self.loader())

    def paired(self, recipe_callbacks_: bool) -> dict:
        """One Lightning fit with a bare step paired to each of its steps."""
        self.reset()
        if self.twin is None:
            self.twin = copy.deepcopy(self.model)
        pair = _Paired(BareStepper(self.twin, self.initial, len(self.batches), self.clip), self.batches)
        kwargs = dict(accelerator="cpu", devices=1, precision="32-true", max_steps=len(self.batches),
                      limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=self.clip,
                      log_every_n_steps=self.log_every)
        if recipe_callbacks_:
            from emu_lightning.checkpoints.io import SafeCheckpointIO
            from lightning.pytorch.loggers import TensorBoardLogger

            kwargs.update(callbacks=[*recipe_callbacks(), pair], plugins=[SafeCheckpointIO()],
                          logger=TensorBoardLogger(self.tmp.name, name="overhead"), default_root_dir=self.tmp.name)
        else:
            kwargs.update(callbacks=[pair], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
        t0 = time.perf_counter()
        trainer = L.Trainer(**kwargs)
        trainer.fit(self.model, train_dataloaders=self.loader())
        wall = time.perf_counter() - t0
        self.model._trainer = None
        # Pairs from the second step on (the first carries one-off allocations on both sides).
        n = len(pair.light)
        return {"light": pair.light[1:n], "bare": pair.bare_t[1:n], "fixed": wall - (pair.last_end - pair.first),
                "loss_diff": max(abs(a - b) for a, b in zip(pair.losses, pair.bare.losses))}


def _quantiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def run(steps: int = 8, rounds: int = 6, threads: int = 2, recipe: Path = RECIPE) -> list[Row]:
    set_threads(threads)
    model, batches, cli_trainer, _ = build(recipe, steps)
    clip = float(cli_trainer.gradient_clip_val or 0) or None
    runner = Runner(model, batches, clip, cli_trainer.log_every_n_steps)
    names = [c.__class__.__name__ for c in recipe_callbacks(recipe)]
    configs = {"lightning+recipe": True, "lightning-min": False}
    got = {k: {"light": [], "bare": [], "fixed": [], "loss_diff": 0.0} for k in configs}
    runner.paired(False)                                      # warm-up fit, discarded
    for r in range(rounds):
        for name in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
            out = runner.paired(configs[name])
            for k in ("light", "bare"):
                got[name][k] += out[k]
            got[name]["fixed"].append(out["fixed"])
            got[name]["loss_diff"] = max(got[name]["loss_diff"], out["loss_diff"])
    rows = []
    for name, g in got.items():
        light, bare = g["light"], g["bare"]
        per_pair = [a / b for a, b in zip(light, bare)]
        lo, hi = _quantiles(per_pair)
        cbs = ", ".join(names) + " + TensorBoard logger" if configs[name] else "none, no logger"
        # The figure: the median of the per-step ratios (both sides of a pair share the moment's noise).
        rows.append(Row("platform overhead", f"{name}: time per training step (median of per-step ratios)",
                        statistics.median(per_pair), "≤ 1.03", f"bare {fmt_s(statistics.median(bare))}",
                        f"{name} {fmt_s(statistics.median(light))}", f"IQR {lo:.3f}–{hi:.3f} ({len(per_pair)} pairs)",
                        rounds, f"callbacks: {cbs}; ratio of the two medians "
                        f"{statistics.median(light) / statistics.median(bare):.3f}; per-step losses vs bare: "
                        f"max |Δ| {g['loss_diff']:.1e}",
                        ratio_min=min(light) / min(bare)))
        fixed = statistics.median(g["fixed"])
        run_steps = 200                                       # the debug stage-2 recipe's max_steps
        share = fixed / (run_steps * statistics.median(bare))
        rows.append(Row("platform overhead", f"{name}: fixed cost per fit (setup, hooks, final checkpoint)",
                        1 + share, "≤ 1.03", "bare: optimizer construction only (not timed)", f"{name} {fmt_s(fixed)}",
                        f"{min(g['fixed']):.2f}–{max(g['fixed']):.2f} s", rounds,
                        f"ratio = 1 + fixed / ({run_steps} recipe steps × bare step time); Trainer construction, "
                        f"fit-start hooks, epoch end, teardown"))
    guard = guard_check_row(runner, rounds)
    return rows + ([guard] if guard is not None else [])


def guard_check_row(runner: Runner, rounds: int, calls: int = 20) -> Row | None:
    """The NaN/Inf guard's gradient test on one real step's gradients: the elementwise `isfinite` per tensor it
    used before vs `grads_finite` (a fused total norm), interleaved."""
    try:
        from emu_lightning.systems.base import grads_finite
    except ImportError:  # a tree from before the change (benchmarking the old code)
        return None
    m = runner.model
    runner.reset()
    m.train()
    m.loss_terms(runner.batches[0])["loss"].backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]

    def elementwise():
        for _ in range(calls):
            bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def fused():
        for _ in range(calls):
            grads_finite(grads)

    times = interleaved({"elementwise": elementwise, "fused": fused}, rounds=rounds, warmup=1)
    m.zero_grad(set_to_none=True)
    r, lo, hi = ratio_stats(times["elementwise"], times["fused"])
    n = sum(g.numel() for g in grads)
    return Row("platform overhead", "guard: gradient finiteness test per step (before / after)", r, "",
               f"after {fmt_s(statistics.median(times['fused']) / calls)}",
               f"before {fmt_s(statistics.median(times['elementwise']) / calls)}", f"{lo:.1f}–{hi:.1f}", rounds,
               f"{len(grads)} gradient tensors, {n / 1e6:.1f} M values; ratio = before / after",
               ratio_min=min_ratio(times["elementwise"], times["fused"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recipe", type=Path, default=RECIPE)
    a = p.parse_args()
    key, start = run_key(), time.perf_counter()
    rows = run(a.steps, a.rounds, a.threads, a.recipe)
    print(machine())
    print(table(rows))
    entry = {**run_facts(), "wall_s": round(time.perf_counter() - start, 1),
             "rows": [dataclasses.asdict(r) for r in rows]}
    print(f"wrote {merge_result('perf_overhead', key, entry)} [{key!r}]")


if __name__ == "__main__":
    main()
