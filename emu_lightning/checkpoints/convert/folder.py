"""The converted folder: what a converter writes and what `export` reads back.

```
DST/weights.pt            # our parts' state dict (encoder.* adapter.* llm.* regression_head.*): `init_from`
DST/weights/              # instead, with `--shard-size`: safetensors shards + model.safetensors.index.json, which
                          #   the hand-off memory-maps into parts built empty (checkpoints/shards.py)
DST/released_extra.pt     # released tensors our components do not use (kept for an exact export)
DST/tokenizer/            # the released tokenizer (+ the platform's specials appended)
DST/model.yaml            # recipe overlay: component shapes, released behaviour options, tokenizer, init_from
DST/conversion.json       # release, layout, vocabulary rows, released key → our key and → stored dtype, every key
```
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from emu_lightning.checkpoints.io import atomic_torch_save, safe_load
from emu_lightning.checkpoints.convert.common import Conversion, ConversionError
from emu_lightning.checkpoints.shards import read_sharded, save_sharded

HANDOFF = {"encoder": "encoder", "adapter": "adapter", "llm": "llm", "regression_head": "regression_head"}


def write_folder(dst: str, conversion: Conversion, tokenizer: Any, components: dict[str, dict], meta: dict,
                 image_size: int, note: str, shard_size: int | str | None = None) -> Path:
    """Write the converted folder; `components` maps part → {class_path, init_args} (recipe form); `shard_size`
    (e.g. "2GB"): our weights as safetensors shards of at most that size instead of one `weights.pt`."""
    out = Path(dst).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if shard_size is None:
        weights = out / "weights.pt"
        atomic_torch_save(conversion.ours, weights)
    else:
        weights = save_sharded(conversion.ours, out / "weights", shard_size)
    atomic_torch_save(conversion.aside, out / "released_extra.pt")
    tokenizer.save_pretrained(str(out / "tokenizer"))
    overlay = {"model": {"init_args": {**components, "tokenizer": str(out / "tokenizer"),
                                       "init_from": str(weights), "handoff": dict(HANDOFF)}},
               "data": {"init_args": {"image_size": image_size}}}
    header = (f"# {note}\n# Stack it after a recipe: main.py fit --config recipes/<emu1|emu2>/finetune_released.yaml "
              f"--config {out / 'model.yaml'}\n")
    (out / "model.yaml").write_text(header + yaml.safe_dump(overlay, sort_keys=False))
    (out / "conversion.json").write_text(json.dumps({**meta, "weights": str(weights.relative_to(out)),
                                                     "keys": conversion.plan, "dtypes": conversion.dtypes}, indent=1))
    return out


def read_folder(folder: str, weights: str | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """(our tensors, aside tensors, conversion.json) of a converted folder.

    `weights`: a fine-tuned Lightning checkpoint (or state dict) to export instead of the folder's `weights.pt`;
    its `encoder.* adapter.* llm.* regression_head.*` tensors are taken, and every one of them must be there. A
    checkpoint trained with `policy.lora` has its LoRA factors merged first (`lora_merged`).
    """

    path = Path(folder)
    if not (path / "conversion.json").is_file():
        raise ConversionError(f"{folder} is not a converted folder: conversion.json is missing")
    meta = json.loads((path / "conversion.json").read_text())
    for name in (meta.get("weights", "weights.pt"), "released_extra.pt"):
        if not (path / name).is_file():
            raise ConversionError(f"{folder} is not a converted folder: {name} is missing")
    ours = read_weights(path / meta.get("weights", "weights.pt"))
    if weights is not None:
        trained = lora_merged(weights)
        missing = sorted(set(ours) - set(trained))
        if missing:
            raise ConversionError(f"{weights}: lacks {len(missing)} tensors of the converted parts: {missing[:10]}")
        ours = {k: trained[k] for k in ours}
    return ours, safe_load(path / "released_extra.pt"), meta


def read_weights(path: Path) -> dict[str, Tensor]:
    """A converted folder's weights: `weights.pt`, or the safetensors shards (memory-mapped) `--shard-size` wrote."""
    return read_sharded(path) if path.suffix in (".safetensors", ".json") else safe_load(path)


def save_released(state: dict[str, Tensor], path: str) -> None:
    """Write a state dict in the released layout: a safetensors file when `path` ends in `.safetensors` (Emu2-Gen's
    native file is one, read by `Emu2/emu/diffusion.py` with `load_file`), else one torch file (`torch.load`)."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)


def lora_merged(path: str) -> dict[str, Tensor]:
    """The model state of a checkpoint, with the LoRA factors of a `policy.lora` run merged into their base weights
    under the plain names (`merge_lora_state`; each part's alpha from the policy in the checkpoint's
    hyper-parameters, where LightningCLI records it)."""
    from emu_lightning.checkpoints.handoff import CheckpointInfo
    from emu_lightning.systems.lora import has_factors, merge_lora_state

    obj = safe_load(path)
    CheckpointInfo.of(path, obj)                                     # a checkpoint or state dict of tensors
    state = obj.get("state_dict", obj)
    if not has_factors(state):
        return state
    hparams = obj.get("hyper_parameters") or {}
    lora = (hparams.get("policy") or {}).get("lora") if isinstance(hparams.get("policy"), dict) else None
    if not lora:
        raise ConversionError(f"{path}: has LoRA factors but no `policy.lora` in its hyper-parameters to read each "
                              f"part's alpha from (a checkpoint of a `main.py fit` run with policy.lora has it)")
    return merge_lora_state(state, {part: float(spec["alpha"]) for part, spec in lora.items()})
