"""Emu2 (base / Chat / Gen) release → our Stage-2 parts, and back (docs/converting.md lists every released layout).

Released layouts (read from `baaivision/Emu` at 13c395e, `Emu2/emu/{emu.py, lm.py, chat.py, diffusion.py}`, and
the Hugging Face `EmuForCausalLM` module names in `Emu2/demo/backend/hf_model/emu/chat.py`):
- `native` (the PyTorch release, `*_pytorch_model.bf16.*`, loaded strictly by `chat.py` / `diffusion.py`
  `from_pretrained` after `.to(bfloat16)`): `visual.*` (EVA-02-CLIP-E-plus, post-norm, no final norm, no head),
  `decoder.lm.model.*` + `decoder.lm.lm_head` (transformers LLaMA), and the projections under one of three names
  (`PROJECTIONS`): top-level `project_up` / `project_down` (emu.py since db5d37e, 2023-12-26: the released files),
  `decoder.lm.project_up` / `decoder.lm.project_down` (lm.py at a8bd539), or `vl_adapter.projection` /
  `decoder.lm.stu_regress_head` (the names a8bd539's emu.py `load_state_dict` renamed).
- `hf`: `model.visual.*`, `model.decoder.lm.*`, `project_up`, `project_down`.
- Emu2-Gen's native file is the whole `EmuVisualGeneration` (diffusion.py): the model above under
  `multimodal_encoder.`, beside `unet.*`, `vae.*`, `safety_checker.*` (kept aside here; not Stage-2 parts).
Emu2-Chat is the native or hf layout with 2 more vocabulary rows (`[USER]`, `[ASSISTANT]`) and n_query 256.

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
    ConversionError, KeyMap, check_against, check_rope, count_blocks, llama_maps, mlp_ratio, read_released, require,
    to_ours, to_released)
from emu_lightning.checkpoints.convert.config import Stated, agree, choose, read_configs
from emu_lightning.checkpoints.convert.folder import read_folder, write_folder
from emu_lightning.checkpoints.convert.tokenizer import EMU2_SPECIALS, released_tokenizer

PREFIXES = {"native": ("visual.", "decoder.lm."), "hf": ("model.visual.", "model.decoder.lm.")}
# (project_up, project_down) under each name generation the released code used, newest first.
PROJECTIONS = [("project_up.weight", "project_down.weight"),                      # emu.py L53-55 since db5d37e; HF
               ("decoder.lm.project_up.weight", "decoder.lm.project_down.weight"),  # lm.py at a8bd539
               ("vl_adapter.projection.weight", "decoder.lm.stu_regress_head.weight")]  # a8bd539 emu.py L242-245
GEN = "multimodal_encoder."   # diffusion.py EmuVisualGeneration: the Emu2 model's attribute name in the Gen pipeline
GEN_PIPELINE = {"unet.": "Emu2-Gen UNet", "vae.": "Emu2-Gen VAE", "safety_checker.": "Emu2-Gen safety checker"}


def detect_layout(state: dict[str, Tensor], source: str) -> tuple[str, str, tuple[str, str]]:
    """(layout, prefix, (project_up name, project_down name)) of a released Emu2 state dict; prefix is `GEN` for
    Emu2-Gen's native file, else empty. Names are without the prefix."""
    prefix = GEN if any(k.startswith(GEN) for k in state) else ""
    if any(k.startswith(prefix + "model.visual.") for k in state):
        layout = "hf"
    elif any(k.startswith(prefix + "visual.") for k in state):
        layout = "native"
    else:
        raise ConversionError(f"{source}: no `visual.*`, `model.visual.*` or `{GEN}visual.*` keys: not an Emu2 "
                              f"checkpoint (prefixes found: {sorted({k.split('.')[0] for k in state})})")
    candidates = PROJECTIONS[:1] if layout == "hf" else PROJECTIONS
    names = []
    for i, what in enumerate(("project_up", "project_down")):
        found = [c[i] for c in candidates if prefix + c[i] in state]
        if len(found) != 1:
            raise ConversionError(f"{source}: {what} is {'under ' + str(found) if found else 'missing'}; an Emu2 "
                                  f"checkpoint has exactly one of {[prefix + c[i] for c in candidates]}")
        names.append(found[0])
    return layout, prefix, (names[0], names[1])


