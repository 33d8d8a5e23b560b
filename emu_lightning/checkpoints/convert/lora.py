"""Emu-I's LoRA layout: the instruction-tuned Emu keeps its LLaMA wrapped by peft, so its file holds the frozen base
weights and low-rank factors; converting merges them (docs/converting.md, "Emu-I").

`Emu1/inference.py` L40-57 wraps `model.decoder.lm` with `get_peft_model(LoraConfig(r=16, lora_alpha=16,
target_modules=[q_proj, k_proj, v_proj, o_proj]))` before loading `Emu-instruct.pt`, so every LLaMA key gains
`base_model.model.` after `decoder.lm.` and each target gets `lora_A.<adapter>.weight` (r, in) and
`lora_B.<adapter>.weight` (out, r); peft >= 0.7 also moves the base weight to `<target>.base_layer.weight`.
peft computes W x + (alpha / r) · B A x, so merging gives W' = W + (alpha / r) · B A (Hu et al. 2021, LoRA),
with the product in fp32 and the sum in W's dtype, as peft merges on CPU. alpha is not in the weights: it is
`--lora-alpha` (default 16, inference.py L45); r is read from the factors' shapes.

The export writes the peft layout back with the merged weights as the base and every `lora_B` zero: the file loads
into the released code exactly as before and computes the merged (possibly fine-tuned) model; a zero B is also how
LoRA starts training, so the file is a fresh adapter on top of the merged weights.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from emu_lightning.checkpoints.convert.common import ConversionError
from emu_lightning.systems.lora import lora_delta

PEFT = "decoder.lm.base_model.model."      # `model.decoder.lm = get_peft_model(model.decoder.lm, ...)`
FACTOR = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")


def merge_lora(state: dict[str, Tensor], alpha: float, source: str) -> tuple[dict[str, Tensor], dict]:
    """The state with each LoRA target's base weight replaced, under its own released name, by the merged weight;
    the factors stay (our key maps keep them aside). Returns it and what the export needs (conversion.json `lora`)."""
    pairs: dict[str, dict[str, str]] = {}
    adapters = set()
    for key in state:
        m = FACTOR.fullmatch(key)
        if m:
            pairs.setdefault(m["module"], {})[m["which"]] = key
            adapters.add(m["adapter"])
    if not pairs:
        raise ConversionError(f"{source}: keys under {PEFT!r} but no lora_A / lora_B factors")
    if len(adapters) != 1:
        raise ConversionError(f"{source}: LoRA factors of {len(adapters)} adapters {sorted(map(str, adapters))}; "
                              f"Emu-I has one")
    out, base_layer = dict(state), None
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ConversionError(f"{source}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        names = [n for n in (f"{module}.weight", f"{module}.base_layer.weight") if n in state]
        if len(names) != 1:
            raise ConversionError(f"{source}: LoRA target {module} has {names or 'no'} base weight; expected "
                                  f"{module}.weight or {module}.base_layer.weight")
        if base_layer is not None and base_layer != names[0].endswith(".base_layer.weight"):
            raise ConversionError(f"{source}: some LoRA targets have `.base_layer.weight` and some do not")
        base_layer = names[0].endswith(".base_layer.weight")
        w, a, b = state[names[0]], state[ab["A"]], state[ab["B"]]       # (out,in), (r,in), (out,r)
        r = a.shape[0]
        if a.shape[1] != w.shape[1] or tuple(b.shape) != (w.shape[0], r):
            raise ConversionError(f"{source}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                                  f"factor an update of the base weight {tuple(w.shape)}")
        out[names[0]] = w + lora_delta(a, b, alpha).to(w.dtype)
    return out, {"alpha": alpha, "adapter": adapters.pop(), "base_layer": base_layer, "targets": sorted(pairs)}


def zero_lora_b(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The exported peft layout: every `lora_B` zero (its update is already in the base weight)."""
    return {k: torch.zeros_like(v) if (m := FACTOR.fullmatch(k)) and m["which"] == "B" else v
            for k, v in state.items()}
