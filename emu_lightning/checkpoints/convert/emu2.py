"""Emu2 (base / Chat / Gen) release → our Stage-2 parts, and back.

Released layouts (read from `baaivision/Emu`, `Emu2/emu/{emu.py, lm.py, eva_vit.py, conf/emu_conf.py}`, and the
Hugging Face `EmuForCausalLM` remote code):
- `native` (the PyTorch release): `visual.*` (EVA-02-CLIP-E-plus, post-norm, no final norm, no head),
  `decoder.lm.model.*` + `decoder.lm.lm_head` (transformers LLaMA), `decoder.lm.project_up`, `decoder.lm.project_down`;
  older files name the last two `vl_adapter.projection` / `decoder.lm.stu_regress_head` (emu.py renames them).
- `hf`: `model.visual.*`, `model.decoder.lm.*`, `project_up`, `project_down`.

Computation (emu.py `encode_image` / `generate_image`): EVA blocks → drop CLS → (B,D,s,s) row-major → avg-pool
with kernel = stride = s/√n_query → `project_up` into the LLM; regression = `project_down` of the final-norm hidden
state; the fed-back input is `project_up(project_down(h))`.
Ours: `EVAEncoder(eva02_enormous…, layer=-1, drop_cls=True)`, `MeanPoolProjector(grid=√n_query)`, `LlamaLM`,
`RegressionHead`, `Stage2System(target_space="pooled")`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from emu_lightning.checkpoints.convert.common import (
    ConversionError, KeyMap, check_against, check_rope, count_blocks, mlp_ratio, read_released, require, to_ours,
    to_released)
from emu_lightning.checkpoints.convert.folder import read_folder, write_folder
from emu_lightning.checkpoints.convert.tokenizer import EMU2_SPECIALS, released_tokenizer

PREFIXES = {"native": ("visual.", "decoder.lm."), "hf": ("model.visual.", "model.decoder.lm.")}


def detect_layout(state: dict[str, Tensor], source: str) -> str:
    if any(k.startswith("model.visual.") for k in state):
        return "hf"
    if any(k.startswith("visual.") for k in state):
        return "native"
    raise ConversionError(f"{source}: no `visual.*` or `model.visual.*` keys: not an Emu2 checkpoint "
                          f"(prefixes found: {sorted({k.split('.')[0] for k in state})})")


def key_maps(layout: str, state_keys: set[str] | None, rows: int, extra_rows: int) -> list[KeyMap]:
    """Released ↔ ours for one layout. `rows`: released vocabulary rows; `extra_rows`: platform tokens appended."""
    vis, lm = PREFIXES[layout]
    up, down = ("project_up.weight", "project_down.weight") if layout == "hf" else (
        "decoder.lm.project_up.weight", "decoder.lm.project_down.weight")
    if layout == "native" and state_keys is not None:  # the older names emu.py's load_state_dict renames
        up = "vl_adapter.projection.weight" if "vl_adapter.projection.weight" in state_keys else up
        down = "decoder.lm.stu_regress_head.weight" if "decoder.lm.stu_regress_head.weight" in state_keys else down

    # Append the platform's tokens: new rows = mean of the released rows (docs/design.md §2).
    def grow(t: Tensor) -> Tensor:
        return torch.cat([t, t.float().mean(0, keepdim=True).to(t.dtype).expand(extra_rows, -1)]) if extra_rows else t

    def shrink(t: Tensor) -> Tensor:
        return t[:rows]

    return [
        KeyMap(f"{lm}model.layers.{{}}.self_attn.rotary_emb.inv_freq", None,
               "LLaMA RoPE inv_freq buffers (derived; checked)"),
        KeyMap(f"{lm}model.embed_tokens.weight", "llm.model.model.embed_tokens.weight", "LLaMA embed_tokens",
               grow, shrink),
        KeyMap(f"{lm}lm_head.weight", "llm.model.lm_head.weight", "LLaMA lm_head", grow, shrink),
        KeyMap(f"{lm}model.{{}}", "llm.model.model.{}", "LLaMA decoder layers + final norm"),
        KeyMap(up, "adapter.project_up.weight", "project_up"),
        KeyMap(down, "regression_head.proj.weight", "project_down"),
        KeyMap(f"{vis}{{}}", "encoder.trunk.{}", "EVA-02-CLIP-E visual trunk"),
    ]


def components(state: dict[str, Tensor], layout: str, vocab: int, vision_heads: int, llm_heads: int,
               grid: int) -> tuple[dict[str, dict], int]:
    """Recipe form of our parts with the checkpoint's shapes, and the image size."""
    vis, lm = PREFIXES[layout]
    src = "released Emu2 checkpoint"
    require(state, [f"{vis}pos_embed", f"{vis}patch_embed.proj.weight", f"{vis}blocks.0.mlp.fc1.weight",
                    f"{lm}model.embed_tokens.weight"], src)
    width, patch = state[f"{vis}pos_embed"].shape[-1], state[f"{vis}patch_embed.proj.weight"].shape[-1]
    side = math.isqrt(state[f"{vis}pos_embed"].shape[1] - 1)          # pos_embed (1, 1 + side², D): CLS first
    hidden = state[f"{vis}blocks.0.mlp.fc1.weight"].shape[0]
    layers = count_blocks(state, f"{lm}model.layers.")
    d_llm = state[f"{lm}model.embed_tokens.weight"].shape[1]
    ffn = state[f"{lm}model.layers.0.mlp.gate_proj.weight"].shape[0]
    if side % grid:
        raise ConversionError(f"a {side}×{side} patch grid cannot be average-pooled with kernel = stride to "
                              f"{grid}×{grid} (Emu2 pools with k = s = side / grid)")
    encoder = dict(model_name="eva02_enormous_patch14_clip_224", img_size=side * patch, patch_size=patch,
                   depth=count_blocks(state, f"{vis}blocks."), embed_dim=width, num_heads=vision_heads,
                   mlp_ratio=mlp_ratio(hidden, width), layer=-1, drop_cls=True, checkpoint_path=None)
    llm = dict(hidden_size=d_llm, num_layers=layers, num_heads=llm_heads, intermediate_size=ffn, vocab_size=vocab,
               max_position_embeddings=2048, pretrained_path=None)
    return {
        "encoder": {"class_path": "components.encoders.EVAEncoder", "init_args": encoder},
        "adapter": {"class_path": "components.adapters.MeanPoolProjector",
                    "init_args": dict(in_dim=width, out_dim=d_llm, grid=grid, bias=False)},
        "llm": {"class_path": "components.llm.LlamaLM", "init_args": llm},
        "regression_head": {"class_path": "components.llm.regression_head.RegressionHead",
                            "init_args": dict(in_dim=d_llm, out_dim=width)},
    }, side * patch