def key_maps(layout: str, prefix: str, projections: tuple[str, str] | list[str], rows: int,
             extra_rows: int) -> list[KeyMap]:
    """Released ↔ ours for one layout. `rows`: released vocabulary rows; `extra_rows`: platform tokens appended."""
    vis, lm = (prefix + p for p in PREFIXES[layout])
    up, down = (prefix + p for p in projections)

    # Append the platform's tokens: new rows = mean of the released rows (docs/design.md §2, docs/converting.md).
    def grow(t: Tensor) -> Tensor:
        return torch.cat([t, t.float().mean(0, keepdim=True).to(t.dtype).expand(extra_rows, -1)]) if extra_rows else t

    def shrink(t: Tensor) -> Tensor:
        return t[:rows].clone()   # not a view: saving a view would write the appended rows too

    pipeline = [KeyMap(f"{p}{{}}", None, f"{name} (kept for export; not a Stage-2 part)")
                for p, name in GEN_PIPELINE.items()] if prefix == GEN else []
    return [
        *llama_maps(lm, grow, shrink),
        KeyMap(up, "adapter.project_up.weight", "project_up"),
        KeyMap(down, "regression_head.proj.weight", "project_down"),
        KeyMap(f"{vis}{{}}", "encoder.trunk.{}", "EVA-02-CLIP-E visual trunk"),
        *pipeline,
    ]


def measure(state: dict[str, Tensor], vis: str, lm: str, source: str) -> dict[str, tuple[int, str]]:
    """The sizes the weights show, by the names `--config` states them under, with the key that shows each."""
    require(state, [f"{vis}pos_embed", f"{vis}patch_embed.proj.weight", f"{vis}blocks.0.mlp.fc1.weight",
                    f"{lm}model.embed_tokens.weight", f"{lm}model.layers.0.mlp.gate_proj.weight"], source)
    pos, patch = state[f"{vis}pos_embed"], state[f"{vis}patch_embed.proj.weight"]
    side = math.isqrt(pos.shape[1] - 1)                                  # pos_embed (1, 1 + side², D): CLS first
    return {"vision_width": (pos.shape[-1], f"the width of {vis}pos_embed"),
            "vision_layers": (count_blocks(state, f"{vis}blocks."), f"the number of {vis}blocks.<i>"),
            "patch_size": (patch.shape[-1], f"the kernel of {vis}patch_embed.proj.weight"),
            "image_size": (side * patch.shape[-1], f"the image size of {vis}pos_embed ({side}² positions × patch)"),
            "vision_hidden": (state[f"{vis}blocks.0.mlp.fc1.weight"].shape[0],
                              f"the rows of {vis}blocks.0.mlp.fc1.weight"),
            "llm_hidden": (state[f"{lm}model.embed_tokens.weight"].shape[1],
                           f"the width of {lm}model.embed_tokens.weight"),
            "llm_layers": (count_blocks(state, f"{lm}model.layers."), f"the number of {lm}model.layers.<i>"),
            "llm_ffn": (state[f"{lm}model.layers.0.mlp.gate_proj.weight"].shape[0],
                        f"the rows of {lm}model.layers.0.mlp.gate_proj.weight"),
            "llm_norm_eps": (1e-6, "our LlamaLM's rms_norm_eps"), "rope_theta": (10000.0, "our LlamaLM's RoPE base")}


def components(sizes: dict[str, tuple[int, str]], vocab: int, vision_heads: int, llm_heads: int, grid: int,
               positions: int) -> tuple[dict[str, dict], int]:
    """Recipe form of our parts with the checkpoint's shapes, and the image size."""
    v = {k: val for k, (val, _) in sizes.items()}
    side = v["image_size"] // v["patch_size"]
    if side % grid:
        raise ConversionError(f"a {side}×{side} patch grid cannot be average-pooled with kernel = stride to "
                              f"{grid}×{grid} (Emu2 pools with k = s = side / grid)")
    encoder = dict(model_name="eva02_enormous_patch14_clip_224", img_size=v["image_size"], patch_size=v["patch_size"],
                   depth=v["vision_layers"], embed_dim=v["vision_width"], num_heads=vision_heads,
                   mlp_ratio=mlp_ratio(v["vision_hidden"], v["vision_width"]), layer=-1, drop_cls=True,
                   checkpoint_path=None)
    llm = dict(hidden_size=v["llm_hidden"], num_layers=v["llm_layers"], num_heads=llm_heads,
               intermediate_size=v["llm_ffn"], vocab_size=vocab, max_position_embeddings=positions,
               pretrained_path=None)
    return {
        "encoder": {"class_path": "components.encoders.EVAEncoder", "init_args": encoder},
        "adapter": {"class_path": "components.adapters.MeanPoolProjector",
                    "init_args": dict(in_dim=v["vision_width"], out_dim=v["llm_hidden"], grid=grid, bias=False)},
        "llm": {"class_path": "components.llm.LlamaLM", "init_args": llm},
        "regression_head": {"class_path": "components.llm.regression_head.RegressionHead",
                            "init_args": dict(in_dim=v["llm_hidden"], out_dim=v["vision_width"])},
    }, v["image_size"]


def build_parts(specs: dict[str, dict]) -> dict[str, torch.nn.Module]:
    """Instantiate recipe-form parts (on whatever device is current: meta for a shape check)."""
    import importlib

    parts = {}
    for name, spec in specs.items():
        module, _, cls = spec["class_path"].rpartition(".")
        parts[name] = getattr(importlib.import_module(module), cls)(**spec["init_args"])
    return parts


