"""Emu (v1) release → our Stage-2 parts, and back.

Released layout (read from `baaivision/Emu` `Emu1/models/{modeling_emu.py, eva_vit_model.py, modeling_t5.py, model.py}`,
and `causal_former.py` / `modeling_llama.py` found by content search):
- `visual.*`: EVA-01-CLIP-g (pre-norm); its `norm` and CLIP `head` exist but Emu reads `forward_features` (raw
  last-block tokens, CLS kept), so they are unused (kept aside for an exact export);
- `ln_visual`: LayerNorm(eps 1e-6) on all 257 tokens;
- `cformer.causal_tokens` (1, 32, 768), `cformer.cformer.*` (t5-base decoder stack; its `embed_tokens` is unused:
  the queries are its `inputs_embeds`), `cformer.projection` (Linear with bias);
- `decoder.lm.model.*`, `decoder.lm.lm_head` (transformers LLaMA-13B), `decoder.lm.stu_regress_head` (no bias).

Ours: `EVAEncoder(eva_giant…, layer=-1, drop_cls=False)`, `CFormer(ln_eps=1e-6)`, `LlamaLM`, `RegressionHead`,
`Stage2System(target_space="adapter")`. The Emu-I LoRA layout is refused (merge the adapters first).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from emu_lightning.checkpoints.convert.common import (
    ConversionError, KeyMap, check_against, check_rope, count_blocks, mlp_ratio, read_released, require, to_ours,
    to_released)
from emu_lightning.checkpoints.convert.emu2 import build_parts
from emu_lightning.checkpoints.convert.folder import read_folder, write_folder
from emu_lightning.checkpoints.convert.tokenizer import EMU1_SPECIALS, released_tokenizer


def key_maps(rows: int, extra_rows: int) -> list[KeyMap]:
    """Released ↔ ours. `rows`: released vocabulary rows; `extra_rows`: platform tokens appended."""
    # Append the platform's tokens: new rows = mean of the released rows (docs/design.md §2).
    def grow(t: Tensor) -> Tensor:
        return torch.cat([t, t.float().mean(0, keepdim=True).to(t.dtype).expand(extra_rows, -1)]) if extra_rows else t

    def shrink(t: Tensor) -> Tensor:
        return t[:rows]

    lm = "decoder.lm."
    return [
        KeyMap(f"{lm}model.layers.{{}}.self_attn.rotary_emb.inv_freq", None,
               "LLaMA RoPE inv_freq buffers (derived; checked)"),
        KeyMap(f"{lm}model.embed_tokens.weight", "llm.model.model.embed_tokens.weight", "LLaMA embed_tokens",
               grow, shrink),
        KeyMap(f"{lm}lm_head.weight", "llm.model.lm_head.weight", "LLaMA lm_head", grow, shrink),
        KeyMap(f"{lm}model.{{}}", "llm.model.model.{}", "LLaMA decoder layers + final norm"),
        KeyMap(f"{lm}stu_regress_head.weight", "regression_head.proj.weight", "stu_regress_head"),
        KeyMap("visual.norm.{}", None, "EVA-CLIP final norm (unused: Emu reads forward_features)"),
        KeyMap("visual.head.{}", None, "EVA-CLIP projection head (unused)"),
        KeyMap("visual.{}", "encoder.trunk.{}", "EVA-01-CLIP-g visual trunk"),
        KeyMap("ln_visual.{}", "adapter.ln_visual.{}", "ln_visual"),
        KeyMap("cformer.causal_tokens", "adapter.causal_tokens", "C-Former causal queries",
               lambda t: t.reshape(t.shape[-2], t.shape[-1]), lambda t: t.unsqueeze(0)),
        KeyMap("cformer.cformer.embed_tokens.weight", None, "C-Former T5 word embedding (unused: queries are inputs)"),
        KeyMap("cformer.cformer.{}", "adapter.cformer.{}", "C-Former T5 decoder blocks + final_layer_norm"),
        KeyMap("cformer.projection.{}", "adapter.projection.{}", "C-Former projection (with bias)"),
    ]


def components(state: dict[str, Tensor], vocab: int, vision_heads: int, llm_heads: int,
               t5_heads: int) -> tuple[dict[str, dict], int]:
    """Recipe form of our parts with the checkpoint's shapes, and the image size."""
    src = "released Emu1 checkpoint"
    require(state, ["visual.pos_embed", "visual.patch_embed.proj.weight", "visual.blocks.0.mlp.fc1.weight",
                    "ln_visual.weight", "cformer.causal_tokens", "cformer.projection.weight",
                    "cformer.cformer.block.0.layer.2.DenseReluDense.wi.weight", "decoder.lm.model.embed_tokens.weight",
                    "decoder.lm.stu_regress_head.weight"], src)
    width, patch = state["visual.pos_embed"].shape[-1], state["visual.patch_embed.proj.weight"].shape[-1]
    side = math.isqrt(state["visual.pos_embed"].shape[1] - 1)          # pos_embed (1, 1 + side², D): CLS first
    hidden = state["visual.blocks.0.mlp.fc1.weight"].shape[0]
    n_queries, d_model = state["cformer.causal_tokens"].shape[-2:]
    d_llm = state["decoder.lm.model.embed_tokens.weight"].shape[1]
    encoder = dict(model_name="eva_giant_patch14_clip_224", img_size=side * patch, patch_size=patch,
                   depth=count_blocks(state, "visual.blocks."), embed_dim=width, num_heads=vision_heads,
                   mlp_ratio=mlp_ratio(hidden, width), layer=-1, drop_cls=False, checkpoint_path=None)
    adapter = dict(in_dim=width, out_dim=state["cformer.projection.weight"].shape[0], num_queries=n_queries,
                   d_model=d_model, num_layers=count_blocks(state, "cformer.cformer.block."), num_heads=t5_heads,
                   d_ff=state["cformer.cformer.block.0.layer.2.DenseReluDense.wi.weight"].shape[0], dropout=0.1,
                   ln_eps=1e-6)
    llm = dict(hidden_size=d_llm, num_layers=count_blocks(state, "decoder.lm.model.layers."), num_heads=llm_heads,
               intermediate_size=state["decoder.lm.model.layers.0.mlp.gate_proj.weight"].shape[0], vocab_size=vocab,
               max_position_embeddings=2048, pretrained_path=None)
    return {
        "encoder": {"class_path": "components.encoders.EVAEncoder", "init_args": encoder},
        "adapter": {"class_path": "components.adapters.CFormer", "init_args": adapter},
        "llm": {"class_path": "components.llm.LlamaLM", "init_args": llm},
        "regression_head": {"class_path": "components.llm.regression_head.RegressionHead", "init_args": dict(
            in_dim=d_llm, out_dim=state["decoder.lm.stu_regress_head.weight"].shape[0])},
    }, side * patch


