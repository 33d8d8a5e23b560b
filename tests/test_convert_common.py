"""Released-checkpoint conversion (docs/design.md §8): tiny checkpoints in the released key layouts, the released
computation written out from its definition, and the shared converter machinery.

Every released key name below comes from code read in `baaivision/Emu` (commit a8bd5398 unless noted):
- EVA trunk (`visual.*`): `Emu2/emu/eva_vit.py` and `Emu1/models/eva_vit_model.py` — `EVAVisionTransformer`
  (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}`; Emu1 also `norm`, `head` since it is built with
  `use_mean_pooling=False, num_classes=embed_dim`), `Block` (`norm1`, `attn`, `norm2`, `mlp`), `Attention`
  (`qkv.weight`, `q_bias`, `v_bias`, `proj`), `Mlp` (`fc1`, `fc2`).
- LLaMA (`decoder.lm.*`): `Emu2/emu/lm.py` (a transformers `LlamaForCausalLM` at `self.lm`; at a8bd539 it also
  held `project_down` and `project_up`, which `Emu2/emu/emu.py` L52-55 holds since db5d37e / 13c395e) and
  `Emu2/emu/conf/llama_config/pytorch_model.bin.index.json` (per-layer `self_attn.rotary_emb.inv_freq` buffers);
  Emu1's `LLaMAForClsAndRegression` (`Emu1/models/modeling_llama.py` L127-173: `self.lm.stu_regress_head`).
- C-Former (Emu1): `Emu1/models/causal_former.py` (L25-40 at 13c395e): `cformer`
  = `T5ForConditionalGeneration(t5-base).decoder` (so it keeps `embed_tokens`), `causal_tokens` (1, n_causal, d),
  `projection` Linear(d, out) with bias; `Emu1/models/modeling_t5.py`: cross-attention `k`/`v` take
  `config.encoder_width`; `Emu1/models/modeling_emu.py`: `ln_visual` LayerNorm(eps 1e-6), `visual`, `cformer`,
  `decoder`.
- HF layout (Emu2 `EmuForCausalLM` remote code; its module names are listed in
  `Emu2/demo/backend/hf_model/emu/chat.py` L268-282): `model.visual.*`, `model.decoder.lm.*`, `project_down`,
  `project_up`.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from emu_lightning.checkpoints.convert.common import ConversionError, KeyMap, check_rope, to_ours, to_released
from emu_lightning.checkpoints.convert.tokenizer import EMU1_SPECIALS, EMU2_SPECIALS, released_tokenizer

# Tiny shapes, same names: EVA width 64 (2 heads of 32), 2 blocks, patch 8 at 32 px (4×4 grid); LLaMA width 96.
EVA = dict(width=64, heads=2, depth=2, patch=8, image=32)
LLM = dict(hidden=96, heads=2, layers=2, ffn=160)


def base_tokenizer(folder) -> str:
    """A small BPE standing in for the LLaMA tokenizer: `<unk>` `<s>` `</s>` = 0, 1, 2, as in LLaMA."""
    from emu_lightning.data.synthetic.scenes import caption_corpus

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(caption_corpus(seed=0), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(str(folder))
    return str(folder)


def _rand(*shape, std=0.05, mean=0.0):
    return torch.randn(*shape) * std + mean


def released_eva(prefix: str, postnorm: bool, clip_head: bool) -> dict[str, torch.Tensor]:
    """`EVAVisionTransformer` state (eva_vit.py / eva_vit_model.py names), random but non-trivial values."""
    D, P, side = EVA["width"], EVA["patch"], EVA["image"] // EVA["patch"]
    hidden = int(D * (8.571428571428571 if postnorm else 4.3637))   # Emu2 conf mlp_ratio / EVA-01-g's
    s = {"cls_token": _rand(1, 1, D, std=0.5), "pos_embed": _rand(1, side * side + 1, D, std=0.5),
         "patch_embed.proj.weight": _rand(D, 3, P, P), "patch_embed.proj.bias": _rand(D)}
    for i in range(EVA["depth"]):
        b = f"blocks.{i}."
        s.update({b + "norm1.weight": _rand(D, std=0.2, mean=1.0), b + "norm1.bias": _rand(D),
                  b + "attn.qkv.weight": _rand(3 * D, D, std=0.2), b + "attn.q_bias": _rand(D, std=0.2),
                  b + "attn.v_bias": _rand(D, std=0.2), b + "attn.proj.weight": _rand(D, D, std=0.2),
                  b + "attn.proj.bias": _rand(D), b + "norm2.weight": _rand(D, std=0.2, mean=1.0),
                  b + "norm2.bias": _rand(D), b + "mlp.fc1.weight": _rand(hidden, D, std=0.2),
                  b + "mlp.fc1.bias": _rand(hidden), b + "mlp.fc2.weight": _rand(D, hidden, std=0.1),
                  b + "mlp.fc2.bias": _rand(D)})
    if clip_head:   # Emu1 builds EVA-CLIP with its final norm and CLIP projection head (unused by Emu)
        s.update({"norm.weight": _rand(D, mean=1.0), "norm.bias": _rand(D), "head.weight": _rand(32, D),
                  "head.bias": _rand(32)})
    return {prefix + k: v for k, v in s.items()}


def released_llama(prefix: str, rows: int) -> tuple[dict[str, torch.Tensor], LlamaConfig]:
    """transformers `LlamaForCausalLM` state under `prefix`, with the per-layer `rotary_emb.inv_freq` buffers the
    released (transformers 4.29) files carry."""
    config = LlamaConfig(hidden_size=LLM["hidden"], num_hidden_layers=LLM["layers"], num_attention_heads=LLM["heads"],
                         intermediate_size=LLM["ffn"], vocab_size=rows, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(_rand(*p.shape, std=0.2, mean=1.0))
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    head_dim = LLM["hidden"] // LLM["heads"]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    for i in range(LLM["layers"]):
        state[f"{prefix}model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return state, config


def assert_platform_rows_are_the_mean(state: dict, ours: dict) -> None:
    """The converted `embed_tokens` and `lm_head` keep the released rows and append the platform's specials after
    them, each appended row the mean of the released rows (docs/design.md §2)."""
    for released, mine in (("decoder.lm.model.embed_tokens.weight", "llm.model.model.embed_tokens.weight"),
                           ("decoder.lm.lm_head.weight", "llm.model.lm_head.weight")):
        rows, total = state[released].shape[0], ours[mine].shape[0]
        assert total > rows, (mine, total, rows)
        torch.testing.assert_close(ours[mine][:rows], state[released], rtol=0, atol=0)
        torch.testing.assert_close(ours[mine][rows:], state[released].mean(0).expand(total - rows, -1))


def released_forward_eva(state: dict, prefix: str, pixels: torch.Tensor, postnorm: bool) -> torch.Tensor:
    """`EVAVisionTransformer.forward_features` written out from its definition (eval, non-xattn path):
    patch conv → CLS + abs pos → per block: q/k/v with bias cat(q_bias, 0, v_bias), softmax(q·scale kᵀ) v, proj;
    pre-norm `x + f(norm(x))` or post-norm `x + norm(f(x))`; Mlp = fc2(GELU(fc1)). LayerNorm eps 1e-6."""
    w = lambda k: state[prefix + k]  # noqa: E731
    D, H = EVA["width"], EVA["heads"]
    x = F.conv2d(pixels, w("patch_embed.proj.weight"), w("patch_embed.proj.bias"), stride=EVA["patch"])
    x = x.flatten(2).transpose(1, 2)                                           # (B,L,D)
    B = x.shape[0]
    x = torch.cat([w("cls_token").expand(B, -1, -1), x], dim=1) + w("pos_embed")
    N = x.shape[1]
    for i in range(EVA["depth"]):
        b = f"blocks.{i}."
        norm = lambda h, n: F.layer_norm(h, (D,), w(b + n + ".weight"), w(b + n + ".bias"), 1e-6)  # noqa: E731, B023

        def attn(h):
            bias = torch.cat([w(b + "attn.q_bias"), torch.zeros(D), w(b + "attn.v_bias")])  # noqa: B023
            qkv = F.linear(h, w(b + "attn.qkv.weight"), bias)  # noqa: B023
            q, k, v = qkv.reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)     # 3 × (B,H,N,d)
            a = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
            o = (a @ v).transpose(1, 2).reshape(B, N, -1)
            return F.linear(o, w(b + "attn.proj.weight"), w(b + "attn.proj.bias"))  # noqa: B023

        def mlp(h):
            return F.linear(F.gelu(F.linear(h, w(b + "mlp.fc1.weight"), w(b + "mlp.fc1.bias"))),  # noqa: B023
                            w(b + "mlp.fc2.weight"), w(b + "mlp.fc2.bias"))  # noqa: B023

        if postnorm:
            x = x + norm(attn(x), "norm1")
            x = x + norm(mlp(x), "norm2")
        else:
            x = x + attn(norm(x, "norm1"))
            x = x + mlp(norm(x, "norm2"))
    return x


def released_llama_model(state: dict, prefix: str, config: LlamaConfig) -> LlamaForCausalLM:
    """The transformers Llama the release itself builds, with the released weights (eager attention, fp32)."""
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "rotary_emb.inv_freq" not in k}
    sub = {k: v for k, v in sub.items() if not k.startswith(("project_", "stu_regress_head"))}  # heads beside the LM
    model.load_state_dict(sub, strict=True)
    return model


# ---------------------------------------------------------------- the shared machinery

def test_key_maps_round_trip_and_unknown_keys_are_listed():
    maps = [KeyMap("a.unused.{}", None, "unused"), KeyMap("a.{}", "x.{}", "trunk"),
            KeyMap("p.weight", "y.w", "head", lambda t: t.T, lambda t: t.T)]
    state = {"a.unused.w": torch.ones(1), "a.b.c": torch.zeros(2), "p.weight": torch.arange(6.0).view(2, 3)}
    conv = to_ours(state, maps, "ckpt")
    assert set(conv.ours) == {"x.b.c", "y.w"} and set(conv.aside) == {"a.unused.w"}
    assert conv.plan == {"a.unused.w": "unused: unused", "a.b.c": "x.b.c", "p.weight": "y.w"}
    back = to_released(conv.ours, conv.aside, maps, "ckpt")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ConversionError, match=r"ckpt: 2 released keys match no known parameter group: \['q', 'z.y'\]"):
        to_ours({**state, "z.y": torch.ones(1), "q": torch.ones(1)}, maps, "ckpt")
    with pytest.raises(ConversionError, match=r"no released counterpart: \['w.v'\]"):
        to_released({"w.v": torch.ones(1)}, {}, maps, "ckpt")


@pytest.mark.parametrize("release", ["emu1", "emu2"])
@pytest.mark.parametrize("instruct", [False, True])
def test_released_specials_get_their_released_ids(tmp_path, release, instruct):
    base = base_tokenizer(tmp_path / "llama")
    plain = 300
    specials = EMU1_SPECIALS if release == "emu1" else EMU2_SPECIALS
    rows = plain + len(specials) + 2 * instruct
    tok, got_instruct, extra = released_tokenizer(base, specials, rows)
    assert got_instruct == instruct
    ids = {t: tok.convert_tokens_to_ids(t) for t in [*specials, *(["[USER]", "[ASSISTANT]"] * instruct)]}
    # docs/design.md §8: [PAD] [IMG] [/IMG] <image> = base + 0..3 in both releases (32000..32003 on LLaMA's 32000).
    assert [ids[t] for t in ["[PAD]", "[IMG]", "[/IMG]", "<image>"]] == [plain, plain + 1, plain + 2, plain + 3]
    if release == "emu2":
        assert ids["[VIDEO]"] == plain + 7 and ids["<patch_index_0256>"] == plain + 271
    if instruct:
        assert [ids["[USER]"], ids["[ASSISTANT]"]] == [rows - 2, rows - 1]
    assert len(tok) == rows + extra and extra > 0   # the platform's own specials come after the released rows
    # Converting again from the converted tokenizer (specials already present) checks, and adds nothing new.
    tok.save_pretrained(str(tmp_path / "again"))
    again, _, extra_again = released_tokenizer(str(tmp_path / "again"), specials, rows)
    assert len(again) == len(tok) and extra_again == extra


def test_a_wrong_row_count_names_the_counts(tmp_path):
    base = base_tokenizer(tmp_path / "llama")
    with pytest.raises(ConversionError, match=r"310 rows .* 300 plain tokens: 10 added rows, expected 4"):
        released_tokenizer(base, EMU1_SPECIALS, 310)


# ---------------------------------------------------------------- RoPE buffers and release configs

def _rope(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_rope_buffers_rounded_to_their_stored_dtype_are_accepted(dtype):
    """Emu1 casts its LLaMA, buffers included, to bf16 (`Emu1/models/modeling_llama.py` L173 `self.lm.bfloat16()`,
    `Emu1/inference.py` L176); Emu2's native loaders cast the model to bf16 before loading (`Emu2/emu/chat.py` L206,
    `Emu2/emu/diffusion.py` L260). Rounding to bf16 moves inv_freq by up to 2^-8 relative (fp16: 2^-11)."""
    state = {f"decoder.lm.model.layers.{i}.self_attn.rotary_emb.inv_freq": _rope(48).to(dtype) for i in range(2)}
    if dtype == torch.bfloat16:
        assert ((state["decoder.lm.model.layers.0.self_attn.rotary_emb.inv_freq"].float() - _rope(48)).abs()
                / _rope(48)).max() > 1e-3
    check_rope(state, 96, 2, "ckpt", "--llm-heads 2")


@pytest.mark.parametrize("dtype, buffer", [
    (torch.bfloat16, _rope(48, theta=1e6)),         # another RoPE base
    (torch.bfloat16, _rope(48) / 2),                 # linear position scaling by 2
    (torch.bfloat16, _rope(48) * 1.02),              # 2 %: beyond bf16 rounding
    (torch.float32, _rope(48) * (1 + 1e-4)),         # within the old fixed 1e-3, far beyond fp32 rounding
], ids=["theta-1e6-bf16", "scaled-bf16", "2pc-bf16", "1e-4-fp32"])
def test_buffers_that_are_not_the_rope_frequencies_are_refused_naming_key_dtype_and_tolerance(dtype, buffer):
    state = {"decoder.lm.model.layers.0.self_attn.rotary_emb.inv_freq": buffer.to(dtype)}
    name = str(dtype).replace(".", r"\.")
    with pytest.raises(ConversionError, match=rf"ckpt: decoder\.lm\.model\.layers\.0\.self_attn\.rotary_emb\.inv_freq "
                                              rf"\({name}\) differs from the RoPE frequencies 1/10000\^\(2i/48\) .* by "
                                              rf"up to .*; {name} rounding allows"):
        check_rope(state, 96, 2, "ckpt", "--llm-heads 2")


# The released config files, field for field (baaivision/Emu 13c395e): Emu1/models/Emu-14B.json,
# Emu1/models/llama_config/config.json and Emu2/emu/conf/llama_config/config.json (the fields read here).
EMU1_MODEL_JSON = {"embed_dim": 1024,
                   "vision_cfg": {"image_size": 224, "layers": 40, "width": 1408, "head_width": 88,
                                  "mlp_ratio": 4.3637, "patch_size": 14, "eva_model_name": "eva-clip-g-14-x",
                                  "drop_path_rate": 0, "xattn": True, "freeze": False},
                   "multimodal_cfg": {"name": "llama-13B", "xattn": True, "n_causal": 32, "freeze": False},
                   "vladapter_cfg": {"name": "cformer", "n_causal": 32}}
LLAMA_13B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 5120, "intermediate_size": 13824,
             "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 40,
             "num_hidden_layers": 40, "rms_norm_eps": 1e-06, "vocab_size": 32000}
LLAMA_33B = {**LLAMA_13B, "hidden_size": 6656, "intermediate_size": 17920, "num_attention_heads": 52,
             "num_hidden_layers": 60}


def test_release_config_files_state_the_released_head_counts(tmp_path):
    import json

    from emu_lightning.checkpoints.convert.config import read_configs

    paths = {}
    for name, cfg in {"Emu-14B.json": EMU1_MODEL_JSON, "emu1_llama.json": LLAMA_13B,
                      "emu2_llama.json": LLAMA_33B}.items():
        (tmp_path / name).write_text(json.dumps(cfg))
        paths[name] = str(tmp_path / name)
    emu1 = read_configs([paths["Emu-14B.json"], paths["emu1_llama.json"]])
    got = {k: emu1[k].value for k in ("vision_heads", "vision_width", "vision_layers", "image_size", "patch_size",
                                      "n_causal", "llm_heads", "llm_hidden", "llm_layers", "llm_ffn")}
    assert got == dict(vision_heads=16, vision_width=1408, vision_layers=40, image_size=224, patch_size=14,
                       n_causal=32, llm_heads=40, llm_hidden=5120, llm_layers=40, llm_ffn=13824)
    assert emu1["vision_heads"].origin == "Emu-14B.json: vision_cfg.width / head_width = 1408 / 88"
    assert read_configs([paths["emu2_llama.json"]])["llm_heads"].value == 52
    with pytest.raises(ConversionError, match=r"emu1_llama\.json: num_attention_heads = 40 but emu2_llama\.json: "
                                              r"num_attention_heads = 52"):
        read_configs([paths["emu1_llama.json"], paths["emu2_llama.json"]])
