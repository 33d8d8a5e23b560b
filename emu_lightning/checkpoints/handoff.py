"""Stage hand-off: initialise a system's parts from an earlier stage's checkpoint, explicitly and verifiably.

`load_parts` reads a Lightning `.ckpt` (its `state_dict`) or a plain state dict, takes for each target part
the keys under a source prefix (`{"encoder": "encoder", "adapter": "adapter", "llm": "llm"}`: stage 1 and
stage 2 name their parts alike), loads them strictly, and checks afterwards that every loaded tensor equals
its source. Parts the mapping does not name keep their fresh initialisation and are listed as such.

A part built on the meta device takes the file's tensors themselves (`assign`); a part built on meta and already
FSDP2-sharded (`main.py --empty_init true` under `EmuModelParallelStrategy` on several processes, loaded from
`configure_model` after the sharding) takes on each rank only the rank's slice of each tensor, as the local shard of
its `DTensor` (`local_shard`): of memory-mapped safetensors shards, only those pages are read.

A checkpoint that does not fit is named for what it is (`CheckpointInfo`, also read by the CLI's `--ckpt_path`
check): `s1.ckpt is a checkpoint of Stage1System with parts ['adapter', 'encoder', 'llm']; this recipe (ChatSystem)
needs ['adapter', 'encoder', 'llm', 'regression_head']`, then the part and keys that differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from emu_lightning.checkpoints.io import safe_load
from emu_lightning.checkpoints.shards import meta_tensors, read_sharded
from emu_lightning.systems.lora import lora_names


@dataclass
class HandoffReport:
    """What a hand-off loaded: per target part the number of tensors, and the parts left fresh."""

    source: str
    loaded: dict[str, int] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [f"hand-off from {self.source}:"]
        rows += [f"  {part:<16} {n:>5} tensors loaded" for part, n in self.loaded.items()]
        rows += [f"  {part:<16} fresh (not in the mapping)" for part in self.fresh]
        return "\n".join(rows)


@dataclass
class CheckpointInfo:
    """What a checkpoint file is, for messages: the system class that saved it (LightningCLI records its class path
    in the hyper-parameters; None for a plain state dict or an unnamed module) and its state's keys and shapes."""

    path: str
    system: str | None
    lightning: bool
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, path: str, obj: Any) -> CheckpointInfo:
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{path}: neither a Lightning checkpoint with 'state_dict' nor a state dict of tensors")
        lightning = "state_dict" in obj
        hparams = obj.get("hyper_parameters") if lightning else None
        class_path = hparams.get("_class_path") if isinstance(hparams, dict) else None
        system = class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) else None
        return cls(str(path), system, lightning, {k: tuple(v.shape) for k, v in state.items()})

    @property
    def parts(self) -> list[str]:
        """The parts the state holds: the first name of each key (`encoder`, `adapter`, `llm`, ...)."""
        return part_names(self.shapes)

    def __str__(self) -> str:
        what = (f"a checkpoint of {self.system}" if self.system else "a Lightning checkpoint of an unnamed system"
                if self.lightning else "a plain state dict")
        return f"{self.path} is {what} with parts {self.parts}"

    def mismatch(self, system: str, needs: list[str], detail: str = "", hint: str = "") -> ValueError:
        """The error of this checkpoint given where `system` (the recipe's class) needs parts `needs`."""
        return ValueError(f"{self}; this recipe ({system}) needs {needs}{detail}" + (f". {hint}" if hint else ""))


def part_names(keys: Any) -> list[str]:
    """Sorted first names of state-dict keys: the parts of a system's state."""
    return sorted({k.split(".")[0] for k in keys})