def convert_emu2(src: str, dst: str, tokenizer: str, vision_heads: int | None = None, llm_heads: int | None = None,
                 grid: int | None = None, configs: list[str] | tuple[str, ...] = (),
                 shard_size: int | str | None = None) -> Path:
    """Convert a released Emu2 / Emu2-Chat / Emu2-Gen checkpoint into a folder our recipes load (see `folder.py`).

    Args:
        src: released weights (file, shard index, or folder of shards), any layout in the module docstring.
        dst: output folder.
        tokenizer: the LLaMA tokenizer (folder or tokenizer.json; e.g. `Emu2/emu/conf/llama_config`).
        vision_heads: EVA attention heads (not recoverable from weights); None = from `configs`, else 16
            (EVA-02-CLIP-E: width 1792 / head_width 112, `Emu2/emu/conf/emu_conf.py`).
        llm_heads: LLaMA attention heads; None = from `configs`, else 52 (`Emu2/emu/conf/llama_config/config.json`).
        grid: pooled tokens per side; None = √n_query from `configs`, else 8 (n_query 64), or 16 (256) for Chat.
        configs: release config JSON files (see `config.py`) stating heads and sizes; each is checked.
        shard_size: write our weights as safetensors shards of at most this size (e.g. "5GB"; `folder.py`)
            instead of one `weights.pt`: the hand-off then memory-maps them (`checkpoints/shards.py`).
    """
    state = read_released(src)
    layout, prefix, projections = detect_layout(state, src)
    vis, lm = (prefix + p for p in PREFIXES[layout])
    stated = read_configs(configs)
    sizes = measure(state, vis, lm, src)
    agree(stated, sizes, src)
    rows = state[f"{lm}model.embed_tokens.weight"].shape[0]
    tok, instruct, extra = released_tokenizer(tokenizer, EMU2_SPECIALS, rows)
    llm_heads, llm_from = choose("--llm-heads", llm_heads, stated, "llm_heads", 52, "LLaMA-33B")
    vision_heads, vision_from = choose("--vision-heads", vision_heads, stated, "vision_heads", 16, "EVA-02-CLIP-E")
    if vision_heads <= 0 or sizes["vision_width"][0] % vision_heads:
        raise ConversionError(f"{src}: {vision_from} does not divide the EVA width {sizes['vision_width'][0]} "
                              f"into heads")
    check_rope(state, sizes["llm_hidden"][0], llm_heads, src, llm_from)
    if "n_query" in stated:
        n = int(stated["n_query"].value)
        if math.isqrt(n) ** 2 != n:
            raise ConversionError(f"--config {stated['n_query'].origin} = {n} is not a square grid of pooled tokens")
        stated["grid"] = Stated(math.isqrt(n), f"{stated['n_query'].origin} = {n} (√ = grid)")
    grid, _ = choose("--grid", grid, stated, "grid", 16 if instruct else 8, "n_query 256 for Chat, else 64")
    positions = int(stated["llm_positions"].value) if "llm_positions" in stated else 2048
    specs, image_size = components(sizes, rows + extra, vision_heads, llm_heads, grid, positions)
    conversion = to_ours(state, key_maps(layout, prefix, projections, rows, extra), src)
    with torch.device("meta"):
        check_against(conversion.ours, build_parts(specs), src)
    variant = "gen" if prefix == GEN else "chat" if instruct else "base"
    meta = {"release": "emu2", "variant": variant, "layout": layout, "prefix": prefix, "projections": projections,
            "source": str(src), "rows": rows, "extra_rows": extra}
    note = (f"Converted from {src} (Emu2 {variant}, {layout} layout{', prefix ' + prefix if prefix else ''}) by "
            f"python -m emu_lightning.checkpoints.convert emu2; {extra} platform tokens appended after the released "
            f"{rows} (docs/converting.md).")
    return write_folder(dst, conversion, tok, specs, meta, image_size, note, shard_size)


def export_emu2(folder: str, weights: str | None = None) -> dict[str, Tensor]:
    """The released-layout state dict of a converted folder (or of `weights`, a checkpoint fine-tuned from it):
    the names, prefix, projection generation and per-tensor dtypes the conversion read."""
    ours, aside, meta = read_folder(folder, weights)
    if meta.get("release") != "emu2":
        raise ConversionError(f"{folder} holds a {meta.get('release')!r} conversion, not emu2")
    if "projections" not in meta:
        raise ConversionError(f"{folder}: converted by an older converter (no `projections` in conversion.json): "
                              f"convert the release again")
    maps = key_maps(meta["layout"], meta["prefix"], meta["projections"], meta["rows"], meta["extra_rows"])
    return to_released(ours, aside, maps, folder, meta.get("dtypes"))
