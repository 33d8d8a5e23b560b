"""Generation heads (components/heads): loss positions decoded position by position, the queries loop against a
full-forward reference, noise augmentation, objectives, target whitening through checkpoint and export, and the
start-up refusals."""
from __future__ import annotations

import pytest
import torch

from components.heads import AutoregressiveHead, QueryHead
from components.losses.regression import regression_loss
from tests.helpers import tiny_stage2
from tests.test_stage2 import _batch, _img, _prompts


def _queries(system_kwargs=None, **head):
    return tiny_stage2("meanpool", head=QueryHead(64, 64, num_tokens=4, **head), **(system_kwargs or {}))


def _pieces(system, batch):
    feats = system.encoder(batch["pixel_values"])
    visual = system.adapter(feats)
    embeds = system.embed_multimodal(batch["input_ids"], visual)
    rows, target = system.regression_pairs(batch["input_ids"], embeds, feats, visual, batch["regress_images"])
    return feats, embeds, rows, target


def test_queries_regress_their_own_rows_and_read_images_that_open_a_document():
    system = _queries()
    batch, ids, N = _batch(system), system.ids, system.num_image_tokens
    x = batch["input_ids"]
    feats, embeds, rows, target = _pieces(system, batch)
    pos = system.regression_head.predicting(rows)
    assert torch.equal(pos, rows) and (x[pos] == ids.image).all()
    # Images in reading order: pair image-first (opens its document: read), pair text-first, doc image 1 (opens:
    # read), doc image 2, video frames 1-2 (the video opens its document after [VIDEO], so they are regressed).
    per_row = pos.sum(1).tolist()
    assert per_row == [0, N, N, 2 * N], per_row
    regressed = torch.tensor([False, True, False, True, True, True])
    torch.testing.assert_close(target, system.adapter.pool(feats)[regressed].reshape(-1, feats.shape[-1]))
    # The LLM reads the queries at those rows, the true image everywhere else.
    inputs = system.regression_head.read_inputs(embeds, rows, training=True)
    q = system.regression_head.queries
    assert torch.equal(inputs[rows], q.repeat(int(rows.sum()) // N, 1))
    assert torch.equal(inputs[~rows], embeds[~rows])


def test_queries_generation_equals_one_full_forward_and_ignores_padding():
    system = _queries().eval()
    got = system.generate_image_embeddings(_prompts())                      # (3,N,D_tgt)
    N, head = system.num_image_tokens, system.regression_head
    for i, prompt in enumerate(_prompts()):                                # each prompt alone, no padding, by hand
        embeds, mask = system._prompt([prompt], [system.ids.img])
        with torch.no_grad():
            hidden, _ = system.llm(torch.cat([embeds, head.queries[None]], 1), torch.ones(1, embeds.shape[1] + N))
            ref = head.proj(hidden[:, -N:])
        torch.testing.assert_close(got[i:i + 1], ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got[0], got[1])


def test_queries_training_loss_is_what_generation_would_score():
    # A text-first pair: teacher-forced training predictions are exactly the generated ones (nothing is fed back).
    system = _queries().eval()
    docs = [{"id": "p", "source": "pairs", "segments": [("text", "a blue square."), ("image", _img(1))]}]
    from emu_lightning.data.layout.sequence import SequenceCollator

    batch = SequenceCollator(system.tokenizer, system.num_image_tokens, max_length=64)(docs)
    with torch.no_grad():
        _, (_, _, _, pred, target) = system._forward(batch)
    generated = system.generate_image_embeddings([[("text", "a blue square.")]])[0]
    torch.testing.assert_close(pred, generated, atol=1e-5, rtol=1e-4)


def test_noise_augmentation_perturbs_regressed_image_rows_in_training_only():
    torch.manual_seed(0)
    head = AutoregressiveHead(64, 64, noise_max=0.5)
    system = tiny_stage2("meanpool", head=head)
    batch = _batch(system)
    _, embeds, rows, _ = _pieces(system, batch)
    noisy = head.read_inputs(embeds, rows, training=True)
    changed = (noisy != embeds).any(-1)
    assert torch.equal(changed, rows)                                      # exactly the regressed <image> rows
    assert torch.equal(head.read_inputs(embeds, rows, training=False), embeds)
    assert torch.equal(AutoregressiveHead(64, 64).read_inputs(embeds, rows, training=True), embeds)
    # One σ per image: within an image the relative perturbation has one scale, different across images.
    rel = ((noisy - embeds)[rows].norm(dim=-1) / embeds[rows].norm(dim=-1)).view(-1, system.num_image_tokens)
    assert (rel.std(1) < rel.mean(1)).all() and rel.mean(1).std() > 0


def test_inference_noise_changes_generation_and_zero_noise_is_the_papers_loop():
    system = tiny_stage2("meanpool").eval()
    plain = system.generate_image_embeddings(_prompts())
    system.regression_head.noise_inference = 0.5
    torch.manual_seed(0)
    noisy = system.generate_image_embeddings(_prompts())
    torch.testing.assert_close(noisy[:, 0], plain[:, 0])                   # the first is read at [IMG]: no feedback
    assert not torch.allclose(noisy[:, 1:], plain[:, 1:])


@pytest.mark.parametrize("objective", ["mse", "cosine", "mse+cosine"])
def test_objectives(objective):
    pred, target = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8)
    out = regression_loss(pred, target, objective)
    mse = ((pred - target) ** 2).mean()
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=-1).mean()
    want = {"mse": mse, "cosine": 1 - cos, "mse+cosine": mse + 1 - cos}[objective]
    torch.testing.assert_close(out["regression_loss"], want)
    torch.testing.assert_close(out["regression_mse"], mse.detach())
    out["regression_loss"].backward()
    assert pred.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="'l1'"):
        regression_loss(pred, target, "l1")


