"""Emu (v1) release → our parts: every released key accounted for (EVA-CLIP norm/head, the T5 word embedding and RoPE
buffers kept aside as unused), exact round trip, the released computation reproduced (pre-norm EVA with CLS,
`ln_visual` eps 1e-6, T5 decoder C-Former, projection with bias, LLaMA, `stu_regress_head`, generation feedback
of the regressed vector itself), one training step through `recipes/emu1/finetune_released.yaml`, the released
dtypes and config files, and Emu-I's peft LoRA layout merged as peft merges it (docs/converting.md).

The released C-Former is written out below from its definition, not built from transformers or from our
`t5_decoder_config`, so a wrong eps, bucket count, bucket distance or masking on our side fails the parity test."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emu_lightning.checkpoints.io import safe_load
from emu_lightning.cli import cli_main
from emu_lightning.checkpoints.convert import ConversionError, convert_emu1, export_emu1
from emu_lightning.checkpoints.convert.tokenizer import EMU1_SPECIALS
from emu_lightning.data.layout.sequence import SequenceCollator
from tests.test_convert_common import (
    EVA, LLM, _rand, assert_platform_rows_are_the_mean, base_tokenizer, released_eva, released_forward_eva,
    released_llama, released_llama_model)

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "emu1" / "finetune_released.yaml"
# The released C-Former is `T5ForConditionalGeneration(T5Config.from_pretrained("t5-base")).decoder`
# (causal_former.py): t5-base's T5LayerNorm eps 1e-6, 32 relative-position buckets, max distance 128, ReLU FFN, and a
# decoder, so its buckets are unidirectional and its self-attention causal (Emu1/models/modeling_t5.py). Only the
# widths are shrunk; 24 queries reach past the 16 exact buckets into the logarithmic ones that max_distance shapes.
T5 = dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, queries=24, eps=1e-6, buckets=32, max_distance=128)


def released_t5(width: int) -> dict[str, torch.Tensor]:
    """The released C-Former stack's state (modeling_t5.py names): per block self-attention (block 0 holds the
    relative position bias), cross-attention whose k/v read `encoder_width`, ReLU FFN, each with its RMS norm; the
    `embed_tokens` it keeps from `T5ForConditionalGeneration` (causal_former.py sets only `lm.shared = None`)."""
    d, inner, ff = T5["d_model"], T5["d_model"], T5["d_ff"]    # d_kv = d_model / heads, so inner = d_model
    s = {"embed_tokens.weight": _rand(100, d), "final_layer_norm.weight": _rand(d, std=0.2, mean=1.0),
         "block.0.layer.0.SelfAttention.relative_attention_bias.weight": _rand(T5["buckets"], T5["num_heads"], std=1.0)}
    for i in range(T5["num_layers"]):
        b = f"block.{i}.layer."
        for j, attn, kv in ((0, "SelfAttention", d), (1, "EncDecAttention", width)):
            p = f"{b}{j}.{attn}."
            s.update({p + "q.weight": _rand(inner, d, std=0.2), p + "k.weight": _rand(inner, kv, std=0.2),
                      p + "v.weight": _rand(inner, kv, std=0.2), p + "o.weight": _rand(d, inner, std=0.2)})
        s.update({f"{b}2.DenseReluDense.wi.weight": _rand(ff, d, std=0.2),
                  f"{b}2.DenseReluDense.wo.weight": _rand(d, ff, std=0.2),
                  **{f"{b}{j}.layer_norm.weight": _rand(d, std=0.2, mean=1.0) for j in range(3)}})
    return s


def released_t5_forward(state: dict, prefix: str, queries: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """modeling_t5.py `T5Stack.forward` (decoder, eval, inputs_embeds = the causal queries), written out:
    per block `h + Attn(rms(h))` self (bias from block 0 + causal mask), `h + Attn(rms(h), vis)` cross (no bias),
    `h + wo(relu(wi(rms(h))))`; then `final_layer_norm`. Scores are q·kᵀ without 1/√d (T5). (B,N,d) -> (B,N,d)."""
    w = lambda k: state[prefix + k]  # noqa: E731
    rms = lambda x, k: w(k) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + T5["eps"])  # noqa: E731
    B, N, _ = queries.shape

    def attn(p: str, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | float) -> torch.Tensor:
        heads = lambda t: t.reshape(B, t.shape[1], T5["num_heads"], -1).transpose(1, 2)  # noqa: E731  (B,H,*,d_kv)
        q, k, v = (heads(F.linear(t, w(p + n + ".weight"))) for t, n in ((x, "q"), (kv, "k"), (kv, "v")))
        a = (q @ k.transpose(-2, -1) + bias).softmax(-1)                          # (B,H,N,L)
        return F.linear((a @ v).transpose(1, 2).reshape(B, N, -1), w(p + "o.weight"))

    # `_relative_position_bucket(bidirectional=False)`: n = how far back the key is; 0..15 exact, then log bins.
    pos = torch.arange(N)
    n = (pos[:, None] - pos[None, :]).clamp(min=0)                                 # (N,N) query − key, ≥ 0
    exact = T5["buckets"] // 2
    log_bin = exact + (torch.log(n.clamp(min=1).float() / exact) / math.log(T5["max_distance"] / exact)
                       * (T5["buckets"] - exact)).long()
    bucket = torch.where(n < exact, n, log_bin.clamp(max=T5["buckets"] - 1))
    bias = w("block.0.layer.0.SelfAttention.relative_attention_bias.weight")[bucket].permute(2, 0, 1)  # (H,N,N)
    bias = bias.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))  # a query sees no later one
    h = queries
    for i in range(T5["num_layers"]):
        b = f"block.{i}.layer."
        h = h + attn(b + "0.SelfAttention.", rms(h, b + "0.layer_norm.weight"), rms(h, b + "0.layer_norm.weight"), bias)
        h = h + attn(b + "1.EncDecAttention.", rms(h, b + "1.layer_norm.weight"), vis, 0.0)
        x = rms(h, b + "2.layer_norm.weight")
        h = h + F.linear(F.relu(F.linear(x, w(b + "2.DenseReluDense.wi.weight"))), w(b + "2.DenseReluDense.wo.weight"))
    return rms(h, "final_layer_norm.weight")


def released_emu1(tokenizer_dir: str, instruct: bool = False):
    """A tiny Emu1 checkpoint in the released layout (modeling_emu.py / causal_former.py / modeling_llama.py names);
    `instruct`: Emu-I's 2 more rows (modeling_llama.py L143-145: `[USER]`, `[ASSISTANT]`)."""
    rows = 300 + len(EMU1_SPECIALS) + 2 * instruct
    state = released_eva("visual.", postnorm=False, clip_head=True)
    state.update({"ln_visual.weight": _rand(EVA["width"], std=0.2, mean=1.0), "ln_visual.bias": _rand(EVA["width"])})
    state.update({f"cformer.cformer.{k}": v for k, v in released_t5(EVA["width"]).items()})
    state["cformer.causal_tokens"] = _rand(1, T5["queries"], T5["d_model"], std=0.5)
    state["cformer.projection.weight"] = _rand(LLM["hidden"], T5["d_model"], std=0.2)
    state["cformer.projection.bias"] = _rand(LLM["hidden"])
    llama, config = released_llama("decoder.lm.", rows)
    state.update(llama)
    state["decoder.lm.stu_regress_head.weight"] = _rand(LLM["hidden"], LLM["hidden"], std=0.1)
    return state, config


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("emu1")
    tok = base_tokenizer(root / "llama")
    state, config = released_emu1(tok)
    torch.save({"module": state}, root / "emu1.pt")               # a wrapped file, as training scripts save them
    dst = convert_emu1(str(root / "emu1.pt"), str(root / "converted"), tok, vision_heads=EVA["heads"],
                       llm_heads=LLM["heads"], t5_heads=T5["num_heads"])
    return state, config, dst


