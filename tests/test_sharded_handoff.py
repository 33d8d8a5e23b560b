"""Full-size loading under FSDP2: a part built on the meta device and sharded first takes on each rank only the
rank's slice of each tensor of the memory-mapped shards (`handoff.local_shard`), and what `init_from` does not hold
is initialised on its shards (`shards.materialize`).

In process, each rank of 2 is played by this process on torch's fake process group (no collectives run; the
sharding, the slices and the assignment are the real ones): every read of the file's tensors is recorded
(`tests/scripts/sharded_empty_init.py: Recorded`), and only the rank's own rows may be read. The 2-process run
(`main.py fit --empty_init true` under `EmuModelParallelStrategy`, gloo, torchrun, one training step; about 40 s on
2 cores) is slow: `.venv/bin/python -m pytest -n 0 -q -m slow tests/test_sharded_handoff.py`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from emu_lightning.checkpoints.handoff import load_parts
from emu_lightning.checkpoints.shards import empty_init, materialize, meta_tensors, save_sharded
from tests.scripts.sharded_empty_init import Recorded, chunk, recording_reader
from tests.test_shards import release  # noqa: F401  (the fixture: a tiny bf16 Emu2 converted to shards)

ROOT = Path(__file__).resolve().parents[1]


def _net() -> nn.Module:
    # Rows 5, 3, 1 and 4: uneven blocks over 2 ranks (3 + 2, 2 + 1, 1 + 0) and an even one; a buffer stays whole.
    net = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 1), nn.LayerNorm(4))
    net.register_buffer("scale", torch.tensor([2.0, 3.0]))
    return net


@pytest.fixture
def fake_rank(monkeypatch):
    """`start(rank)`: this process is rank `rank` of 2 on torch's fake process group, with a 2-rank CPU mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def start(rank: int):
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=2)
        # Named per rank: meshes compare equal regardless of the rank, and torch caches DTensor layouts by mesh, so
        # an unnamed rank-1 mesh in this process would be given rank 0's (and its coordinate) back.
        return init_device_mesh("cpu", (2,), mesh_dim_names=(f"rank{rank}",))

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_and_holds_only_its_slice_of_a_bf16_file(fake_rank, tmp_path, monkeypatch, rank):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    file = {f"net.{k}": v.to(torch.bfloat16) for k, v in _net().state_dict().items()}
    path = save_sharded(file, tmp_path / "w", max_shard_size=100)     # several shards and an index
    mesh = fake_rank(rank)
    with empty_init():
        parts = {"net": _net(), "head": nn.Linear(4, 6)}
    for layer in parts["net"]:
        fully_shard(layer, mesh=mesh)
    for part in parts.values():
        fully_shard(part, mesh=mesh)
    reads: list = []
    monkeypatch.setattr("emu_lightning.checkpoints.handoff.read_sharded", recording_reader(reads))

    report = load_parts(parts, str(path), {"net": "net"})
    assert report.loaded == {"net": 9} and report.fresh == ["head"]
    state = parts["net"].state_dict()
    for key, full in file.items():
        value = state[key[len("net."):]]
        if isinstance(value, DTensor):
            start, stop = chunk(full.shape[0], rank, 2)
            assert value.shape == full.shape and value.dtype == torch.float32            # the parts' dtype
            assert torch.equal(value.to_local(), full[start:stop].float()), key
        else:                                                                          # the buffer: whole
            assert torch.equal(value, full.float()), key
    sharded = {f"net.{k}" for k, v in state.items() if isinstance(v, DTensor)}
    assert sharded == set(file) - {"net.scale"}
    for key, op, spans in reads:
        if key in sharded:   # only slices of this rank's rows, all columns; nothing else touches the full tensor
            assert op == "slice" and spans == [chunk(file[key].shape[0], rank, 2),
                                               *[[0, n] for n in file[key].shape[1:]]], (key, op, spans)
    assert {k for k, op, _ in reads if op == "slice"} == sharded                       # every one was read

    assert meta_tensors(parts["head"]) and not meta_tensors(parts["net"])
    done = materialize(parts)                                                          # the fresh part, on shards
    assert done == {"head": ["head (FSDPLinear)"]} and not meta_tensors(parts["head"])
    weight = parts["head"].weight
    assert isinstance(weight, DTensor) and weight.to_local().shape == (3, 4)
    assert 0 < weight.to_local().abs().max() <= 4 ** -0.5                             # nn.Linear's own bound