def build_parts(specs: dict[str, dict]) -> dict[str, torch.nn.Module]:
    """Instantiate recipe-form parts (on whatever device is current: meta for a shape check)."""
    import importlib

    parts = {}
    for name, spec in specs.items():
        module, _, cls = spec["class_path"].rpartition(".")
        parts[name] = getattr(importlib.import_module(module), cls)(**spec["init_args"])
    return parts


def convert_emu2(src: str, dst: str, tokenizer: str, vision_heads: int = 16, llm_heads: int = 52,
                 grid: int | None = None) -> Path:
    """Convert a released Emu2 / Emu2-Chat / Emu2-Gen checkpoint into a folder our recipes load (see `folder.py`).

    Args:
        src: released weights (file or folder of shards), native or Hugging Face layout.
        dst: output folder.
        tokenizer: the LLaMA tokenizer (folder or tokenizer.json; e.g. `Emu2/emu/conf/llama_config`).
        vision_heads: EVA attention heads (not recoverable from weights; EVA-02-CLIP-E: 1792 / 112 = 16).
        llm_heads: LLaMA attention heads (LLaMA-33B: 52).
        grid: pooled tokens per side; None = 8 (n_query 64), or 16 (256) when the checkpoint is Chat.
    """
    state = read_released(src)
    layout = detect_layout(state, src)
    _, lm = PREFIXES[layout]
    rows = state[f"{lm}model.embed_tokens.weight"].shape[0]
    tok, instruct, extra = released_tokenizer(tokenizer, EMU2_SPECIALS, rows)
    d_llm = state[f"{lm}model.embed_tokens.weight"].shape[1]
    check_rope(state, d_llm // llm_heads, src)
    grid = grid or (16 if instruct else 8)
    specs, image_size = components(state, layout, rows + extra, vision_heads, llm_heads, grid)
    conversion = to_ours(state, key_maps(layout, set(state), rows, extra), src)
    with torch.device("meta"):
        check_against(conversion.ours, build_parts(specs), src)
    meta = {"release": "emu2", "variant": "chat" if instruct else "base", "layout": layout, "source": str(src),
            "rows": rows, "extra_rows": extra, "legacy_names": [k for k in ("vl_adapter.projection.weight",
                                                                            "decoder.lm.stu_regress_head.weight")
                                                                  if k in state]}
    note = (f"Converted from {src} (Emu2 {meta['variant']}, {layout} layout) by python -m emu_lightning.checkpoints.convert emu2; "
            f"{extra} platform tokens appended after the released {rows}.")
    return write_folder(dst, conversion, tok, specs, meta, image_size, note)


def export_emu2(folder: str, weights: str | None = None) -> dict[str, Tensor]:
    """The released-layout state dict of a converted folder (or of `weights`, a checkpoint fine-tuned from it)."""
    ours, aside, meta = read_folder(folder, weights)
    if meta.get("release") != "emu2":
        raise ConversionError(f"{folder} holds a {meta.get('release')!r} conversion, not emu2")
    keys = set(meta["legacy_names"])
    return to_released(ours, aside, key_maps(meta["layout"], keys, meta["rows"], meta["extra_rows"]), folder)