def convert_emu1(src: str, dst: str, tokenizer: str, vision_heads: int = 16, llm_heads: int = 40,
                 t5_heads: int = 12) -> Path:
    """Convert a released Emu (v1) checkpoint into a folder our recipes load (see `folder.py`).

    Args:
        src: released weights (file or folder of shards).
        dst: output folder.
        tokenizer: the LLaMA tokenizer (folder or tokenizer.json) the release added its specials to.
        vision_heads: EVA attention heads (not recoverable from weights; EVA-01-CLIP-g: 1408 / 88 = 16).
        llm_heads: LLaMA attention heads (LLaMA-13B: 40).
        t5_heads: C-Former heads (t5-base: 12).
    """
    state = read_released(src)
    lora = [k for k in state if "lora_" in k or ".base_model." in k]
    if lora:
        raise ConversionError(f"{src}: {len(lora)} LoRA / peft keys ({lora[:3]}): the Emu-I LoRA layout is not "
                              f"converted; merge the adapters into the LLaMA weights first")
    if not any(k.startswith("cformer.") for k in state):
        raise ConversionError(f"{src}: no `cformer.*` keys: not an Emu (v1) checkpoint "
                              f"(prefixes found: {sorted({k.split('.')[0] for k in state})})")
    rows = state["decoder.lm.model.embed_tokens.weight"].shape[0]
    tok, instruct, extra = released_tokenizer(tokenizer, EMU1_SPECIALS, rows)
    check_rope(state, state["decoder.lm.model.embed_tokens.weight"].shape[1] // llm_heads, src)
    specs, image_size = components(state, rows + extra, vision_heads, llm_heads, t5_heads)
    conversion = to_ours(state, key_maps(rows, extra), src)
    with torch.device("meta"):
        check_against(conversion.ours, build_parts(specs), src)
    meta = {"release": "emu1", "variant": "instruct" if instruct else "base", "layout": "native",
            "source": str(src), "rows": rows, "extra_rows": extra}
    note = (f"Converted from {src} (Emu1 {meta['variant']}) by python -m emu_lightning.checkpoints.convert emu1; "
            f"{extra} platform tokens appended after the released {rows}.")
    return write_folder(dst, conversion, tok, specs, meta, image_size, note)


def export_emu1(folder: str, weights: str | None = None) -> dict[str, Tensor]:
    """The released-layout state dict of a converted folder (or of `weights`, a checkpoint fine-tuned from it)."""
    ours, aside, meta = read_folder(folder, weights)
    if meta.get("release") != "emu1":
        raise ConversionError(f"{folder} holds a {meta.get('release')!r} conversion, not emu1")
    return to_released(ours, aside, key_maps(meta["rows"], meta["extra_rows"]), folder)