def test_collapse_readings_are_logged_terms():
    system = tiny_stage2("meanpool")
    losses, _ = system.losses(_batch(system))
    for k in ("pred_norm", "target_norm", "pred_var", "target_var", "regression_mse"):
        assert k in losses and torch.isfinite(losses[k])
    torch.testing.assert_close(losses["loss"], losses["text_loss"] + losses["regression_loss"])


def test_whitening_regresses_standardised_targets_and_generation_undoes_it():
    head = QueryHead(64, 64, num_tokens=4, whiten=True)
    system = tiny_stage2("meanpool", head=head)
    assert not head.whitening_ready
    batch = _batch(system)
    feats, _, _, target = _pieces(system, batch)
    head.fit_whitening(target)
    assert head.whitening_ready and int(head.whiten_samples) == len(target)
    z = head.normalize(target)
    torch.testing.assert_close(z.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(64), atol=1e-4, rtol=0)
    torch.testing.assert_close(head.denormalize(z), target, atol=1e-5, rtol=1e-5)
    h = torch.randn(3, 64)
    torch.testing.assert_close(head(h), head.proj(h) * head.target_std + head.target_mean)
    _, (_, _, _, pred, norm_target) = system._forward(batch)
    torch.testing.assert_close(norm_target, z)


def test_whitening_round_trips_through_checkpoint_and_export(tmp_path):
    from emu_lightning.checkpoints.export import export_model, load_exported

    head = QueryHead(64, 64, num_tokens=4, whiten=True)
    system = tiny_stage2("meanpool", head=head)
    head.fit_whitening(torch.randn(50, 64) * 3 + 1)
    torch.save({"state_dict": system.state_dict()}, tmp_path / "a.ckpt")
    fresh = tiny_stage2("meanpool", head=QueryHead(64, 64, num_tokens=4, whiten=True))
    fresh.load_state_dict(torch.load(tmp_path / "a.ckpt")["state_dict"])
    for k in ("target_mean", "target_std", "whiten_samples"):
        assert torch.equal(getattr(fresh.regression_head, k), getattr(head, k)), k
    from tests.test_export import SPECS

    specs = {**SPECS["meanpool"], "regression_head": {
        "class_path": "components.heads.QueryHead",
        "init_args": {"in_dim": 64, "out_dim": 64, "num_tokens": 4, "whiten": True}}}
    folder = export_model(system, tmp_path / "export", specs)
    from emu_lightning.inference.infer import load_exported_system

    loaded = load_exported_system(folder)
    assert isinstance(loaded.regression_head, QueryHead)
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.regression_head.state_dict()[k], v), k
    system.eval()
    torch.testing.assert_close(loaded.generate_image_embeddings(_prompts()), system.generate_image_embeddings(_prompts()),
                               rtol=0, atol=1e-6)