class _Scale(nn.Module):
    """A parameter whose module has no `reset_parameters()`: nothing can initialise it on meta."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))


def test_sharded_hand_off_keeps_the_checks_on_keys_and_on_what_stays_on_meta(fake_rank, tmp_path):
    from torch.distributed.fsdp import fully_shard

    file = {f"net.{k}": v for k, v in _net().state_dict().items() if k != "3.bias"}
    path = save_sharded(file, tmp_path / "w", max_shard_size=100)
    mesh = fake_rank(1)
    with empty_init():
        parts = {"net": _net(), "gain": _Scale()}
    for part in parts.values():
        fully_shard(part, mesh=mesh)
    with pytest.raises(ValueError, match=r"part 'net' from 'net': missing keys \['3.bias'\] \(1\)"):
        load_parts(parts, str(path), {"net": "net"})
    with pytest.raises(ValueError, match=r"1 tensors are still on the meta device .*\['gain.gain'\]; parts \['gain'\]"):
        materialize({"gain": parts["gain"]})


def test_a_full_read_is_recorded():
    log: list = []
    t = torch.arange(12.0).reshape(4, 3).as_subclass(Recorded)
    t.key, t.log = "w", log
    assert t.shape == (4, 3) and t.is_floating_point() and not t.is_meta and not log   # metadata reads nothing
    assert type(t[2:4]) is torch.Tensor and torch.equal(t[2:4], torch.arange(6.0, 12.0).reshape(2, 3))
    t.to(torch.bfloat16)
    assert log == [("w", "slice", [[2, 4], [0, 3]])] * 2 + [("w", "to", None)]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_main_fit_empty_init_on_2_ranks_reads_only_each_ranks_slices(release, tmp_path):
    """`main.py fit --empty_init true` under `EmuModelParallelStrategy` on 2 gloo processes (torchrun), from the bf16
    shards of a converted release into the fp32 parts, the regression head left out of the hand-off: on each rank
    every parameter's local shard is its slice of the file, nothing else of the sharded tensors was read, the head
    is initialised, nothing is on meta, and a training step runs."""
    import yaml

    from tests.test_convert_emu2 import RECIPE
    from tests.test_convert_roundtrip import STAGE2_DATA, data_overlay

    _, _, folder = release
    overlay = data_overlay(tmp_path, STAGE2_DATA, video_token=True)
    sharded = tmp_path / "sharded.yaml"
    sharded.write_text(yaml.safe_dump({"trainer": {
        "strategy": {"class_path": "emu_lightning.systems.sharding.EmuModelParallelStrategy"}, "devices": 2,
        "max_steps": 1, "callbacks": [{"class_path": "tests.scripts.sharded_empty_init.CheckShards",
                                       "init_args": {"out": str(tmp_path)}}]}}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "tests.scripts.sharded_empty_init", str(tmp_path), "--", "fit", "--config", str(RECIPE), "--config",
           str(folder / "model.yaml"), "--config", overlay, "--config", str(sharded), "--empty_init", "true",
           "--model.init_args.handoff", "{encoder: encoder, adapter: adapter, llm: llm}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, out in enumerate(ranks):
        assert (out["rank"], out["world"], out["global_step"]) == (rank, 2, 1)
        assert out["compared"] == len(out["sharded_keys"]) > 0 and out["wrong"] == []
        assert out["placements"] == ["(Shard(dim=0),)"]
        assert out["meta"] == [] and out["dtypes"] == ["torch.float32"]        # the bf16 file, cast per slice
        head = out["fresh"]["regression_head"]
        assert head and all(0 < peak and std > 0 for peak, std in head.values())
        sharded_keys = set(out["sharded_keys"])
        seen = set()
        for key, op, spans in out["reads"]:
            if key in sharded_keys:
                assert op == "slice" and spans[0] == list(chunk_rows(out, key, rank)), (rank, key, op, spans)
                assert all(a == 0 for a, _ in spans[1:]), (rank, key, spans)
                seen.add(key)
        assert seen == sharded_keys
    assert "hand-off from" in ranks[0]["report"] and "regression_head" in ranks[0]["report"]


def chunk_rows(out: dict, key: str, rank: int) -> list[int]:
    return chunk(out["rows"][key], rank, out["world"])
