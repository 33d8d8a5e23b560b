"""Shared machinery of the released-checkpoint converters (docs/design.md §8).

A release is described by a list of `KeyMap`s, each pairing a released key pattern with our key pattern (or with
nothing, for a released tensor our components do not use). Conversion applies the first map that matches each
released key; a key no map matches, or two keys landing on one of ours, is an error that lists them. Tensors our
components do not use are never dropped: they are written aside (`released_extra.pt`) so that exporting back to the
released layout gives every released tensor, identical.

Patterns use `{}` for "one or more characters", the same group on both sides:
`KeyMap("visual.{}", "encoder.trunk.{}", ...)` maps `visual.blocks.0.norm1.weight`
→ `encoder.trunk.blocks.0.norm1.weight`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor


class ConversionError(ValueError):
    """A released checkpoint that cannot be converted: the message names the file and the keys."""


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class KeyMap:
    """One released parameter group and where it lands.

    Args:
        released: released key pattern (`{}` = any non-empty text).
        ours: our key pattern with the same `{}` count; None = not used by our components (kept aside).
        group: the released parameter group, as named in the report table.
        to_ours: tensor transform released → ours (e.g. a reshape); `to_released` is its inverse.
    """

    released: str
    ours: str | None
    group: str
    to_ours: Callable[[Tensor], Tensor] = _identity
    to_released: Callable[[Tensor], Tensor] = _identity

    def match(self, key: str, side: str) -> tuple[str, ...] | None:
        pattern = self.released if side == "released" else self.ours
        if pattern is None:
            return None
        m = _regex(pattern).fullmatch(key)
        return m.groups() if m else None


def llama_maps(lm: str, grow: Callable[[Tensor], Tensor], shrink: Callable[[Tensor], Tensor]) -> list[KeyMap]:
    """The released LLaMA under prefix `lm` (Emu and Emu2 save it alike): RoPE buffers checked and dropped, the
    vocabulary rows resized by `grow` / `shrink` (docs/converting.md, "The appended vocabulary rows"), every decoder
    layer and the final norm as they are."""
    return [
        KeyMap(f"{lm}model.layers.{{}}.self_attn.rotary_emb.inv_freq", None,
               "LLaMA RoPE inv_freq buffers (derived; checked)"),
        KeyMap(f"{lm}model.embed_tokens.weight", "llm.model.model.embed_tokens.weight", "LLaMA embed_tokens",
               grow, shrink),
        KeyMap(f"{lm}lm_head.weight", "llm.model.lm_head.weight", "LLaMA lm_head", grow, shrink),
        KeyMap(f"{lm}model.{{}}", "llm.model.model.{}", "LLaMA decoder layers + final norm"),
    ]


def _regex(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\{\}", "(.+?)"))


@dataclass
class Conversion:
    """The result of mapping a released state dict: our tensors, the unused released ones, and the plan."""

    ours: dict[str, Tensor]
    aside: dict[str, Tensor]
    plan: dict[str, str] = field(default_factory=dict)   # released key → our key, or "unused: <group>"
    dtypes: dict[str, str] = field(default_factory=dict)  # released key → its stored dtype ("bfloat16")


def to_ours(state: dict[str, Tensor], maps: list[KeyMap], source: str) -> Conversion:
    """Map every released key through the first matching `KeyMap`; unmatched or colliding keys raise."""
    out = Conversion({}, {})
    unmatched, collisions = [], []
    for key, value in state.items():
        rule = next((m for m in maps if m.match(key, "released") is not None), None)
        if rule is None:
            unmatched.append(key)
            continue
        out.dtypes[key] = str(value.dtype).removeprefix("torch.")
        if rule.ours is None:
            out.aside[key] = value
            out.plan[key] = f"unused: {rule.group}"
            continue
        target = rule.ours.format(*rule.match(key, "released"))
        if target in out.ours:
            collisions.append(f"{key} → {target}")
        out.ours[target] = rule.to_ours(value)
        out.plan[key] = target
    if unmatched or collisions:
        raise ConversionError(f"{source}: {len(unmatched)} released keys match no known parameter group: "
                              f"{sorted(unmatched)[:20]}; {len(collisions)} collide: {collisions[:5]}")
    return out


def to_released(ours: dict[str, Tensor], aside: dict[str, Tensor], maps: list[KeyMap], source: str,
                dtypes: dict[str, str] | None = None) -> dict[str, Tensor]:
    """The inverse of `to_ours`: our tensors renamed back, plus the aside tensors. `dtypes` (released key → dtype,
    as `to_ours` recorded them) casts each tensor back to the dtype the release stored it in: a model fine-tuned in
    fp32 from a bf16 release exports as bf16, as the released loaders expect."""
    out, unmatched = dict(aside), []
    for key, value in ours.items():
        rule = next((m for m in maps if m.match(key, "ours") is not None), None)
        if rule is None:
            unmatched.append(key)
            continue
        name = rule.released.format(*rule.match(key, "ours"))
        value = rule.to_released(value)
        out[name] = value.to(getattr(torch, dtypes[name])) if dtypes and name in dtypes else value
    if unmatched:
        raise ConversionError(f"{source}: {len(unmatched)} keys have no released counterpart: {sorted(unmatched)[:20]}")
    return out


def read_released(src: str) -> dict[str, Tensor]:
    """A released state dict from a file (.safetensors / .bin / .pt / .pth), an HF shard index (`*.index*.json`:
    `model.safetensors.index.json`, or a variant's `model.safetensors.index.bf16.json` as in Emu2-Gen's
    `multimodal_encoder/`), or a folder holding one index or else weight files. A `{"module": ...}` /
    `{"state_dict": ...}` wrapper is unwrapped (the released Emu1 loader and the first Emu2 loader unwrap "module")."""
    path = Path(src)
    if path.is_dir():
        index = sorted(path.glob("*.index*.json"))
        if len(index) > 1:
            raise ConversionError(f"{src}: {len(index)} shard indexes ({[p.name for p in index]}): pass the one "
                                  f"to convert as SRC")
        if index:
            return read_released(str(index[0]))
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        if not files:
            hint = (": an Emu2-Gen pipeline folder? pass its multimodal_encoder/ folder"
                    if (path / "multimodal_encoder").is_dir() else "")
            raise ConversionError(f"{src}: a folder with no weight files (.safetensors/.bin/.pt/.pth or "
                                  f"*.index*.json){hint}")
        return _merge(files, src)
    if not path.is_file():
        raise FileNotFoundError(f"released checkpoint not found: {src}")
    if path.suffix == ".json":
        weight_map = json.loads(path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{src}: a JSON file without a `weight_map`: not a shard index")
        return _merge(sorted({path.parent / f for f in weight_map.values()}), src)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:   # memory-mapped: a tensor's bytes are read when first touched (a full-size release is not copied)
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:   # a file in torch's legacy (pre-zip) format cannot be mapped
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("module", "state_dict", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConversionError(f"{src}: not a state dict of tensors")
    return obj


def _merge(files: list[Path], src: str) -> dict[str, Tensor]:
    """The shards' union; a key in two shards (e.g. two variants of one model side by side) is an error."""
    state: dict[str, Tensor] = {}
    for f in files:
        part = read_released(str(f))
        twice = sorted(part.keys() & state.keys())
        if twice:
            raise ConversionError(f"{src}: {len(twice)} keys appear in more than one weight file (first "
                                  f"{twice[:3]}, again in {f.name}): pass one file or its index as SRC")
        state.update(part)
    return state


