"""The converted folder: what a converter writes and what `export` reads back.

```
DST/weights.pt            # our parts' state dict (encoder.* adapter.* llm.* regression_head.*): `init_from`
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

HANDOFF = {"encoder": "encoder", "adapter": "adapter", "llm": "llm", "regression_head": "regression_head"}


def write_folder(dst: str, conversion: Conversion, tokenizer: Any, components: dict[str, dict], meta: dict,
                 image_size: int, note: str) -> Path:
    """Write the converted folder; `components` maps part → {class_path, init_args} (recipe form)."""
    out = Path(dst).resolve()
    out.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(conversion.ours, out / "weights.pt")
    atomic_torch_save(conversion.aside, out / "released_extra.pt")
    tokenizer.save_pretrained(str(out / "tokenizer"))
    overlay = {"model": {"init_args": {**components, "tokenizer": str(out / "tokenizer"),
                                       "init_from": str(out / "weights.pt"), "handoff": dict(HANDOFF)}},
               "data": {"init_args": {"image_size": image_size}}}
    header = (f"# {note}\n# Stack it after a recipe: main.py fit --config recipes/<emu1|emu2>/finetune_released.yaml "
              f"--config {out / 'model.yaml'}\n")
    (out / "model.yaml").write_text(header + yaml.safe_dump(overlay, sort_keys=False))
    (out / "conversion.json").write_text(json.dumps({**meta, "keys": conversion.plan, "dtypes": conversion.dtypes},
                                                    indent=1))
    return out


def read_folder(folder: str, weights: str | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """(our tensors, aside tensors, conversion.json) of a converted folder.

    `weights`: a fine-tuned Lightning checkpoint (or state dict) to export instead of the folder's `weights.pt`;
    its `encoder.* adapter.* llm.* regression_head.*` tensors are taken, and every one of them must be there.
    """
    from emu_lightning.checkpoints.handoff import read_state_dict

    path = Path(folder)
    for name in ("weights.pt", "released_extra.pt", "conversion.json"):
        if not (path / name).is_file():
            raise ConversionError(f"{folder} is not a converted folder: {name} is missing")
    meta = json.loads((path / "conversion.json").read_text())
    ours = safe_load(path / "weights.pt")
    if weights is not None:
        trained = read_state_dict(weights)
        missing = sorted(set(ours) - set(trained))
        if missing:
            raise ConversionError(f"{weights}: lacks {len(missing)} tensors of the converted parts: {missing[:10]}")
        ours = {k: trained[k] for k in ours}
    return ours, safe_load(path / "released_extra.pt"), meta


def save_released(state: dict[str, Tensor], path: str) -> None:
    """Write a state dict in the released layout: a safetensors file when `path` ends in `.safetensors` (Emu2-Gen's
    native file is one, read by `Emu2/emu/diffusion.py` with `load_file`), else one torch file (`torch.load`)."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
