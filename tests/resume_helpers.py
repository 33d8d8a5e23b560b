"""Helpers of the kill-and-resume tests: a tiny stage-2 run of the real debug recipe through the real CLI, a
callback that marks (and can slow or interrupt) steps, and a checkpoint plugin that stalls mid-write.

`python -m tests.resume_helpers <overlay.yaml> [--ckpt_path P]` is the subprocess the SIGKILL / SIGTERM tests
start and kill."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from emu_lightning.checkpoints.io import SafeCheckpointIO, safe_load

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "debug" / "stage2_meanpool.yaml")
CFORMER_RECIPE = str(ROOT / "recipes" / "debug" / "stage2_cformer.yaml")   # its C-Former can take dropout


class StepMarker(L.Callback):
    """After each training step: append the step to `marks` (a file the parent polls), sleep `pause` s, and
    raise at `crash_at` or SIGTERM the process at `sigterm_at` (in-process stand-ins for a kill)."""

    def __init__(self, marks: str, pause: float = 0.0, crash_at: int | None = None, sigterm_at: int | None = None):
        self.marks, self.pause, self.crash_at, self.sigterm_at = marks, pause, crash_at, sigterm_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        with open(self.marks, "a") as f:
            f.write(f"{step}\n")
        if step == self.crash_at:
            raise KeyError(f"simulated crash after step {step}")   # not a RuntimeError: nothing catches it
        if step == self.sigterm_at:
            os.kill(os.getpid(), 15)
        time.sleep(self.pause)


class BatchIds(L.Callback):
    """After each training step, append `<epoch> <step> <id,id,...>` (the batch's sample ids) to `<folder>/ids_rank<r>`
    for this process's rank r: the per-rank sample order a resume must reproduce."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(Path(self.folder) / f"ids_rank{trainer.global_rank}", "a") as f:
            f.write(f"{trainer.current_epoch} {trainer.global_step} {','.join(map(str, batch['ids']))}\n")


def read_ids(folder: str | Path, rank: int) -> list[tuple[int, int, list[str]]]:
    """`BatchIds`' rows of rank `rank`: (epoch, step, ids)."""
    rows = []
    for line in (Path(folder) / f"ids_rank{rank}").read_text().splitlines():
        epoch, step, ids = line.split(" ")
        rows.append((int(epoch), int(step), ids.split(",")))
    return rows


class SlowCheckpointIO(SafeCheckpointIO):
    """SafeCheckpointIO whose every save after the first writes half the bytes, marks `<marks>.saving`, and
    stalls `stall` s before the rest: the window a test kills the process in."""

    def __init__(self, marks: str, stall: float = 30.0):
        self.marks, self.stall, self.saves = marks, stall, 0

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.saves += 1
        if self.saves == 1:
            return super().save_checkpoint(checkpoint, path, storage_options)
        import emu_lightning.checkpoints.io as io

        real_save = torch.save

        def slow_save(obj, f):
            import io as _io

            buf = _io.BytesIO()
            real_save(obj, buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            Path(self.marks + ".saving").write_text(str(path))
            time.sleep(self.stall)
            f.write(data[len(data) // 2:])

        io.torch.save = slow_save
        try:
            super().save_checkpoint(checkpoint, path, storage_options)
        finally:
            io.torch.save = real_save


def overlay(tmp: Path, max_steps: int = 6, every: int = 2, num_workers: int = 0, pause: float = 0.0,
            crash_at: int | None = None, sigterm_at: int | None = None, slow_save: bool = False,
            name: str = "run", callbacks: list[dict] = (), model: dict | None = None) -> str:
    """A YAML overlay of the debug stage-2 recipe: tiny batches, checkpoints every `every` steps into
    `<tmp>/<name>/ckpt`, step marks in `<tmp>/<name>/marks`, no validation."""
    run = tmp / name
    run.mkdir(parents=True, exist_ok=True)
    marks = str(run / "marks")
    small = lambda cls: {"class_path": f"emu_lightning.data.synthetic.scenes.{cls}",  # noqa: E731
                         "init_args": {"split": "val", "size": 2, "image_size": 64}}
    evals = {"captions": small("SyntheticCaptions")}
    trainer = {
        "max_steps": max_steps, "val_check_interval": None, "limit_val_batches": 0, "log_every_n_steps": 1,
        "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
        "default_root_dir": str(run),   # the CLI's config.yaml lands here, not in the working directory
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(run / "ckpt"), "every_n_train_steps": every, "save_last": True,
                           "save_top_k": 0}},
            {"class_path": "callbacks.preemption.CheckpointOnSigterm"},
            {"class_path": "tests.resume_helpers.StepMarker",
             "init_args": {"marks": marks, "pause": pause, "crash_at": crash_at, "sigterm_at": sigterm_at}},
            *callbacks],
    }
    if slow_save:
        trainer["plugins"] = [{"class_path": "tests.resume_helpers.SlowCheckpointIO", "init_args": {"marks": marks}}]
    cfg = {"trainer": trainer,
           "model": {"init_args": {"shots": [0], "video_shots": [0], "max_new_tokens": 2, **(model or {})}},
           "data": {"init_args": {"val": evals, "test": evals, "demos": evals, "batch_size": 8, "eval_batch_size": 2,
                                  "num_workers": num_workers, "num_frames": 2, "max_length": 96}}}
    path = run / "overlay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def args(overlay_path: str, ckpt: str | None = None, recipe: str = RECIPE) -> list[str]:
    return ["fit", "--config", recipe, "--config", overlay_path] + (["--ckpt_path", ckpt] if ckpt else [])


def weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    return safe_load(ckpt)["state_dict"]


def assert_same_weights(a: str | Path, b: str | Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"


if __name__ == "__main__":
    from emu_lightning.cli import main

    torch.set_num_threads(1)
    sys.exit(main(args(*sys.argv[1:])))   # 143 when SIGTERM stopped the fit (last.ckpt saved), as main.py