def test_whitening_is_estimated_at_fit_start_and_kept_on_resume():
    import types

    from tests.helpers import tiny_stage2_datamodule

    system = _queries(whiten=True)
    dm = tiny_stage2_datamodule(system, num_workers=0)
    dm.setup("fit")
    system.whiten_batches = 2
    system._trainer = types.SimpleNamespace(datamodule=dm, logger=None, log_dir=None, is_global_zero=True)
    system.fit_whitening()
    head = system.regression_head
    assert head.whitening_ready and int(head.whiten_samples) > 2 and (head.target_std != 1).all()


def test_refusals_name_both_sides():
    from emu_lightning.systems.instruct import GenSystem
    from emu_lightning.systems.stage2 import Stage2System

    s = tiny_stage2("meanpool")
    with pytest.raises(ValueError, match=r"num_tokens=9 queries but the adapter.*gives 4"):
        Stage2System(s.encoder, s.adapter, s.llm, regression_head=QueryHead(64, 64, num_tokens=9), policy=s.policy)
    with pytest.raises(ValueError, match="needs 64→64"):
        Stage2System(s.encoder, s.adapter, s.llm, regression_head=QueryHead(64, 32, num_tokens=4), policy=s.policy)
    with pytest.raises(ValueError, match="objective='l2'"):
        Stage2System(s.encoder, s.adapter, s.llm, regression_head=AutoregressiveHead(64, 64), policy=s.policy,
                     objective="l2")
    c = tiny_stage2("cformer")
    with pytest.raises(ValueError, match="whiten.*target_space='adapter'"):
        Stage2System(c.encoder, c.adapter, c.llm, regression_head=AutoregressiveHead(64, 64, whiten=True),
                     policy=c.policy, target_space="adapter")
    with pytest.raises(ValueError, match="self_feedback=0.5.*QueryHead feeds nothing back"):
        GenSystem(s.encoder, s.adapter, s.llm, regression_head=QueryHead(64, 64, num_tokens=4), policy=s.policy,
                  self_feedback=0.5)
    with pytest.raises(ValueError, match="noise levels"):
        AutoregressiveHead(64, 64, noise_max=-1.0)


def test_no_regressed_position_gives_a_zero_loss_and_no_readings():
    pred = torch.zeros(0, 8, requires_grad=True)
    out = regression_loss(pred, torch.zeros(0, 8), "mse+cosine")
    assert set(out) == {"regression_loss"} and out["regression_loss"].item() == 0.0
    out["regression_loss"].backward()          # still part of the graph
    # A queries model evaluated on image-first pairs regresses nothing there: no regression_cos of 0 is logged.
    system = _queries().eval()
    from emu_lightning.data.layout.sequence import SequenceCollator

    docs = [{"id": "p", "source": "pairs", "segments": [("image", _img(1)), ("text", "a blue square.")]}]
    losses, _ = system.losses(SequenceCollator(system.tokenizer, system.num_image_tokens, max_length=64)(docs))
    assert "regression_cos" not in losses and losses["regression_loss"].item() == 0.0