def build(dst: Path):
    overrides = ["--data.init_args.train", "null", "--data.init_args.val", "null", "--data.init_args.test", "null",
                 "--data.init_args.weights", "null", "--data.init_args.layouts", "null", "--data.init_args.demos",
                 "null", "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                 "--trainer.strategy", "auto", "--trainer.logger", "false", "--trainer.precision", "32-true"]
    cli = cli_main(["--config", str(RECIPE), "--config", str(dst / "model.yaml"), *overrides], run=False)
    cli.model.setup("fit")
    assert cli.model.handoff_report.loaded.keys() == {"encoder", "adapter", "llm", "regression_head"}
    return cli.model.eval()


def test_every_released_key_is_accounted_for_and_round_trips_exactly(converted):
    state, _, dst = converted
    plan = json.loads((dst / "conversion.json").read_text())["keys"]
    assert plan.keys() == state.keys()
    unused = sorted(k for k, v in plan.items() if v.startswith("unused"))
    assert unused == sorted(["visual.norm.weight", "visual.norm.bias", "visual.head.weight", "visual.head.bias",
                             "cformer.cformer.embed_tokens.weight",
                             *[f"decoder.lm.model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)]])
    assert plan["cformer.causal_tokens"] == "adapter.causal_tokens"
    assert plan["decoder.lm.stu_regress_head.weight"] == "regression_head.proj.weight"
    back = export_emu1(str(dst))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_platform_tokens_are_appended_as_mean_rows(converted):
    state, _, dst = converted
    assert_platform_rows_are_the_mean(state, safe_load(dst / "weights.pt"))


def test_converted_model_computes_what_the_release_computes(converted):
    state, config, dst = converted
    system = build(dst)
    assert system.adapter.ln_visual.eps == 1e-6
    pixels = torch.randn(2, 3, EVA["image"], EVA["image"])
    with torch.no_grad():
        # modeling_emu.py forward: visual.forward_features (CLS kept, no final norm) → ln_visual → cformer
        feats = released_forward_eva(state, "visual.", pixels, postnorm=False)
        torch.testing.assert_close(system.encoder(pixels), feats, rtol=1e-5, atol=1e-5)
        vis = F.layer_norm(feats, (EVA["width"],), state["ln_visual.weight"], state["ln_visual.bias"], eps=1e-6)
        queries = state["cformer.causal_tokens"].expand(2, -1, -1)
        hidden = released_t5_forward(state, "cformer.cformer.", queries, vis)
        visual = F.linear(hidden, state["cformer.projection.weight"], state["cformer.projection.bias"])
        torch.testing.assert_close(system.encode_images(pixels), visual, rtol=1e-4, atol=1e-4)
        ref = released_llama_model(state, "decoder.lm.", config)
        ids = torch.tensor([[1, 5, system.ids.img, *[system.ids.image] * T5["queries"], system.ids.img_end, 7]])
        embeds = ref.model.embed_tokens(ids)
        embeds[ids == system.ids.image] = visual[0]
        out = ref.model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        ours, _ = system.llm(system.embed_multimodal(ids, visual[:1]), torch.ones_like(ids))
        torch.testing.assert_close(ours, out.hidden_states[-1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(system.regression_head(ours),
                                   F.linear(out.hidden_states[-1], state["decoder.lm.stu_regress_head.weight"]),
                                   rtol=1e-4, atol=1e-5)
        # Text logits over the released vocabulary (the platform's appended tokens come after it): the lm_head map.
        rows = ref.lm_head.out_features
        torch.testing.assert_close(system.llm.logits(ours)[..., :rows], ref.lm_head(out.hidden_states[-1]),
                                   rtol=1e-4, atol=1e-5)


def test_generation_matches_the_released_full_recompute_loop(converted):
    """modeling_emu.py generate_image: the regressed vectors themselves fill the generated <image> rows."""
    state, config, dst = converted
    system = build(dst)
    ref = released_llama_model(state, "decoder.lm.", config)
    head = state["decoder.lm.stu_regress_head.weight"]
    segs = [("text", "a blue square")]
    ids, _, _, _ = SequenceCollator(system.tokenizer, system.num_image_tokens).encode(segs, close=False, limit=10**9)
    with torch.no_grad():
        got = system.generate_image_embeddings([segs])[0]
        seq, preds = list(ids) + [system.ids.img], None
        for k in range(system.num_image_tokens):
            x = torch.tensor([seq])
            embeds = ref.model.embed_tokens(x)
            if preds is not None:
                embeds[x == system.ids.image] = preds[:k]
            hidden = ref.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][0]
            preds = F.linear(hidden[len(ids):], head)
            seq.append(system.ids.image)
    torch.testing.assert_close(got, preds, rtol=1e-4, atol=1e-5)


def test_converted_model_trains_one_stage2_step_with_img_end_targets(converted):
    _, _, dst = converted
    system = build(dst).train()
    img = torch.randn(3, EVA["image"], EVA["image"])
    batch = SequenceCollator(system.tokenizer, system.num_image_tokens, max_length=64)(
        [{"id": "pair", "source": "pairs", "segments": [("image", img), ("text", "a red circle.")]}])
    losses, _ = system.losses(batch)
    assert torch.isfinite(losses["loss"]) and losses["regression_loss"] > 0 and "target_var" in losses
    losses["loss"].backward()
    assert system.adapter.causal_tokens.grad is not None and system.encoder.trunk.cls_token.grad is None


def emu_i_release(tokenizer_dir: str, base_layer: bool) -> tuple[dict, torch.nn.Module]:
    """A tiny `Emu-instruct.pt` as `Emu1/inference.py` L40-57 holds it: the LLaMA (with `stu_regress_head` on it,
    modeling_llama.py L169) wrapped by `get_peft_model(LoraConfig(q/k/v/o, lora_dropout 0.05, bias "none"))`,
    saved from the whole Emu, so LLaMA keys read `decoder.lm.base_model.model.*`. Tiny r = 4, alpha = 8 (the
    release: 16 / 16), trained (non-zero) B factors. `base_layer`: peft >= 0.7 names (this venv's 0.21.2); else the
    names of the peft of July 2023, without `.base_layer`. Returns the state and the peft model (the reference)."""
    pytest.importorskip("peft", reason="peft (pinned in pyproject) is the reference LoRA implementation")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    plain, config = released_emu1(tokenizer_dir, instruct=True)
    lm = LlamaForCausalLM(config)
    lm.stu_regress_head = torch.nn.Linear(LLM["hidden"], LLM["hidden"], bias=False)
    lm.load_state_dict({k[len("decoder.lm."):]: v for k, v in plain.items()
                        if k.startswith("decoder.lm.") and "inv_freq" not in k})
    torch.manual_seed(0)
    peft_model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "o_proj"],
                                               lora_dropout=0.05, bias="none", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    state = {k: v for k, v in plain.items() if not k.startswith("decoder.lm.") or "inv_freq" in k}
    state = {k.replace("decoder.lm.", "decoder.lm.base_model.model."): v for k, v in state.items()}
    for k, v in peft_model.state_dict().items():
        state["decoder.lm." + (k if base_layer else k.replace(".base_layer.", "."))] = v.clone()
    return state, peft_model.eval()


@pytest.mark.parametrize("base_layer", [False, True], ids=["peft-2023-names", "peft-base_layer-names"])
def test_emu_i_lora_merges_as_peft_merges_and_exports_to_the_peft_layout(tmp_path, base_layer):
    """Emu-I: converting merges W + (alpha / r) B A exactly as peft's `merge_and_unload`; the export is the peft
    layout again (every released key, base = merged, lora_B = 0) and, loaded the way inference.py loads it,
    computes what the released file computes."""
    import copy

    pytest.importorskip("peft", reason="peft (pinned in pyproject) is the reference LoRA implementation")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    tok = base_tokenizer(tmp_path / "llama")
    released, ref = emu_i_release(tok, base_layer)
    torch.save({"module": released}, tmp_path / "Emu-instruct.pt")
    dst = convert_emu1(str(tmp_path / "Emu-instruct.pt"), str(tmp_path / "out"), tok, EVA["heads"], LLM["heads"],
                       T5["num_heads"], lora_alpha=8)
    meta = json.loads((dst / "conversion.json").read_text())
    assert (meta["variant"], meta["layout"], len(meta["lora"]["targets"])) == ("instruct", "peft", 4 * LLM["layers"])
    ours, rows = safe_load(dst / "weights.pt"), 300 + len(EMU1_SPECIALS) + 2
    merged = copy.deepcopy(ref).merge_and_unload().state_dict()                      # peft's own merge
    for k, v in merged.items():
        mine = ours["regression_head.proj.weight" if k.startswith("stu_regress_head") else f"llm.model.{k}"]
        torch.testing.assert_close(mine[:rows] if k.endswith(("embed_tokens.weight", "lm_head.weight")) else mine, v)
    back = export_emu1(str(dst))
    assert back.keys() == released.keys()
    assert all(torch.equal(back[k], v) for k, v in released.items() if "base_model" not in k or "lora_A" in k)
    assert all(not back[k].any() for k in back if "lora_B" in k)
    # Load the export as inference.py does (peft-wrapped LLaMA; here strictly, in this peft's names) and compare.
    lm = LlamaForCausalLM(ref.config)
    lm.stu_regress_head = torch.nn.Linear(LLM["hidden"], LLM["hidden"], bias=False)
    fresh = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                          bias="none", task_type="CAUSAL_LM")).eval()
    names = set(fresh.state_dict())
    sub = {}
    for k, v in back.items():
        if k.startswith("decoder.lm.") and "inv_freq" not in k:
            name = k[len("decoder.lm."):]
            sub[name if name in names else name.replace(".weight", ".base_layer.weight")] = v
    fresh.load_state_dict(sub, strict=True)
    ids = torch.randint(0, rows, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_keys_outside_the_emu_i_layout_or_without_their_pair_are_refused(tmp_path):
    tok = base_tokenizer(tmp_path / "llama")
    state, _ = released_emu1(tok)
    state["decoder.lm.model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.ones(2, 2)
    torch.save(state, tmp_path / "stray.pt")
    with pytest.raises(ConversionError, match=r"1 LoRA / peft keys outside Emu-I's decoder\.lm\.base_model\.model\.\* "
                                              r"layout .*q_proj\.lora_A"):
        convert_emu1(str(tmp_path / "stray.pt"), str(tmp_path / "a"), tok, EVA["heads"], LLM["heads"], T5["num_heads"])
    released, _ = emu_i_release(tok, base_layer=False)
    del released["decoder.lm.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"]
    torch.save(released, tmp_path / "half.pt")
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.self_attn\.v_proj has lora_A but not both"):
        convert_emu1(str(tmp_path / "half.pt"), str(tmp_path / "b"), tok, EVA["heads"], LLM["heads"], T5["num_heads"])


def test_a_mixed_dtype_release_exports_dtype_for_dtype(converted, tmp_path):
    """The released code casts parts of Emu to bf16 and leaves the rest fp32: the LLaMA with its regression head and
    RoPE buffers (`Emu1/models/modeling_llama.py` L169-173: `stu_regress_head` is set, then `self.lm.bfloat16()`),
    the C-Former's T5 stack (`Emu1/models/causal_former.py` L33-34), while EVA is built with `cast_dtype=torch.float`
    (`Emu1/inference.py` L38). The export writes each tensor back in its own dtype, also from an fp32 fine-tune."""
    state, _, dst = converted
    tok = str(dst / "tokenizer")
    mixed = {k: v.to(torch.bfloat16) if k.startswith(("decoder.lm.", "cformer.cformer.")) else v
             for k, v in state.items()}
    torch.save({"module": mixed}, tmp_path / "emu1.pt")
    out = convert_emu1(str(tmp_path / "emu1.pt"), str(tmp_path / "out"), tok, EVA["heads"], LLM["heads"],
                       T5["num_heads"])
    back = export_emu1(str(out))
    assert back.keys() == mixed.keys()
    assert all(back[k].dtype == mixed[k].dtype and torch.equal(back[k], mixed[k]) for k in mixed)
    weights = {k: v.float() for k, v in safe_load(out / "weights.pt").items()}
    torch.save({"state_dict": weights}, tmp_path / "last.ckpt")
    back = export_emu1(str(out), str(tmp_path / "last.ckpt"))
    assert all(back[k].dtype == mixed[k].dtype and torch.equal(back[k], mixed[k]) for k in mixed)


def test_release_configs_give_the_head_counts(converted, tmp_path):
    """`Emu1/models/Emu-14B.json` states the EVA width and head width (heads = width / head_width, as
    `Emu1/models/model.py` L112 computes them) and n_causal; `Emu1/models/llama_config/config.json` the LLaMA heads;
    a T5 config (causal_former.py L25 loads t5-base's) the C-Former heads. Tiny values, released field names."""
    import yaml

    state, _, dst = converted
    files = {"Emu-14B.json": {"embed_dim": 32, "vision_cfg": {"image_size": EVA["image"], "layers": EVA["depth"],
                                                              "width": EVA["width"], "head_width": 32,
                                                              "mlp_ratio": 4.3637, "patch_size": EVA["patch"]},
                              "multimodal_cfg": {"name": "llama-13B", "n_causal": T5["queries"]},
                              "vladapter_cfg": {"name": "cformer", "n_causal": T5["queries"]}},
             "config.json": {"model_type": "llama", "hidden_size": LLM["hidden"], "num_attention_heads": 2,
                             "num_hidden_layers": LLM["layers"], "intermediate_size": LLM["ffn"],
                             "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "vocab_size": 32000},
             "t5.json": {"model_type": "t5", "d_model": T5["d_model"], "num_heads": 2,
                         "num_decoder_layers": T5["num_layers"], "d_ff": T5["d_ff"]}}
    for name, cfg in files.items():
        (tmp_path / name).write_text(json.dumps(cfg))
    configs = [str(tmp_path / name) for name in files]
    out = convert_emu1(str(dst.parent / "emu1.pt"), str(tmp_path / "out"), str(dst / "tokenizer"), configs=configs)
    parts = yaml.safe_load((out / "model.yaml").read_text())["model"]["init_args"]
    assert [parts[p]["init_args"]["num_heads"] for p in ("encoder", "adapter", "llm")] == [2, 2, 2]
    (tmp_path / "t5.json").write_text(json.dumps({**files["t5.json"], "num_heads": 3}))
    with pytest.raises(ConversionError, match=r"--config t5\.json: num_heads = 3 does not divide the width 32 "
                                              r"\(the width of cformer\.causal_tokens\) into heads"):
        convert_emu1(str(dst.parent / "emu1.pt"), str(tmp_path / "b"), str(dst / "tokenizer"), configs=configs)
    (tmp_path / "Emu-14B.json").write_text(json.dumps({**files["Emu-14B.json"], "vladapter_cfg": {"n_causal": 32}}))
    with pytest.raises(ConversionError, match=r"Emu-14B\.json: vladapter_cfg\.n_causal = 32 but the queries of "
                                              r"cformer\.causal_tokens is 24"):
        convert_emu1(str(dst.parent / "emu1.pt"), str(tmp_path / "c"), str(dst / "tokenizer"), configs=configs)


def test_a_wrong_llm_head_count_is_named_not_called_a_rope_mismatch(converted, tmp_path):
    state, _, dst = converted
    with pytest.raises(ConversionError, match=r"so head_dim = 48 and the LLaMA has 96 / 48 = 2 heads; --llm-heads 3 "
                                              r"gives 3 heads \(head_dim 32\)"):
        convert_emu1(str(dst.parent / "emu1.pt"), str(tmp_path / "a"), str(dst / "tokenizer"), EVA["heads"], 3,
                     T5["num_heads"])
