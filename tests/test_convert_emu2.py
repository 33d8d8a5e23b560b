"""Emu2 release → our parts: every released key accounted for, exact round trip, the released computation
reproduced (EVA post-norm trunk, CLS drop, k = s pooling, project_up, LLaMA, project_down on the final-norm state,
generation feedback), and the converted model trained through `recipes/emu2/finetune_released.yaml`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emu_lightning.checkpoints.io import safe_load
from emu_lightning.cli import cli_main
from emu_lightning.checkpoints.convert import ConversionError, convert_emu2, export_emu2
from emu_lightning.checkpoints.convert.tokenizer import EMU2_SPECIALS
from emu_lightning.data.layout.sequence import SequenceCollator
from tests.test_convert_common import (
    EVA, LLM, _rand, assert_platform_rows_are_the_mean, base_tokenizer, released_eva, released_forward_eva,
    released_llama, released_llama_model)

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "emu2" / "finetune_released.yaml"
GRID = 2   # the tiny 4×4 patch grid pooled with k = s = 2, as Emu2 pools 32×32 with k = s = 4


def released_emu2(tokenizer_dir: str, layout: str = "native") -> tuple[dict, object]:
    """A tiny Emu2 checkpoint in the released layout (emu.py / lm.py / eva_vit.py names)."""
    rows = 300 + len(EMU2_SPECIALS)                               # the base BPE has 300 tokens
    vis, lm = ("visual.", "decoder.lm.") if layout == "native" else ("model.visual.", "model.decoder.lm.")
    state = released_eva(vis, postnorm=True, clip_head=False)     # Emu2's EVA has no final norm and no head
    llama, config = released_llama(lm, rows)
    state.update(llama)
    up, down = ("project_up.weight", "project_down.weight") if layout == "hf" else (
        "decoder.lm.project_up.weight", "decoder.lm.project_down.weight")
    state[up] = _rand(LLM["hidden"], EVA["width"], std=0.1)     # Linear(d_model → hidden, bias=False)
    state[down] = _rand(EVA["width"], LLM["hidden"], std=0.1)   # Linear(hidden → d_model, bias=False)
    return state, config


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("emu2")
    tok = base_tokenizer(root / "llama")
    state, config = released_emu2(tok)
    torch.save(state, root / "emu2.pt")
    dst = convert_emu2(str(root / "emu2.pt"), str(root / "converted"), tok, vision_heads=EVA["heads"],
                       llm_heads=LLM["heads"], grid=GRID)
    return state, config, dst, tok


def test_every_released_key_is_accounted_for_and_round_trips_exactly(converted):
    import json

    state, _, dst, _ = converted
    plan = json.loads((dst / "conversion.json").read_text())["keys"]
    assert plan.keys() == state.keys()
    unused = sorted(k for k, v in plan.items() if v.startswith("unused"))
    assert unused == [f"decoder.lm.model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(LLM["layers"])]
    assert plan["decoder.lm.project_up.weight"] == "adapter.project_up.weight"
    assert plan["decoder.lm.project_down.weight"] == "regression_head.proj.weight"
    assert plan["visual.blocks.1.attn.q_bias"] == "encoder.trunk.blocks.1.attn.q_bias"
    back = export_emu2(str(dst))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_the_hf_layout_converts_and_exports_in_its_own_names(tmp_path):
    tok = base_tokenizer(tmp_path / "llama")
    state, _ = released_emu2(tok, layout="hf")
    from safetensors.torch import save_file

    (tmp_path / "hf").mkdir()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    dst = convert_emu2(str(tmp_path / "hf"), str(tmp_path / "out"), tok, EVA["heads"], LLM["heads"], GRID)
    back = export_emu2(str(dst))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_unknown_and_missing_released_keys_are_errors_that_name_them(tmp_path):
    tok = base_tokenizer(tmp_path / "llama")
    state, _ = released_emu2(tok)
    torch.save({**state, "decoder.lm.value_head.weight": torch.ones(2)}, tmp_path / "extra.pt")
    with pytest.raises(ConversionError, match=r"1 released keys match no known .*decoder\.lm\.value_head\.weight"):
        convert_emu2(str(tmp_path / "extra.pt"), str(tmp_path / "a"), tok, EVA["heads"], LLM["heads"], GRID)
    del state["visual.blocks.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "short.pt")
    with pytest.raises(ConversionError, match=r"missing \['encoder\.trunk\.blocks\.1\.mlp\.fc2\.bias'\]"):
        convert_emu2(str(tmp_path / "short.pt"), str(tmp_path / "b"), tok, EVA["heads"], LLM["heads"], GRID)


def test_platform_tokens_are_appended_as_mean_rows(converted):
    state, _, dst, _ = converted
    assert_platform_rows_are_the_mean(state, safe_load(dst / "weights.pt"))


def test_the_older_projection_names_convert_to_the_same_tensors(converted, tmp_path):
    """Older Emu2 files name `project_up` `vl_adapter.projection` and `project_down` `decoder.lm.stu_regress_head`
    (emu.py `load_state_dict` renames them): same parts, and the export gives the file back under its own names."""
    state, _, dst, tok = converted
    older = dict(state)
    older["vl_adapter.projection.weight"] = older.pop("decoder.lm.project_up.weight")
    older["decoder.lm.stu_regress_head.weight"] = older.pop("decoder.lm.project_down.weight")
    torch.save(older, tmp_path / "older.pt")
    out = convert_emu2(str(tmp_path / "older.pt"), str(tmp_path / "out"), tok, EVA["heads"], LLM["heads"], GRID)
    ours, again = safe_load(dst / "weights.pt"), safe_load(out / "weights.pt")
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)
    back = export_emu2(str(out))
    assert back.keys() == older.keys() and all(torch.equal(back[k], older[k]) for k in older)


def build(dst: Path):
    """The converted model through the real recipe + the converter's overlay (real data paths nulled)."""
    overrides = ["--data.init_args.train", "null", "--data.init_args.val", "null", "--data.init_args.test", "null",
                 "--data.init_args.weights", "null", "--data.init_args.layouts", "null", "--data.init_args.demos",
                 "null", "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                 "--trainer.strategy", "auto", "--trainer.logger", "false", "--trainer.precision", "32-true"]
    cli = cli_main(["--config", str(RECIPE), "--config", str(dst / "model.yaml"), *overrides], run=False)
    system = cli.model
    system.setup("fit")                                            # the hand-off: all four parts, verified
    assert system.handoff_report.loaded.keys() == {"encoder", "adapter", "llm", "regression_head"}
    return system.eval()


def test_converted_model_computes_what_the_release_computes(converted, tmp_path):
    state, config, dst, _ = converted
    system = build(dst)
    # Seeded: the result must not depend on what earlier tests drew. Two fp32 implementations of the same ViT sum
    # in different orders; differences of ~2e-5 on O(1) features were seen, hence atol 5e-5 on the encoder.
    pixels = torch.randn(2, 3, EVA["image"], EVA["image"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # emu.py encode_image: visual → drop CLS → (b,c,s,s) → avg_pool2d(k = s = stride) → (b, n_query, c)
        feats = released_forward_eva(state, "visual.", pixels, postnorm=True)[:, 1:]
        b, n, c = feats.shape
        side = int(n ** 0.5)
        grid = feats.permute(0, 2, 1).reshape(b, c, side, side)
        pooled = F.avg_pool2d(grid, kernel_size=side // GRID, stride=side // GRID).reshape(b, c, -1).permute(0, 2, 1)
        torch.testing.assert_close(system.encoder(pixels), feats, rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(system.adapter.pool(system.encoder(pixels)), pooled, rtol=1e-5, atol=1e-5)
        visual = F.linear(pooled, state["decoder.lm.project_up.weight"])
        torch.testing.assert_close(system.encode_images(pixels), visual, rtol=1e-5, atol=1e-5)
        # The LLM and project_down on hidden_states[-1] (after the final RMSNorm), as generate_image reads them.
        ref = released_llama_model(state, "decoder.lm.", config)
        ids = torch.tensor([[1, 5, 9, system.ids.img, *[system.ids.image] * GRID**2, system.ids.img_end, 7]])
        embeds = ref.model.embed_tokens(ids)
        embeds[ids == system.ids.image] = visual[0]
        out = ref.model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        hidden = out.hidden_states[-1]
        ours_embeds = system.embed_multimodal(ids, visual[:1])
        torch.testing.assert_close(ours_embeds, embeds)
        ours_hidden, _ = system.llm(ours_embeds, torch.ones_like(ids))
        torch.testing.assert_close(ours_hidden, hidden, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(system.regression_head(ours_hidden),
                                   F.linear(hidden, state["decoder.lm.project_down.weight"]), rtol=1e-4, atol=1e-5)
        # Text logits over the released vocabulary (the platform's appended tokens come after it).
        rows = ref.lm_head.out_features
        torch.testing.assert_close(system.llm.logits(ours_hidden)[..., :rows], ref.lm_head(hidden),
                                   rtol=1e-4, atol=1e-5)


def test_generation_matches_the_released_full_recompute_loop(converted):
    """emu.py generate_image: append [IMG] then <image>s; after each full forward, project_down the hidden states
    at [IMG] and the generated <image>s, and feed project_up(prediction) back into the <image> rows."""
    state, config, dst, _ = converted
    system = build(dst)
    ref = released_llama_model(state, "decoder.lm.", config)
    up, down = state["decoder.lm.project_up.weight"], state["decoder.lm.project_down.weight"]
    segs = [("text", "a red circle")]
    ids, _, _, _ = SequenceCollator(system.tokenizer, system.num_image_tokens).encode(segs, close=False, limit=10**9)
    with torch.no_grad():
        got = system.generate_image_embeddings([segs])[0]                         # (N, D_vis), KV-cached
        seq, preds = list(ids) + [system.ids.img], None
        for k in range(system.num_image_tokens):
            x = torch.tensor([seq])
            embeds = ref.model.embed_tokens(x)
            if preds is not None:
                embeds[x == system.ids.image] = F.linear(preds[:k], up)
            hidden = ref.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][0]
            preds = F.linear(hidden[len(ids):], down)                             # [IMG] and the <image>s so far
            seq.append(system.ids.image)
    torch.testing.assert_close(got, preds, rtol=1e-4, atol=1e-5)


def test_converted_model_trains_one_stage2_step(converted):
    _, _, dst, _ = converted
    system = build(dst).train()
    img = lambda s: torch.randn(3, EVA["image"], EVA["image"], generator=torch.Generator().manual_seed(s))  # noqa: E731
    docs = [{"id": "pair", "source": "pairs", "segments": [("image", img(0)), ("text", "a red circle.")]},
            {"id": "doc", "source": "documents", "segments": [("text", "first"), ("image", img(1)), ("text", "end.")]}]
    batch = SequenceCollator(system.tokenizer, system.num_image_tokens, max_length=64)(docs)
    losses, _ = system.losses(batch)
    assert torch.isfinite(losses["loss"]) and losses["regression_loss"] > 0 and losses["text_loss"] > 0
    losses["loss"].backward()
    assert system.llm.model.model.embed_tokens.weight.grad is not None
    assert all(p.grad is None for p in system.encoder.parameters())              # frozen, as the recipe says
    text = system.eval().generate_text([[("image", img(0)), ("text", "a")]], max_new_tokens=3)
    assert len(text) == 1 and isinstance(text[0], str)


def test_cli_converts_and_exports_a_fine_tuned_checkpoint(converted, tmp_path):
    from emu_lightning.checkpoints.convert.__main__ import main

    state, _, dst, tok = converted
    src = str(dst.parent / "emu2.pt")
    out = main(["emu2", src, str(tmp_path / "cli"), "--tokenizer", tok, "--vision-heads", "2", "--llm-heads", "2",
                "--grid", str(GRID)])
    assert (out / "model.yaml").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    # A "fine-tuned" Lightning checkpoint: one tensor changed; export writes it under its released name.
    weights = torch.load(out / "weights.pt", weights_only=True)
    weights["regression_head.proj.weight"] = weights["regression_head.proj.weight"] + 1.0
    torch.save({"state_dict": weights}, tmp_path / "last.ckpt")
    main(["export", str(out), str(tmp_path / "released.pt"), "--weights", str(tmp_path / "last.ckpt")])
    back = torch.load(tmp_path / "released.pt", weights_only=True)
    assert back.keys() == state.keys()
    torch.testing.assert_close(back["decoder.lm.project_down.weight"], state["decoder.lm.project_down.weight"] + 1.0)
    assert torch.equal(back["visual.pos_embed"], state["visual.pos_embed"])
