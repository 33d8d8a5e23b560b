"""Full-size loading under FSDP2 on 2 processes: `main.py fit --empty_init true` with the strategy
`EmuModelParallelStrategy`, where each rank must read only its own slice of each tensor of `init_from`.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.scripts.sharded_empty_init OUT -- ARGS

ARGS are `main.py`'s (`fit --config ... --empty_init true`). Every tensor the hand-off maps from the safetensors
shards is a `Recorded` tensor here: `full[index]` logs the index, any other operation on it logs a read of the
whole tensor. `CheckShards` (a callback the test's overlay names) compares, before the first step, every rank's
local shard of every parameter with the same slice of the file, and writes OUT/rank{r}.json: the reads, the
comparison, the tensors left on meta, the parts initialised fresh and, at the end, the steps run. With
STACKS_AFTER=<seconds> in the environment each rank writes every thread's stack to OUT/stacks<rank>.txt after that
long (to see where a hung run waits).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

# Tensor attributes and methods that read no element.
METADATA = {"shape", "dtype", "device", "is_meta", "is_floating_point", "dim", "ndim", "size", "numel", "layout",
            "requires_grad", "is_sparse", "is_quantized", "__len__", "stride", "is_complex", "names"}


class Recorded(torch.Tensor):
    """A view of a file's tensor that logs into `log` (key, "slice", [[start, stop] per dim]) for `t[index]` and
    (key, op, None) for any other operation that reads elements; the results are plain tensors."""

    key: str = ""
    log: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in ("__get__", "__set__"):
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        me = next((a for a in args if isinstance(a, Recorded)), None)
        if name == "__getitem__" and me is args[0]:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if all(isinstance(i, slice) and i.step in (None, 1) for i in index):
                spans = [range(n)[i] for i, n in zip(index, me.shape)] + [range(n) for n in me.shape[len(index):]]
                me.log.append((me.key, "slice", [[r.start, r.stop] for r in spans]))
            else:
                me.log.append((me.key, "index", None))
        elif name not in METADATA and me is not None:
            me.log.append((me.key, name, None))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        return out.as_subclass(torch.Tensor) if isinstance(out, Recorded) else out


def recording_reader(log: list):
    """`shards.read_sharded` returning `Recorded` tensors that log into `log` (for the hand-off's `read_sharded`)."""
    from emu_lightning.checkpoints.shards import read_sharded as plain

    def read_sharded(path):
        out = {}
        for key, value in plain(path).items():
            out[key] = value.as_subclass(Recorded)
            out[key].key, out[key].log = key, log
        return out

    return read_sharded


def chunk(n: int, rank: int, world: int) -> list[int]:
    """[start, stop) of rank's dim-0 block of n rows, as `torch.chunk` (and FSDP2) splits them."""
    size = math.ceil(n / world) if n else 0
    return [min(rank * size, n), min((rank + 1) * size, n)]


class CheckShards(L.Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.report: dict[str, Any] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor, Shard

        from emu_lightning.checkpoints.shards import meta_tensors, read_sharded

        rank, world = trainer.global_rank, trainer.world_size
        file = read_sharded(pl_module.init_from)
        mapping = dict(pl_module.handoff)
        compared, wrong, placements = 0, [], set()
        for key, value in pl_module.state_dict().items():
            part, rest = key.split(".", 1)
            if part not in mapping or not isinstance(value, DTensor):
                continue
            placements.add(str(value.placements))
            full = file[f"{mapping[part]}.{rest}"]
            start, stop = chunk(full.shape[0], rank, world)
            local = value.to_local()
            if value.placements != (Shard(0),) or not torch.equal(local, full[start:stop].to(local.dtype)):
                wrong.append(key)
            compared += 1
        fresh = {}
        for part, module in pl_module.parts.items():
            if part not in mapping:
                fresh[part] = {n: [float(p.to_local().abs().max()), float(p.to_local().std())]
                               for n, p in module.named_parameters()}
        self.report.update(rank=rank, world=world, compared=compared, wrong=wrong, placements=sorted(placements),
                           meta=meta_tensors(pl_module), fresh=fresh,
                           sharded_keys=sorted(f"{mapping[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}"
                                               for k, v in pl_module.state_dict().items()
                                               if isinstance(v, DTensor) and k.split(".", 1)[0] in mapping),
                           rows={k: v.shape[0] for k, v in file.items() if v.dim()},
                           dtypes=sorted({str(p.dtype) for p in pl_module.parameters()}),
                           reads=list(Recorded.log), report=str(pl_module.handoff_report))
        self._write(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.report["global_step"] = trainer.global_step
        self._write(trainer)

    def _write(self, trainer) -> None:
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.report))


if __name__ == "__main__":
    out, args = Path(sys.argv[1]), sys.argv[sys.argv.index("--") + 1:]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    if os.environ.get("STACKS_AFTER"):   # debugging a hang: every thread's stack, once, after that many seconds
        import faulthandler

        stacks = open(out / f"stacks{os.environ.get('RANK', 0)}.txt", "w")   # noqa: SIM115 (open until exit)
        faulthandler.dump_traceback_later(float(os.environ["STACKS_AFTER"]), file=stacks)
    from emu_lightning.checkpoints import handoff
    from emu_lightning.cli import cli_main

    from tests.scripts import sharded_empty_init as module   # the callback's module (this one runs as __main__)

    module.Recorded.log = []
    handoff.read_sharded = module.recording_reader(module.Recorded.log)

    os.chdir(out)
    cli_main(args)
