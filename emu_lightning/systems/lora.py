"""LoRA as a what-trains option of the policy (docs/design.md §3): peft's LoRA layers in a part, only their factors
train, and peft's merge when the model leaves the platform.

`policy.lora: {llm: {r: 16, alpha: 16, dropout: 0.05, target_modules: [q_proj, k_proj, v_proj, o_proj]}}` is Emu-I's
setting (`Emu1/inference.py` L43-51 at baaivision/Emu 13c395e; Emu paper arXiv:2307.05222). `add_lora` hands the
part to peft's `inject_adapter_in_model`, which wraps each target `nn.Linear` in `peft.tuners.lora.Linear` and
freezes everything else in the part. The part's state then names each target's weight `<target>.base_layer.weight` and adds
`<target>.lora_A.default.weight` (r, in) and `<target>.lora_B.default.weight` (out, r): that is what checkpoints save
and a resumed run loads. Three translations connect it with plain (un-adapted) states:
- `merged_state_dict`: the part's state as the plain part would hold it, each target's weight W + (alpha / r) · B A
  (peft's `get_delta_weight`, the delta its `merge` adds): what an export writes.
- `lora_names`: a plain state (a converted release, an earlier stage) in the part's LoRA names, with the part's
  own factors (fresh: B = 0, so the adapted part computes exactly what the plain one does): the stage hand-off.
- `merge_lora_state`: a saved state dict's factors merged into their base weights, without building the model
  (alpha from the policy the checkpoint was trained with): the converter's export of a LoRA fine-tune.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

ADAPTER = "default"   # peft's adapter name; one adapter per part
_FACTOR = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight")


@dataclass
class LoraSpec:
    """One part's LoRA (defaults: Emu-I's, `Emu1/inference.py` L43-51).

    Args:
        r: rank of the update B A.
        alpha: the update is scaled by alpha / r.
        dropout: dropout on the adapter's input (training only).
        target_modules: names (suffixes) of the part's `nn.Linear`s to adapt (peft's `target_modules`).
    """

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def add_lora(part: nn.Module, spec: LoraSpec, name: str = "part") -> None:
    """Wrap `part`'s target modules in peft LoRA layers (in place); only the factors keep `requires_grad`."""
    from peft import LoraConfig, inject_adapter_in_model

    if lora_layers(part):
        raise ValueError(f"{name} already has LoRA layers; policy.lora adds them once")
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), bias="none")
    try:
        inject_adapter_in_model(config, part, adapter_name=ADAPTER)
    except ValueError as err:   # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"policy.lora.{name}.target_modules={list(spec.target_modules)}: {err}") from None


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The module's peft LoRA layers by qualified name (empty for a plain module)."""
    if "peft" not in sys.modules:   # nothing was adapted in this process: no need to import peft
        return {}
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """`module.state_dict()` with every LoRA layer merged as peft merges it (base weight + `get_delta_weight`) under
    the plain module's names; the module itself is unchanged. A module without LoRA gives its state as it is."""
    state = module.state_dict()
    for name, layer in lora_layers(module).items():
        base = f"{name}.base_layer."
        weight = state[base + "weight"]
        for adapter in layer.active_adapters:
            weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        state[base + "weight"] = weight
        state = {k.replace(base, f"{name}.") if k.startswith(base) else k: v for k, v in state.items()
                 if not k.startswith((f"{name}.lora_", f"{name}.lora_dropout"))}
    return state


def lora_names(module: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A plain state of `module` (no LoRA keys) renamed for its LoRA layers, with the module's own current factors
    added; `state` as it is when `module` has no LoRA layers or `state` already has LoRA keys (a resumed adapter)."""
    layers = lora_layers(module)
    if not layers or has_factors(state):
        return state
    out = dict(state)
    own = module.state_dict()
    for name in layers:
        for suffix in ("weight", "bias"):
            if f"{name}.{suffix}" in out:
                out[f"{name}.base_layer.{suffix}"] = out.pop(f"{name}.{suffix}")
        out.update({k: v for k, v in own.items() if k.startswith(f"{name}.lora_")})
    return out


def has_factors(state: dict[str, Tensor]) -> bool:
    """Whether a state dict holds LoRA factors (`….lora_A.<adapter>.weight` / `lora_B`)."""
    return any(_FACTOR.fullmatch(k) for k in state)


def lora_delta(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """The update a LoRA pair adds to its base weight: (alpha / r) · B A, r = A's rows, the product taken in fp32
    for bf16 / fp16 factors as peft's `get_delta_weight` does. a (r,in), b (out,r) -> (out,in); the caller casts."""
    half = b.dtype in (torch.float16, torch.bfloat16)
    return ((b.float() @ a.float()) if half else b @ a) * (alpha / a.shape[0])


def merge_lora_state(state: dict[str, Tensor], alphas: dict[str, float]) -> dict[str, Tensor]:
    """A saved state dict (keys `<part>.…`) with every LoRA target merged into its base weight and renamed to the
    plain name, factors dropped. `alphas`: each adapted part's alpha (r is read from the factors). Computes
    W + (alpha / r) · B A as peft's `get_delta_weight` does (the product in B's dtype, in fp32 for bf16 / fp16)."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if (m := _FACTOR.fullmatch(key)) is not None:
            pairs.setdefault(m["module"], {})[m["which"]] = value
    out = {k: v for k, v in state.items() if _FACTOR.fullmatch(k) is None}
    for module, ab in pairs.items():
        part = module.split(".", 1)[0]
        if part not in alphas:
            raise ValueError(f"LoRA factors under {module} but no alpha for part {part!r} (given: {sorted(alphas)})")
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]                                             # (r,in), (out,r)
        w = out.pop(f"{module}.base_layer.weight")                          # (out,in)
        out[f"{module}.weight"] = w + lora_delta(a, b, alphas[part]).to(b.dtype).to(w.dtype)
        if f"{module}.base_layer.bias" in out:
            out[f"{module}.bias"] = out.pop(f"{module}.base_layer.bias")
    return out