def rope_tolerance(dtype: torch.dtype) -> float:
    """Relative error a stored `inv_freq` may have: the rounding of its dtype (bf16 2^-8, fp16 2^-11: the released
    loaders cast the whole model, buffers included, to bf16) plus fp32 slack for a different evaluation order."""
    return torch.finfo(dtype).eps / 2 + 1e-6


def check_rope(state: dict[str, Tensor], hidden: int, heads: int, source: str, heads_from: str,
               theta: float = 10000.0) -> None:
    """Released LLaMA `rotary_emb.inv_freq` buffers (transformers <= 4.30 saved them) must be the standard RoPE
    frequencies that our Llama recomputes; anything else would change the computation.

    Their length is head_dim / 2, so they show the head count that `heads` (from `heads_from`: a flag or a config
    field) must match; their values must be 1/theta^(2i/head_dim) within the rounding of the stored dtype."""
    if heads <= 0 or hidden % heads:
        raise ConversionError(f"{source}: {heads_from} does not divide the LLaMA width {hidden} into heads")
    head_dim = hidden // heads
    buffers = {k: v for k, v in state.items() if k.endswith("rotary_emb.inv_freq")}
    for key, v in buffers.items():
        if v.ndim != 1 or hidden % (2 * v.numel()):
            raise ConversionError(f"{source}: {key} has shape {tuple(v.shape)}; a RoPE inv_freq buffer has "
                                  f"head_dim / 2 entries, with head_dim dividing the LLaMA width {hidden}")
        if v.numel() != head_dim // 2:
            raise ConversionError(f"{source}: {key} has {v.numel()} entries, so head_dim = {2 * v.numel()} and the "
                                  f"LLaMA has {hidden} / {2 * v.numel()} = {hidden // (2 * v.numel())} heads; "
                                  f"{heads_from} gives {heads} heads (head_dim {head_dim})")
    want = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    for key, v in buffers.items():
        err = ((v.float() - want).abs() / want).max().item()
        if err > rope_tolerance(v.dtype):
            raise ConversionError(f"{source}: {key} ({v.dtype}) differs from the RoPE frequencies "
                                  f"1/{theta:g}^(2i/{head_dim}) that transformers' Llama computes by up to {err:.3g} "
                                  f"(relative); {v.dtype} rounding allows {rope_tolerance(v.dtype):.3g}. A scaled or "
                                  f"re-based RoPE is not what our Llama computes")


def count_blocks(state: dict[str, Tensor], prefix: str) -> int:
    """Number of `<prefix><i>.` blocks (i = 0..n-1, contiguous) in a state dict."""
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if found != set(range(len(found))):
        raise ConversionError(f"blocks under {prefix!r} are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def mlp_ratio(hidden: int, width: int) -> float:
    """An MLP ratio r with int(width · r) == hidden, as timm sizes the EVA MLP (hidden / width can round down)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def require(state: dict[str, Tensor], keys: list[str], source: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ConversionError(f"{source}: missing released keys {missing}")


def check_against(ours: dict[str, Tensor], parts: dict[str, torch.nn.Module], source: str) -> None:
    """Our converted tensors must be exactly the state of the parts the recipe builds (names and shapes)."""
    want = {f"{name}.{k}": v.shape for name, part in parts.items() for k, v in part.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(ours)), sorted(set(ours) - set(want))
    shapes = [f"{k} {tuple(ours[k].shape)} vs {tuple(want[k])}" for k in want.keys() & ours.keys()
              if tuple(ours[k].shape) != tuple(want[k])]
    if missing or unexpected or shapes:
        raise ConversionError(f"{source}: converted weights do not fit our components: missing {missing[:10]} "
                              f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)}), "
                              f"shapes {shapes[:5]}")
