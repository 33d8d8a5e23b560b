"""Stage 2: loss masks decoded position by position, hand-off, frozen encoder, KV-cached vs reference
generation, text generation with images in the prompt, per-source losses."""
from __future__ import annotations

import pytest
import torch

from emu_lightning.data.layout.sequence import SequenceCollator
from tests.helpers import IMAGE_SIZE, tiny_stage1, tiny_stage2

SPACES = ["meanpool", "cformer"]  # Emu2 (pooled targets) and Emu1 (adapter-space targets + [/IMG])


def _img(seed: int) -> torch.Tensor:
    return torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _batch(system, regress: str = "all") -> dict:
    docs = [
        {"id": "pair-image-first", "source": "pairs", "segments": [("image", _img(0)), ("text", "a red circle.")]},
        {"id": "pair-text-first", "source": "pairs", "segments": [("text", "a blue square."), ("image", _img(1))]},
        {"id": "doc", "source": "documents", "regress": regress,
         "segments": [("image", _img(2)), ("text", "then it moves."), ("image", _img(3)), ("text", "end.")]},
        {"id": "video", "source": "videos", "segments": [("video", [_img(4), _img(5)]), ("text", "it moves up.")]},
    ]
    return SequenceCollator(system.tokenizer, system.num_image_tokens, max_length=128)(docs)


@pytest.mark.parametrize("adapter", SPACES)
def test_ce_positions_are_exactly_the_text_tokens_and_eos(adapter):
    system = tiny_stage2(adapter)
    batch, ids = _batch(system), system.ids
    specials = {ids.bos, ids.pad, ids.img, ids.img_end, ids.image, ids.video}
    for b in range(len(batch["ids"])):
        row, labels = batch["input_ids"][b].tolist(), batch["labels"][b].tolist()
        targets = [t for t, y in zip(row, labels) if y != -100]
        expected = [t for t in row if t not in specials]           # every text token, and </s>
        assert targets == expected and targets[-1] == ids.eos
        assert all(y in (-100, t) for t, y in zip(row, labels))    # a label is its own token or ignored


@pytest.mark.parametrize("adapter", SPACES)
def test_regression_positions_and_targets_follow_the_spec(adapter):
    system = tiny_stage2(adapter)
    batch, ids, N = _batch(system), system.ids, system.num_image_tokens
    feats = system.encoder(batch["pixel_values"])
    visual = system.adapter(feats)
    embeds = system.embed_multimodal(batch["input_ids"], visual)
    rows, target = system.regression_pairs(batch["input_ids"], embeds, feats, visual, batch["regress_images"])
    pos = system.regression_head.predicting(rows)                 # (B,T) hidden positions
    x = batch["input_ids"]
    assert not pos[:, -1].any()                                   # the autoregressive head: t predicts t+1
    at, nxt = x[pos], x[:, 1:][pos[:, :-1]]
    n_images = len(batch["pixel_values"])  # 2 pairs + 2 document images + 2 frames
    assert n_images == 6
    if adapter == "meanpool":  # Emu2: [IMG], <image>_1..N-1 predict <image>_1..N; [/IMG] is not regressed
        assert int(pos.sum()) == n_images * N and (nxt == ids.image).all()
        assert int((at == ids.img).sum()) == n_images and int((at == ids.image).sum()) == n_images * (N - 1)
        torch.testing.assert_close(target, system.adapter.pool(feats).reshape(-1, feats.shape[-1]))
    else:  # Emu1: 33 positions for N = 32 — <image>_N also predicts the [/IMG] embedding
        assert int(pos.sum()) == n_images * (N + 1)
        assert int((nxt == ids.img_end).sum()) == n_images and int((at == ids.img).sum()) == n_images
        torch.testing.assert_close(target[nxt == ids.image], visual.reshape(-1, visual.shape[-1]))
        img_end_row = system.llm.embed(torch.tensor([ids.img_end]))[0]
        torch.testing.assert_close(target[nxt == ids.img_end], img_end_row.expand(n_images, -1))
    assert not target.requires_grad and embeds.requires_grad   # targets are detached


def test_regress_last_only_keeps_the_last_image_of_that_document():
    system = tiny_stage2("meanpool")
    full, last = _batch(system), _batch(system, regress="last")
    assert last["regress_images"].tolist() == [True, True, False, True, True, True]
    feats = system.encoder(last["pixel_values"])
    visual = system.adapter(feats)
    embeds = system.embed_multimodal(last["input_ids"], visual)
    pos, _ = system.regression_pairs(last["input_ids"], embeds, feats, visual, last["regress_images"])
    pos_full, _ = system.regression_pairs(full["input_ids"], embeds, feats, visual, full["regress_images"])
    assert int(pos_full.sum() - pos.sum()) == system.num_image_tokens and not pos[2].all()


@pytest.mark.parametrize("adapter", SPACES)
def test_losses_named_per_source_and_gradients_reach_trainable_parts_only(adapter):
    system = tiny_stage2(adapter)
    losses, per_source = system.losses(_batch(system))
    assert set(per_source) == {"pairs", "documents", "videos"}
    assert all(set(t) == {"text_loss", "regression_loss"} for t in per_source.values())
    torch.testing.assert_close(losses["loss"], losses["text_loss"] + losses["regression_loss"])
    losses["loss"].backward()
    assert all(p.grad is None for p in system.encoder.parameters())
    for part in ("adapter", "llm", "regression_head"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in system.parts[part].parameters()), part


