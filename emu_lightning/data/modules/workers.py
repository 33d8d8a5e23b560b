"""DataLoader worker set-up shared by every datamodule."""
from __future__ import annotations

import signal


def ignore_sigterm(worker_id: int) -> None:
    """`worker_init_fn` of every loader: a worker leaves SIGTERM to the main process.

    A preemption often signals every process of a job at once (SLURM's `scancel`, `kill -- -<process group>`). A
    worker killed by it makes the main process raise at once ("DataLoader worker ... is killed by signal"), before
    `callbacks.preemption.CheckpointOnSigterm` can save; ignored here, the main process finishes its step, saves
    `last.ckpt` and shuts the workers down itself (they also exit when the main process is gone)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
