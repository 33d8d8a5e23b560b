"""Kill and resume: a stage-2 debug run stopped after a checkpoint and resumed ends with the same weights, bit for
bit on CPU, as the uninterrupted run (optimizer, schedule, data stream position, RNG and counters all restored).

Default suite (in-process, ~30 s): a crash at a random step, and a real SIGTERM (2 DataLoader workers).
Slow (`pytest -m slow tests/test_resume_stage2.py`, ~3 min): the crash-after-a-checkpoint and dropout runs
(the default suite keeps the SIGTERM one), the same through `main.py`-like subprocesses killed with SIGKILL /
SIGTERM from outside, and a SIGKILL in the middle of a slowed checkpoint write.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from emu_lightning.checkpoints.io import safe_load
from emu_lightning.cli import cli_main
from tests.resume_helpers import CFORMER_RECIPE, ROOT, args, assert_same_weights, overlay

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 7


def _reference(tmp: Path, num_workers: int) -> Path:
    cli = cli_main(args(overlay(tmp, STEPS, num_workers=num_workers, name="ref")))
    assert cli.trainer.global_step == STEPS
    return tmp / "ref" / "ckpt" / "last.ckpt"


def _resume(tmp: Path, name: str, num_workers: int, ckpt: Path | None = None) -> Path:
    ckpt = ckpt or tmp / name / "ckpt" / "last.ckpt"
    cli = cli_main(args(overlay(tmp, STEPS, num_workers=num_workers, name=name), str(ckpt)))
    assert cli.trainer.global_step == STEPS
    return tmp / name / "ckpt" / "last.ckpt"


@pytest.mark.slow
def test_crash_after_a_checkpoint_resumes_to_identical_weights(tmp_path):
    ref = _reference(tmp_path, num_workers=0)
    k = random.randint(3, STEPS - 1)           # checkpoints every 2 steps: the run loses steps after the last one
    with pytest.raises(KeyError, match=f"after step {k}"):
        cli_main(args(overlay(tmp_path, STEPS, crash_at=k, name="cut")))
    saved = safe_load(tmp_path / "cut" / "ckpt" / "last.ckpt")
    assert saved["global_step"] == (k - 1) // 2 * 2, k    # the crash comes before step k's own checkpoint
    assert_same_weights(ref, _resume(tmp_path, "cut", num_workers=0))

    # The comparison has teeth: the same resume without the saved stream position trains on other batches.
    del saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    torch.save(saved, tmp_path / "no_position.ckpt")
    (tmp_path / "cut" / "ckpt" / "last.ckpt").unlink()
    blind = _resume(tmp_path, "cut", num_workers=0, ckpt=tmp_path / "no_position.ckpt")
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_same_weights(ref, blind)


def test_sigterm_saves_a_checkpoint_and_resumes_to_identical_weights(tmp_path):
    ref = _reference(tmp_path, num_workers=2)
    k = 3   # odd: the next batch comes from the second worker, so resuming must rotate the workers' roles
    with pytest.raises(SystemExit):
        cli_main(args(overlay(tmp_path, STEPS, num_workers=2, sigterm_at=k, name="term")))
    marks = (tmp_path / "term" / "marks").read_text().split()
    assert marks == [str(s) for s in range(1, k + 1)]          # it stopped right after the signalled step
    saved = safe_load(tmp_path / "term" / "ckpt" / "last.ckpt")
    assert saved["global_step"] == k                            # saved at the SIGTERM, not at the last every-2
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["steps"] == k
    assert_same_weights(ref, _resume(tmp_path, "term", num_workers=2))
    # ...and the resumed run really started at step k + 1 (a run that ignored --ckpt_path and trained all 7 steps
    # from scratch would also end on the reference weights).
    marks = (tmp_path / "term" / "marks").read_text().split()
    assert marks == [str(s) for s in range(1, STEPS + 1)], marks


# --- the same from outside the process: main.py-like subprocesses, SIGKILL / SIGTERM ---------------------------

def _start(overlay_path: str, ckpt: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.resume_helpers", overlay_path] + ([ckpt] if ckpt else [])
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)


def _wait_for(path: Path, what: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    start = time.time()
    while time.time() - start < timeout:
        if path.exists() and what in path.read_text().split():
            return path.read_text()
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what!r} in {path}:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {what!r} in {path} after {timeout} s")


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def _subprocess_reference(tmp: Path) -> Path:
    _finish(_start(overlay(tmp, STEPS, num_workers=1, name="ref")))
    return tmp / "ref" / "ckpt" / "last.ckpt"


def _marks(path: Path) -> list[str]:
    return path.read_text().split()


def _assert_resumed_after(path: Path, before: list[str], step: int) -> None:
    """The resumed process marked exactly steps step+1..STEPS: it started from the checkpoint (a run that ignored
    --ckpt_path and trained every step from scratch would also end on the reference weights)."""
    resumed = _marks(path)[len(before):]       # one marks file for both processes: the resumed run's come last
    assert resumed == [str(s) for s in range(step + 1, STEPS + 1)], (step, before, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("sig, group", [(signal.SIGKILL, False), (signal.SIGTERM, False), (signal.SIGTERM, True)],
                         ids=["sigkill", "sigterm", "sigterm-to-the-group"])
def test_killed_subprocess_resumes_to_identical_weights(sig, group, tmp_path):
    """The recipe's DataLoader worker (num_workers 1); the parent kills the run at a random step past the first
    checkpoint, while it trains (0.3 s pause per step widens the window). `group`: the signal goes to the run's
    whole process group, its DataLoader worker included, as SLURM's scancel does."""
    ref = _subprocess_reference(tmp_path)
    k = random.randint(3, STEPS - 1)
    proc = _start(overlay(tmp_path, STEPS, num_workers=1, pause=0.3, name="cut"))
    _wait_for(tmp_path / "cut" / "marks", str(k), proc)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    killed_marks = _marks(tmp_path / "cut" / "marks")          # the killed run's marks, before the resume's
    saved = safe_load(tmp_path / "cut" / "ckpt" / "last.ckpt")
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert saved["global_step"] >= 2 and saved["global_step"] % 2 == 0, (k, saved["global_step"])
    else:
        assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
        assert "SIGTERM: saved" in out and saved["global_step"] >= k, (k, saved["global_step"], out[-2000:])
    _finish(_start(overlay(tmp_path, STEPS, num_workers=1, name="cut"), str(tmp_path / "cut" / "ckpt" / "last.ckpt")))
    _assert_resumed_after(tmp_path / "cut" / "marks", killed_marks, saved["global_step"])
    assert_same_weights(ref, tmp_path / "cut" / "ckpt" / "last.ckpt")


