"""DataLoader workers leave SIGTERM to the main process (emu_lightning/data/modules/workers.py): a preemption that
signals the whole job (SLURM's scancel, `kill -- -<group>`) must not kill a worker before the main process has saved
its checkpoint. Every loader the datamodules build carries the hook, and a signalled worker keeps serving."""
from __future__ import annotations

import os
import signal
import time

import pytest

from emu_lightning.data.modules.workers import ignore_sigterm
from tests.helpers import tiny_datamodule, tiny_stage1, tiny_stage2, tiny_stage2_datamodule

pytestmark = pytest.mark.usefixtures("one_thread")


def _loaders(dm) -> dict:
    dm.setup("fit")
    out = {"train": dm.train_dataloader()}
    out.update({f"val/{i}": loader for i, loader in enumerate(dm.val_dataloader())})
    return out


@pytest.mark.parametrize("kind", ["captions", "multimodal"])
def test_every_loader_of_the_datamodules_ignores_sigterm_in_its_workers(kind):
    if kind == "captions":
        system = tiny_stage1()
        dm = tiny_datamodule(system)
    else:
        system = tiny_stage2()
        dm = tiny_stage2_datamodule(system)
    dm.num_workers = 1
    for name, loader in _loaders(dm).items():
        assert loader.worker_init_fn is ignore_sigterm, name


def test_a_signalled_worker_keeps_serving_batches():
    system = tiny_stage1()
    dm = tiny_datamodule(system, train_size=64, batch_size=4)
    dm.num_workers = 1
    it = iter(_loaders(dm)["train"])
    next(it)
    (worker,) = it._workers
    os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert worker.is_alive()
    for _ in range(3):   # a dead worker would raise "DataLoader worker ... is killed by signal: Terminated"
        assert len(next(it)["pixel_values"]) == 4
    del it