def test_regression_weight_scales_the_total():
    system = tiny_stage2("meanpool", text_weight=0.5, regression_weight=2.0)
    losses, _ = system.losses(_batch(system))
    torch.testing.assert_close(losses["loss"], 0.5 * losses["text_loss"] + 2.0 * losses["regression_loss"])


def test_encoder_must_stay_frozen():
    with pytest.raises(ValueError, match="encoder frozen"):
        tiny_stage2(trainable=("encoder", "adapter", "llm", "regression_head"))


def test_head_width_must_match_the_target_space():
    from components.llm.regression_head import RegressionHead
    from emu_lightning.systems.stage2 import Stage2System

    s = tiny_stage2("meanpool")
    with pytest.raises(ValueError, match="needs 64→64"):
        Stage2System(s.encoder, s.adapter, s.llm, regression_head=RegressionHead(64, 32), policy=s.policy)
    with pytest.raises(ValueError, match="pool"):
        c = tiny_stage2("cformer")
        Stage2System(c.encoder, c.adapter, c.llm, regression_head=RegressionHead(64, 64), policy=c.policy,
                     target_space="pooled")


def test_stage1_handoff_loads_every_shared_part_and_leaves_the_head_fresh(tmp_path):
    stage1 = tiny_stage1("meanpool")
    torch.save({"state_dict": stage1.state_dict(), "epoch": 0}, tmp_path / "s1.ckpt")
    stage2 = tiny_stage2("meanpool", init_from=str(tmp_path / "s1.ckpt"))
    head_before = stage2.regression_head.proj.weight.clone()
    stage2.setup("fit")
    report = stage2.handoff_report
    assert set(report.loaded) == {"encoder", "adapter", "llm"} and report.fresh == ["regression_head"]
    for name in report.loaded:
        for (k, a), b in zip(stage1.parts[name].state_dict().items(), stage2.parts[name].state_dict().values()):
            assert torch.equal(a, b), f"{name}.{k}"
    assert torch.equal(stage2.regression_head.proj.weight, head_before)
    assert "regression_head" in str(report) and "fresh" in str(report)


def test_handoff_from_the_other_adapter_names_the_part(tmp_path):
    torch.save(tiny_stage1("cformer").state_dict(), tmp_path / "s1.pt")
    stage2 = tiny_stage2("meanpool", init_from=str(tmp_path / "s1.pt"))
    with pytest.raises(ValueError, match="part 'adapter'.*missing keys"):
        stage2.setup("fit")


def test_handoff_with_an_unknown_prefix_lists_the_checkpoint_prefixes(tmp_path):
    torch.save(tiny_stage1("meanpool").state_dict(), tmp_path / "s1.pt")
    stage2 = tiny_stage2("meanpool", init_from=str(tmp_path / "s1.pt"), handoff={"llm": "decoder.lm"})
    with pytest.raises(ValueError, match=r"s1\.pt is a plain state dict with parts \['adapter', 'encoder', 'llm'\]; "
                                         r"this recipe \(Stage2System\) needs \['decoder.lm'\].*no keys under"):
        stage2.setup("fit")


def _prompts():
    return [[("image", _img(0)), ("text", "then a blue square appears.")],
            [("text", "a red circle.")],                                   # shorter: left padding matters
            [("video", [_img(1), _img(2)]), ("text", "it moves.")]]


@pytest.mark.parametrize("adapter", SPACES)
def test_kv_cached_generation_equals_the_full_recompute_loop(adapter):
    system = tiny_stage2(adapter).eval()
    cached = system.generate_image_embeddings(_prompts(), use_cache=True)
    reference = system.generate_image_embeddings(_prompts(), use_cache=False)
    assert cached.shape == (3, system.num_image_tokens, system.regression_head.out_dim)
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-4)
    # Each row is generated as if alone: padding does not leak into a shorter prompt.
    alone = system.generate_image_embeddings(_prompts()[1:2])
    torch.testing.assert_close(cached[1:2], alone, atol=1e-5, rtol=1e-4)


def test_feedback_is_project_up_of_the_prediction_for_emu2():
    system = tiny_stage2("meanpool")
    pred = torch.randn(2, 64)
    torch.testing.assert_close(system.feedback(pred), system.adapter.project_up(pred))
    emu1 = tiny_stage2("cformer")
    assert emu1.feedback(pred) is pred


def test_greedy_text_generation_with_an_image_in_the_prompt_matches_a_manual_loop():
    system = tiny_stage2("meanpool").eval()
    prompt = [("image", _img(0)), ("text", "a red")]
    got = system.generate_text([prompt], max_new_tokens=6)[0]
    embeds, mask = system._prompt([prompt], [])
    new = []
    with torch.no_grad():
        for _ in range(6):  # argmax of a full forward each step: no cache, no HF generate
            hidden, _ = system.llm(embeds, mask)
            token = int(system.llm.logits(hidden[:, -1]).argmax(-1))
            if token in (system.ids.eos, system.ids.img):
                break
            new.append(token)
            embeds = torch.cat([embeds, system.llm.embed(torch.tensor([[token]]))], dim=1)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
    assert got == system.tokenizer.decode(new, skip_special_tokens=True).strip()