def key_differences(have: dict[str, tuple], want: dict[str, tuple], part: str) -> str:
    """How the keys of `part` in a checkpoint (`have`: key → shape) differ from a model's (`want`), or ""."""
    prefix = part + "."
    mine = {k: v for k, v in have.items() if k.startswith(prefix)}
    own = {k: v for k, v in want.items() if k.startswith(prefix)}
    missing, unexpected = sorted(set(own) - set(mine)), sorted(set(mine) - set(own))
    if missing or unexpected:
        return (f"part {part!r} differs: missing keys {missing[:3]} ({len(missing)}), unexpected keys "
                f"{unexpected[:3]} ({len(unexpected)})")
    shapes = [f"{k} {mine[k]} vs {own[k]}" for k in own if mine[k] != own[k]]
    return f"part {part!r}: shapes differ (checkpoint vs model): {shapes[:3]}" if shapes else ""


def read_checkpoint(path: str) -> tuple[dict[str, Tensor], CheckpointInfo]:
    """The model state of a Lightning checkpoint or a plain `torch.save`d state dict, and what the file is (read
    `weights_only`: a file that pickles arbitrary objects is refused, see `checkpoint_io.safe_load`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"hand-off checkpoint not found: {path}")
    if Path(path).suffix in (".safetensors", ".json"):   # a converter's sharded weights, memory-mapped (shards.py)
        state = read_sharded(path)
        return state, CheckpointInfo(str(path), None, False, {k: tuple(v.shape) for k, v in state.items()})
    obj = safe_load(path)
    info = CheckpointInfo.of(path, obj)
    return obj.get("state_dict", obj), info


def read_state_dict(path: str) -> dict[str, Tensor]:
    """The model state of a Lightning checkpoint or a plain `torch.save`d state dict (see `read_checkpoint`)."""
    return read_checkpoint(path)[0]


@torch.no_grad()
def load_parts(parts: dict[str, nn.Module], path: str, mapping: dict[str, str],
               system: str = "this system", optional: tuple[str, ...] = ()) -> HandoffReport:
    """Load `parts[target]` from the keys `<source>.*` of the checkpoint at `path`, for each target → source.

    Args:
        path: a Lightning checkpoint, a `torch.save`d state dict, or safetensors weights (a file or a shard index,
            as the converter writes with `--shard-size`), which are memory-mapped.
        system: the class of the system loading (named in the errors).
        optional: targets loaded only when the checkpoint has their source (e.g. the decoder's UNet: present when
            tuning an earlier decoder run, absent in a stage-1 checkpoint); absent ones stay fresh.

    Raises:
        ValueError: a mapping names an unknown part; or the checkpoint does not fit: a source prefix has no keys,
            a part has missing or unexpected keys, or a shape differs. Those messages say what the file is (the
            system that saved it and its parts), what this recipe needs from it, and the part and keys that differ.
    """
    state, info = read_checkpoint(path)
    unknown = sorted(set(mapping) - set(parts))
    if unknown:
        raise ValueError(f"hand-off mapping names {unknown}, but the system's parts are {sorted(parts)}")
    mapping = {t: s for t, s in mapping.items()
               if t not in optional or any(k.startswith(s + ".") for k in state)}
    needs = sorted(set(mapping.values()))
    absent = [s for s in needs if not any(k.startswith(s + ".") for k in state)]
    if absent:
        raise info.mismatch(system, needs, f" (model.init_args.handoff {mapping}): no keys under {absent}",
                            "Give init_from a checkpoint that has these parts, or leave the missing ones out of "
                            "model.init_args.handoff to start them fresh")
    report = HandoffReport(path, fresh=[p for p in parts if p not in mapping])
    for target, source in mapping.items():
        prefix = source + "."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        sub = lora_names(parts[target], sub)   # a plain state into a `policy.lora` part: its fresh factors kept
        own = parts[target].state_dict()
        missing, unexpected = sorted(set(own) - set(sub)), sorted(set(sub) - set(own))
        if missing or unexpected:
            raise info.mismatch(system, needs, f"; part {target!r} from {source!r}: missing keys {missing[:5]} "
                                f"({len(missing)}), unexpected keys {unexpected[:5]} ({len(unexpected)})",
                                f"The recipe's {target} is not the one that was saved (another class or size)")
        bad = [f"{k} {tuple(sub[k].shape)} vs {tuple(own[k].shape)}" for k in own if sub[k].shape != own[k].shape]
        if bad:
            raise info.mismatch(system, needs, f"; part {target!r}: shapes differ (checkpoint vs model): {bad[:3]}",
                                f"The recipe's {target} is not the size that was saved")
        # A part built on the meta device (`shards.empty_init`) takes the checkpoint's tensors themselves: nothing
        # is copied, and memory-mapped shards stay file-backed, unless the part was built in another dtype (then
        # one cast, as a copy into an ordinary build). Its fresh LoRA factors (from `lora_names`, not from the file)
        # stay on meta here; `shards.materialize` initialises them (`PartsSystem.setup`, or `configure_model` when
        # sharded). A part already FSDP2-sharded on meta (its parameters are `DTensor`s) takes on each rank only
        # the rank's slice of each tensor (`local_shard`): only those pages of the file are read, and cast.
        empty = bool(meta_tensors(parts[target]))
        source = sub
        if empty:
            sub = {k: local_shard(v, own[k]) if _sharded(own[k]) and not v.is_meta
                   else v.to(own[k].dtype) if v.is_floating_point() and v.dtype != own[k].dtype else v
                   for k, v in sub.items()}
        parts[target].load_state_dict(sub, strict=True, assign=empty)
        after = parts[target].state_dict()
        if still := [k for k in sub if after[k].is_meta and not sub[k].is_meta]:
            raise ValueError(f"part {target!r}: {still[:3]} ({len(still)}) are on the meta device after assigning "
                             f"{path}'s tensors: load outside `empty_init()`, which moves every parameter set "
                             "inside it to meta")
        assert all(_loaded(after[k], sub[k], source[k]) for k in sub if not sub[k].is_meta), f"{target} did not load"
        report.loaded[target] = len(sub)
    return report


def _sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_slices(shape: torch.Size | tuple[int, ...], like: Any) -> tuple[slice, ...]:
    """The index of this rank's block of a tensor of global `shape` laid out as the `DTensor` `like` (its mesh and
    placements; FSDP2: `Shard(0)` over the data-parallel mesh): torch's own split
    (`compute_local_shape_and_global_offset`, which torch's distributed checkpoint uses for the same purpose)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    size, offset = compute_local_shape_and_global_offset(shape, like.device_mesh, like.placements)
    return tuple(slice(o, o + n) for n, o in zip(size, offset))


def local_shard(full: Tensor, like: Any) -> Any:
    """This rank's part of `full` as a `DTensor` laid out as `like` (a sharded parameter, possibly on meta): the
    view `full[offset : offset + local]` is all that is read (a memory-mapped tensor: only those pages), cast to
    `like`'s dtype and put on the mesh's device; the same dtype on CPU stays a view of `full` (nothing copied).
    As torch's `set_model_state_dict(..., full_state_dict=True)` builds a meta local's shard (`DTensor.from_local`
    of the slice), but without a collective: every rank has the file."""
    from torch.distributed.tensor import DTensor

    local = full[shard_slices(full.shape, like)]
    local = local.to(device=torch.device(like.device_mesh.device_type),
                     dtype=like.dtype if local.is_floating_point() else local.dtype)
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def _loaded(after: Tensor, given: Tensor, source: Tensor) -> bool:
    """Whether the part's tensor `after` holds what was given to `load_state_dict` (in `after`'s dtype); for a
    sharded `after`, its local shard against the same slice of the file's `source` (no gather, no read outside it)."""
    if _sharded(after):
        return torch.equal(after.to_local().cpu(), source[shard_slices(source.shape, after)].to(after.dtype))
    return torch.equal(after.cpu(), given.to(after.dtype))
