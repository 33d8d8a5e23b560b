"""Stage hand-off: initialise a system's parts from an earlier stage's checkpoint, explicitly and verifiably.

`load_parts` reads a Lightning `.ckpt` (its `state_dict`) or a plain state dict, takes for each target part
the keys under a source prefix (`{"encoder": "encoder", "adapter": "adapter", "llm": "llm"}`: stage 1 and
stage 2 name their parts alike), loads them strictly, and checks afterwards that every loaded tensor equals
its source. Parts the mapping does not name keep their fresh initialisation and are listed as such.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from emu_lightning.checkpoints.io import safe_load


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


def read_state_dict(path: str) -> dict[str, Tensor]:
    """The model state of a Lightning checkpoint or a plain `torch.save`d state dict (read `weights_only`: a file
    that pickles arbitrary objects is refused, see `checkpoint_io.safe_load`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"hand-off checkpoint not found: {path}")
    obj = safe_load(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: neither a Lightning checkpoint with 'state_dict' nor a state dict of tensors")
    return state


@torch.no_grad()
def load_parts(parts: dict[str, nn.Module], path: str, mapping: dict[str, str]) -> HandoffReport:
    """Load `parts[target]` from the keys `<source>.*` of the checkpoint at `path`, for each target → source.

    Raises:
        ValueError: a mapping names an unknown part, a source prefix has no keys, a part has missing or
            unexpected keys, or a shape differs (each message names the part and the keys).
    """
    state = read_state_dict(path)
    unknown = sorted(set(mapping) - set(parts))
    if unknown:
        raise ValueError(f"hand-off mapping names {unknown}, but the system's parts are {sorted(parts)}")
    report = HandoffReport(path, fresh=[p for p in parts if p not in mapping])
    for target, source in mapping.items():
        prefix = source + "."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            prefixes = sorted({k.split(".")[0] for k in state})
            raise ValueError(f"{path}: no keys under {source!r} for part {target!r}; the checkpoint has {prefixes}")
        own = parts[target].state_dict()
        missing, unexpected = sorted(set(own) - set(sub)), sorted(set(sub) - set(own))
        if missing or unexpected:
            raise ValueError(f"{path}: part {target!r} from {source!r}: missing keys {missing[:5]} "
                             f"({len(missing)}), unexpected keys {unexpected[:5]} ({len(unexpected)})")
        bad = [f"{k} {tuple(sub[k].shape)} vs {tuple(own[k].shape)}" for k in own if sub[k].shape != own[k].shape]
        if bad:
            raise ValueError(f"{path}: part {target!r}: shapes differ (checkpoint vs model): {bad[:3]}")
        parts[target].load_state_dict(sub, strict=True)
        after = parts[target].state_dict()
        assert all(torch.equal(after[k].cpu(), sub[k].to(after[k].dtype)) for k in sub), f"{target} did not load"
        report.loaded[target] = len(sub)
    return report