@pytest.mark.slow
def test_sigkill_during_a_slowed_checkpoint_write_keeps_the_previous_one(tmp_path):
    """The second checkpoint write (step 4) stalls halfway; SIGKILL then. last.ckpt must still be step 2's, whole,
    the half-written temporary file is refused with a clear message, and the run resumes to the reference."""
    ref = _subprocess_reference(tmp_path)
    proc = _start(overlay(tmp_path, STEPS, num_workers=1, slow_save=True, name="cut"))
    marks = tmp_path / "cut" / "marks"
    start = time.time()
    while not Path(str(marks) + ".saving").exists():
        assert proc.poll() is None and time.time() - start < 120, "the slowed save never started"
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    folder = tmp_path / "cut" / "ckpt"
    partial = [p for p in folder.iterdir() if ".tmp-" in p.name]
    assert len(partial) == 1, sorted(p.name for p in folder.iterdir())
    with pytest.raises(ValueError, match=r"not a torch checkpoint, or a truncated / corrupt one"):
        safe_load(partial[0])
    assert safe_load(folder / "last.ckpt")["global_step"] == 2
    before = _marks(marks)
    _finish(_start(overlay(tmp_path, STEPS, num_workers=1, name="cut"), str(folder / "last.ckpt")))
    _assert_resumed_after(marks, before, 2)
    assert_same_weights(ref, folder / "last.ckpt")


# --- the process RNG: a model that draws from it while it trains ------------------------------------------------

@pytest.mark.slow
def test_dropout_run_resumes_to_identical_weights(tmp_path):
    """The C-Former recipe with dropout 0.1: every training step draws dropout masks from the process RNG, so the
    resumed run matches the uninterrupted one only if the checkpoint's RNG state is restored (`set_rng_state`).
    (The mean-pool run above draws nothing from it: its resume would match without the restore.)"""
    steps, k = 4, 3
    run = lambda name, ckpt=None, **kw: cli_main(args(  # noqa: E731
        overlay(tmp_path, steps, name=name, model={"adapter": {"init_args": {"dropout": 0.1}}}, **kw), ckpt,
        recipe=CFORMER_RECIPE))
    run("ref")
    with pytest.raises(KeyError, match=f"after step {k}"):
        run("cut", crash_at=k)
    ckpt = tmp_path / "cut" / "ckpt" / "last.ckpt"
    assert safe_load(ckpt)["global_step"] == 2
    assert run("cut", str(ckpt)).trainer.global_step == steps
    assert_same_weights(tmp_path / "ref" / "ckpt" / "last.ckpt", ckpt)
