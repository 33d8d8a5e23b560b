"""The per-token flow-matching sampler (components/heads/flow.py) and heads that sample with it: it learns a
two-mode conditional distribution that ℓ2 regression collapses to its mean, its loss reaches the LLM, queries
generation samples from one forward pass, and its weights travel with checkpoints and exports."""
from __future__ import annotations

import pytest
import torch

from components.heads import AutoregressiveHead, FlowSampler, QueryHead
from tests.helpers import tiny_stage2
from tests.test_stage2 import _batch, _prompts

FLOW = {"width": 32, "depth": 2, "steps": 8, "repeat": 2}


def test_sampler_starts_at_zero_velocity_and_refuses_bad_settings():
    torch.manual_seed(0)
    s = FlowSampler(dim=3, cond_dim=5, width=16, depth=2)
    v = s.velocity(torch.randn(7, 3), torch.rand(7), torch.randn(7, 5))
    assert v.shape == (7, 3) and torch.equal(v, torch.zeros(7, 3))      # zero-initialised output and modulations
    assert s.sample(torch.randn(2, 4, 5)).shape == (2, 4, 3)
    for bad in ({"depth": 0}, {"steps": 0}, {"repeat": 0}, {"temperature": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FlowSampler(3, 5, **bad)


def test_sampler_learns_two_modes_that_regression_averages_away():
    # Condition 0: the target is +1 or -1 (equally likely) in every dim; condition 1: always +2. The ℓ2-optimal
    # prediction for condition 0 is 0, which is never a target; the sampler must draw near ±1 instead.
    torch.manual_seed(0)
    s = FlowSampler(dim=2, cond_dim=2, width=64, depth=2, steps=20, repeat=4)
    opt = torch.optim.Adam(s.parameters(), lr=3e-3)
    for _ in range(600):
        which = torch.randint(0, 2, (128,))
        cond = torch.nn.functional.one_hot(which, 2).float()
        sign = torch.randint(0, 2, (128, 1)).float() * 2 - 1
        target = torch.where(which[:, None] == 0, sign.expand(-1, 2), torch.full((128, 2), 2.0))
        loss = s.loss(cond, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = torch.Generator().manual_seed(1)
    x0 = s.sample(torch.tensor([[1.0, 0.0]]).repeat(400, 1), generator=g)       # (400,2)
    x1 = s.sample(torch.tensor([[0.0, 1.0]]).repeat(400, 1), generator=g)
    assert (x0.abs() - 1).abs().mean() < 0.3, x0.abs().mean()                 # near ±1, not near the mean 0
    assert 0.3 < (x0[:, 0] > 0).float().mean() < 0.7                          # both modes drawn
    assert (x1 - 2).abs().mean() < 0.3


def test_head_loss_adds_the_flow_term_and_trains_the_llm_through_it():
    system = tiny_stage2("meanpool", head=QueryHead(64, 64, num_tokens=4, whiten=True, flow=FLOW))
    head = system.regression_head
    batch = _batch(system)
    feats = system.encoder(batch["pixel_values"])
    head.fit_whitening(system.adapter.pool(feats).flatten(0, 1))
    out, (_, _, _, pred, target) = system._forward(batch)
    assert float(out["flow_loss"]) > 0
    torch.testing.assert_close(out["regression_loss"].detach(), out["regression_mse"] + out["flow_loss"])
    # Only the flow term: its gradient reaches the sampler and the LLM (the hidden state is its condition; at
    # initialisation the zero-initialised output layer and modulations pass none back, so give them weights first).
    for name, p in head.flow.named_parameters():
        if "modulation" in name or name.startswith("out."):
            torch.nn.init.normal_(p, std=0.1)
    system.zero_grad()
    hidden = torch.randn(len(target), 64, requires_grad=True)
    head.flow.loss(hidden, target).backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert head.flow.out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown keys.*'widht'"):
        QueryHead(64, 64, num_tokens=4, flow={"widht": 8})


def test_queries_flow_generation_samples_from_one_forward_pass():
    system = tiny_stage2("meanpool", head=QueryHead(64, 64, num_tokens=4, flow=FLOW)).eval()
    head, N = system.regression_head, system.num_image_tokens
    torch.nn.init.normal_(head.flow.out.weight, std=0.5)                      # a sampler whose draws vary
    torch.manual_seed(3)
    got = system.generate_image_embeddings(_prompts())                        # (3,N,D)
    # The reference: the queries' hidden states from one full forward of each prompt, then the sampler with the
    # same noise (the batch draws its noise for all (B·N) rows at once, in row-major order).
    hidden = []
    for prompt in _prompts():
        embeds, mask = system._prompt([prompt], [system.ids.img])
        with torch.no_grad():
            h, _ = system.llm(torch.cat([embeds, head.queries[None]], 1), torch.ones(1, embeds.shape[1] + N))
        hidden.append(h[:, -N:])
    torch.manual_seed(3)
    ref = head.flow.sample(torch.cat(hidden))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.manual_seed(4)
    assert not torch.allclose(system.generate_image_embeddings(_prompts()), got)   # it samples: new noise, new draw
    assert not torch.allclose(got, head.mean(torch.cat(hidden)), atol=1e-3)


def test_autoregressive_flow_feeds_back_samples():
    system = tiny_stage2("meanpool", head=AutoregressiveHead(64, 64, flow=FLOW)).eval()
    torch.nn.init.normal_(system.regression_head.flow.out.weight, std=0.5)
    torch.manual_seed(0)
    a = system.generate_image_embeddings(_prompts()[:2])
    torch.manual_seed(0)
    b = system.generate_image_embeddings(_prompts()[:2], use_cache=False)    # the full-recompute loop, same draws
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.manual_seed(1)
    assert not torch.allclose(system.generate_image_embeddings(_prompts()[:2]), a)   # other noise, other draws


def test_flow_weights_round_trip_through_checkpoint_and_export(tmp_path):
    from emu_lightning.checkpoints.export import export_model
    from emu_lightning.inference.infer import load_exported_system
    from tests.test_export import SPECS

    head = QueryHead(64, 64, num_tokens=4, whiten=True, flow=FLOW)
    system = tiny_stage2("meanpool", head=head)
    head.fit_whitening(torch.randn(50, 64) * 3 + 1)
    torch.nn.init.normal_(head.flow.out.weight, std=0.5)
    assert any(k.startswith("flow.") for k in head.state_dict())
    specs = {**SPECS["meanpool"], "regression_head": {
        "class_path": "components.heads.QueryHead",
        "init_args": {"in_dim": 64, "out_dim": 64, "num_tokens": 4, "whiten": True, "flow": FLOW}}}
    loaded = load_exported_system(export_model(system, tmp_path / "export", specs))
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.regression_head.state_dict()[k], v), k
    system.eval()
    torch.manual_seed(5)
    want = system.generate_image_embeddings(_prompts())
    torch.manual_seed(5)
    torch.testing.assert_close(loaded.generate_image_embeddings(_prompts()), want, rtol=0, atol=1e-5)
