"""Emu (v1) release → our Stage-2 parts, and back.

Released layout (read from `baaivision/Emu` at 13c395e, `Emu1/models/{modeling_emu.py, eva_vit_model.py, modeling_t5.py,
model.py, causal_former.py, modeling_llama.py, pipeline.py}` and `Emu1/inference.py`; docs/converting.md):
- `visual.*`: EVA-01-CLIP-g (pre-norm); its `norm` and CLIP `head` exist but Emu reads `forward_features` (raw
  last-block tokens, CLS kept), so they are unused (kept aside for an exact export);
- `ln_visual`: LayerNorm(eps 1e-6) on all 257 tokens;
- `cformer.causal_tokens` (1, 32, 768), `cformer.cformer.*` (t5-base decoder stack; its `embed_tokens` is unused:
  the queries are its `inputs_embeds`), `cformer.projection` (Linear with bias);
- `decoder.lm.model.*`, `decoder.lm.lm_head` (transformers LLaMA-13B), `decoder.lm.stu_regress_head` (no bias).

Ours: `EVAEncoder(eva_giant…, layer=-1, drop_cls=False)`, `CFormer(ln_eps=1e-6)`, `LlamaLM`, `RegressionHead`,
`Stage2System(target_space="adapter")`. Emu-I's peft LoRA layout (`decoder.lm.base_model.model.*` + factors) is
converted by merging the factors into the LLaMA and exported back in that layout (`lora.py`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from emu_lightning.checkpoints.convert.common import (
    ConversionError, KeyMap, check_against, check_rope, count_blocks, llama_maps, mlp_ratio, read_released, require,
    to_ours, to_released)
from emu_lightning.checkpoints.convert.config import agree, choose, read_configs
from emu_lightning.checkpoints.convert.emu2 import build_parts
from emu_lightning.checkpoints.convert.folder import read_folder, write_folder
from emu_lightning.checkpoints.convert.lora import PEFT, merge_lora, zero_lora_b
from emu_lightning.checkpoints.convert.tokenizer import EMU1_SPECIALS, released_tokenizer


def key_maps(rows: int, extra_rows: int, lora: dict | None = None) -> list[KeyMap]:
    """Released ↔ ours. `rows`: released vocabulary rows; `extra_rows`: platform tokens appended; `lora`: Emu-I's
    peft layout (`merge_lora`'s record), whose LLaMA keys sit under `PEFT` and whose factors are kept aside."""
    # Append the platform's tokens: new rows = mean of the released rows (docs/design.md §2).
    def grow(t: Tensor) -> Tensor:
        return torch.cat([t, t.float().mean(0, keepdim=True).to(t.dtype).expand(extra_rows, -1)]) if extra_rows else t

    def shrink(t: Tensor) -> Tensor:
        return t[:rows].clone()   # not a view: saving a view would write the appended rows too

    lm = PEFT if lora else "decoder.lm."
    peft = [KeyMap(f"{lm}{{}}.lora_A.{{}}", None, "LoRA A factors (merged into the LLaMA; exported as released)"),
            KeyMap(f"{lm}{{}}.lora_B.{{}}", None, "LoRA B factors (merged into the LLaMA; exported as zeros)"),
            *[KeyMap(f"{t}.base_layer.weight", f"llm.model.{t[len(PEFT):]}.weight", "LoRA target (merged)")
              for t in lora["targets"] if lora["base_layer"]]] if lora else []
    return [
        *peft,
        *llama_maps(lm, grow, shrink),
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


def measure(state: dict[str, Tensor], source: str, lm: str) -> dict[str, tuple[int, str]]:
    """The sizes the weights show, by the names `--config` states them under, with the key that shows each."""
    require(state, ["visual.pos_embed", "visual.patch_embed.proj.weight", "visual.blocks.0.mlp.fc1.weight",
                    "ln_visual.weight", "cformer.causal_tokens", "cformer.projection.weight",
                    "cformer.cformer.block.0.layer.2.DenseReluDense.wi.weight", f"{lm}model.embed_tokens.weight",
                    f"{lm}model.layers.0.mlp.gate_proj.weight", f"{lm}stu_regress_head.weight"], source)
    pos, patch = state["visual.pos_embed"], state["visual.patch_embed.proj.weight"]
    side = math.isqrt(pos.shape[1] - 1)                                  # pos_embed (1, 1 + side², D): CLS first
    queries = state["cformer.causal_tokens"]                             # (1, n_causal, d_model)
    wi = "cformer.cformer.block.0.layer.2.DenseReluDense.wi.weight"
    return {"vision_width": (pos.shape[-1], "the width of visual.pos_embed"),
            "vision_layers": (count_blocks(state, "visual.blocks."), "the number of visual.blocks.<i>"),
            "patch_size": (patch.shape[-1], "the kernel of visual.patch_embed.proj.weight"),
            "image_size": (side * patch.shape[-1], f"the image size of visual.pos_embed ({side}² positions × patch)"),
            "vision_hidden": (state["visual.blocks.0.mlp.fc1.weight"].shape[0],
                              "the rows of visual.blocks.0.mlp.fc1.weight"),
            "n_causal": (queries.shape[-2], "the queries of cformer.causal_tokens"),
            "t5_width": (queries.shape[-1], "the width of cformer.causal_tokens"),
            "t5_layers": (count_blocks(state, "cformer.cformer.block."), "the number of cformer.cformer.block.<i>"),
            "t5_ffn": (state[wi].shape[0], f"the rows of {wi}"),
            "llm_hidden": (state[f"{lm}model.embed_tokens.weight"].shape[1],
                           f"the width of {lm}model.embed_tokens.weight"),
            "llm_layers": (count_blocks(state, f"{lm}model.layers."), f"the number of {lm}model.layers.<i>"),
            "llm_ffn": (state[f"{lm}model.layers.0.mlp.gate_proj.weight"].shape[0],
                        f"the rows of {lm}model.layers.0.mlp.gate_proj.weight"),
            "head_out": (state[f"{lm}stu_regress_head.weight"].shape[0], f"the rows of {lm}stu_regress_head.weight"),
            "projection_out": (state["cformer.projection.weight"].shape[0], "the rows of cformer.projection.weight"),
            "llm_norm_eps": (1e-6, "our LlamaLM's rms_norm_eps"), "rope_theta": (10000.0, "our LlamaLM's RoPE base")}


def components(sizes: dict[str, tuple[int, str]], vocab: int, vision_heads: int, llm_heads: int, t5_heads: int,
               positions: int) -> tuple[dict[str, dict], int]:
    """Recipe form of our parts with the checkpoint's shapes, and the image size."""
    v = {k: val for k, (val, _) in sizes.items()}
    encoder = dict(model_name="eva_giant_patch14_clip_224", img_size=v["image_size"], patch_size=v["patch_size"],
                   depth=v["vision_layers"], embed_dim=v["vision_width"], num_heads=vision_heads,
                   mlp_ratio=mlp_ratio(v["vision_hidden"], v["vision_width"]), layer=-1, drop_cls=False,
                   checkpoint_path=None)
    adapter = dict(in_dim=v["vision_width"], out_dim=v["projection_out"],
                   num_queries=v["n_causal"], d_model=v["t5_width"], num_layers=v["t5_layers"], num_heads=t5_heads,
                   d_ff=v["t5_ffn"], dropout=0.1, ln_eps=1e-6)
    llm = dict(hidden_size=v["llm_hidden"], num_layers=v["llm_layers"], num_heads=llm_heads,
               intermediate_size=v["llm_ffn"], vocab_size=vocab, max_position_embeddings=positions,
               pretrained_path=None)
    return {
        "encoder": {"class_path": "components.encoders.EVAEncoder", "init_args": encoder},
        "adapter": {"class_path": "components.adapters.CFormer", "init_args": adapter},
        "llm": {"class_path": "components.llm.LlamaLM", "init_args": llm},
        "regression_head": {"class_path": "components.llm.regression_head.RegressionHead", "init_args": dict(
            in_dim=v["llm_hidden"], out_dim=v["head_out"])},
    }, v["image_size"]


def convert_emu1(src: str, dst: str, tokenizer: str, vision_heads: int | None = None, llm_heads: int | None = None,
                 t5_heads: int | None = None, configs: list[str] | tuple[str, ...] = (),
                 lora_alpha: float = 16.0, shard_size: int | str | None = None) -> Path:
    """Convert a released Emu (v1) checkpoint into a folder our recipes load (see `folder.py`).

    Args:
        src: released weights (file, shard index or folder of shards).
        dst: output folder.
        tokenizer: the LLaMA tokenizer (folder or tokenizer.json) the release added its specials to.
        vision_heads: EVA attention heads (not recoverable from weights); None = from `configs`, else 16
            (EVA-01-CLIP-g: width 1408 / head_width 88, `Emu1/models/Emu-14B.json`).
        llm_heads: LLaMA attention heads; None = from `configs`, else 40 (`Emu1/models/llama_config/config.json`).
        t5_heads: C-Former heads; None = from a T5 config in `configs`, else 12 (t5-base).
        configs: release config JSON files (see `config.py`) stating heads and sizes; each is checked.
        shard_size: write our weights as safetensors shards of at most this size (e.g. "5GB"; `folder.py`)
            instead of one `weights.pt`: the hand-off then memory-maps them (`checkpoints/shards.py`).
        lora_alpha: Emu-I's LoRA alpha (not in the weights; `Emu1/inference.py` L45: 16); the rank r is read from
            the factors, and the merged update is (alpha / r) · B A (`lora.py`).
    """
    state = read_released(src)
    lora = None
    if any(k.startswith(PEFT) for k in state):
        state, lora = merge_lora(state, lora_alpha, src)
    stray = [k for k in state if ("lora_" in k or ".base_model." in k) and not k.startswith(PEFT)]
    if stray:
        raise ConversionError(f"{src}: {len(stray)} LoRA / peft keys outside Emu-I's {PEFT}* layout ({stray[:3]})")
    lm = PEFT if lora else "decoder.lm."
    if not any(k.startswith("cformer.") for k in state):
        raise ConversionError(f"{src}: no `cformer.*` keys: not an Emu (v1) checkpoint "
                              f"(prefixes found: {sorted({k.split('.')[0] for k in state})})")
    stated = read_configs(configs)
    sizes = measure(state, src, lm)
    agree(stated, sizes, src)
    rows = state[f"{lm}model.embed_tokens.weight"].shape[0]
    tok, instruct, extra = released_tokenizer(tokenizer, EMU1_SPECIALS, rows)
    llm_heads, llm_from = choose("--llm-heads", llm_heads, stated, "llm_heads", 40, "LLaMA-13B")
    vision_heads, vision_from = choose("--vision-heads", vision_heads, stated, "vision_heads", 16, "EVA-01-CLIP-g")
    t5_heads, t5_from = choose("--t5-heads", t5_heads, stated, "t5_heads", 12, "t5-base")
    for heads, origin, width in ((vision_heads, vision_from, sizes["vision_width"]),
                                 (t5_heads, t5_from, sizes["t5_width"])):
        if heads <= 0 or width[0] % heads:
            raise ConversionError(f"{src}: {origin} does not divide the width {width[0]} ({width[1]}) into heads")
    check_rope(state, sizes["llm_hidden"][0], llm_heads, src, llm_from)
    positions = int(stated["llm_positions"].value) if "llm_positions" in stated else 2048
    specs, image_size = components(sizes, rows + extra, vision_heads, llm_heads, t5_heads, positions)
    conversion = to_ours(state, key_maps(rows, extra, lora), src)
    with torch.device("meta"):
        check_against(conversion.ours, build_parts(specs), src)
    meta = {"release": "emu1", "variant": "instruct" if instruct else "base", "layout": "peft" if lora else "native",
            "source": str(src), "rows": rows, "extra_rows": extra, "lora": lora}
    note = (f"Converted from {src} (Emu1 {meta['variant']}, {meta['layout']} layout"
            f"{f', LoRA merged with alpha {lora_alpha:g}' if lora else ''}) by python -m "
            f"emu_lightning.checkpoints.convert emu1; {extra} platform tokens appended after the released {rows} "
            f"(docs/converting.md).")
    return write_folder(dst, conversion, tok, specs, meta, image_size, note, shard_size)


def export_emu1(folder: str, weights: str | None = None) -> dict[str, Tensor]:
    """The released-layout state dict of a converted folder (or of `weights`, a checkpoint fine-tuned from it),
    each tensor in the dtype the release stored it in."""
    ours, aside, meta = read_folder(folder, weights)
    if meta.get("release") != "emu1":
        raise ConversionError(f"{folder} holds a {meta.get('release')!r} conversion, not emu1")
    lora = meta.get("lora")
    out = to_released(ours, aside, key_maps(meta["rows"], meta["extra_rows"], lora), folder, meta.get("dtypes"))
    return zero_lora_b(out) if lora else out
