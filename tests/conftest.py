"""Shared fixtures: offline hub, deterministic seeds per test, tiny tokenizer."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# Under pytest-xdist each worker gets its share of the cores: N workers with torch's default thread count each
# would oversubscribe the machine (tiny models gain nothing from intra-op threads anyway).
# The processes a test starts (a CLI run, a chain stage, a crash-and-resume child) inherit the same share through
# OMP_NUM_THREADS, or each would start with every core's worth of threads beside the other workers.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_share)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="module")
def one_thread():
    """Tests sized for one core (the machine's cores are shared with training runs): `usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    from emu_lightning.data.layout.tokenizer import load_tokenizer

    return load_tokenizer()
