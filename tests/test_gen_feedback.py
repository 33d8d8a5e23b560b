"""GenSystem's `self_feedback` (scheduled sampling for N-step embedding generation): which input rows it replaces,
with what, and that targets and p = 0 stay the papers' teacher forcing."""
from __future__ import annotations

import pytest
import torch

from emu_lightning.data.layout.sequence import Layout, SequenceCollator
from emu_lightning.data.synthetic.instruct import SyntheticGen
from emu_lightning.systems.instruct import GenSystem
from emu_lightning.systems.policy import StagePolicy
from tests.helpers import IMAGE_SIZE, LlamaLM, tiny_adapter, tiny_encoder


def tiny_gen(adapter: str = "meanpool", **kwargs) -> GenSystem:
    from components.llm.regression_head import RegressionHead

    parts = ("adapter", "llm", "regression_head")
    llm = LlamaLM(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vocab_size=128)
    space = "pooled" if adapter == "meanpool" else "adapter"
    return GenSystem(tiny_encoder(), tiny_adapter(adapter), llm, policy=StagePolicy(list(parts), {p: 1e-3 for p in parts}),
                     regression_head=RegressionHead(64, 64), target_space=space, **kwargs)


def gen_batch(system: GenSystem, n: int = 3) -> dict:
    from emu_lightning.data.modules.captions import image_transform

    t, layout = image_transform(IMAGE_SIZE), Layout("gen", train=False)
    data = SyntheticGen("train", size=n, image_size=IMAGE_SIZE, grounded_p=1.0, subject_p=0.0)
    docs = []
    for i in range(n):
        segs = layout({**data[i], "image": t(data[i]["image"])})
        docs.append({"id": i, "source": "gen", "segments": segs, "regress": segs.regress})
    return SequenceCollator(system.tokenizer, system.num_image_tokens, 512)(docs)


@pytest.mark.parametrize("adapter", ["meanpool", "cformer"])
def test_fed_back_rows_are_the_feedback_of_the_predictions_and_targets_stay_true(adapter):
    torch.manual_seed(0)
    system = tiny_gen(adapter)
    batch = gen_batch(system)
    captured = {}
    original = system.llm.forward

    def spy(embeds, mask, *a, **k):
        captured.setdefault("inputs", []).append(embeds.detach().clone())
        return original(embeds, mask, *a, **k)

    system.llm.forward = spy
    _, (_, _, pos, pred, target) = system._forward(batch)                  # teacher forcing
    own_pred = torch.randn_like(pred)
    chosen = torch.zeros(len(pred), dtype=torch.bool)
    chosen[::2] = True
    _, (_, _, pos2, _, target2) = system._forward(batch, (own_pred, chosen))
    clean, fed = captured["inputs"]
    ids = batch["input_ids"]
    rows, cols = pos.nonzero()[:, 0], pos.nonzero()[:, 1] + 1
    image = ids[rows, cols] == system.ids.image
    # Emu2: every regressed position predicts an <image>; Emu1 also predicts [/IMG], which is never fed back.
    n = system.num_image_tokens
    assert int(image.sum()) == 3 * n and len(pos.nonzero()) == 3 * (n if adapter == "meanpool" else n + 1)
    chosen = chosen & image
    changed = (fed != clean).any(-1)                                        # (B,T) rows that differ
    assert set(map(tuple, changed.nonzero().tolist())) == set(zip(rows[chosen].tolist(), cols[chosen].tolist()))
    assert (ids[changed] == system.ids.image).all()                         # only <image> rows ever change
    torch.testing.assert_close(fed[rows[chosen], cols[chosen]], system.feedback(own_pred[chosen]))
    torch.testing.assert_close(fed[rows[~chosen], cols[~chosen]], clean[rows[~chosen], cols[~chosen]])
    untouched = torch.ones(fed.shape[:2], dtype=torch.bool)
    untouched[rows[chosen], cols[chosen]] = False
    torch.testing.assert_close(fed[untouched], clean[untouched])            # text, [IMG], unchosen rows
    assert torch.equal(pos, pos2)
    torch.testing.assert_close(target2, target)                             # targets: the true image, always


def test_self_feedback_runs_two_passes_in_training_only_and_zero_is_teacher_forcing():
    torch.manual_seed(0)
    system = tiny_gen(self_feedback=1.0)
    batch = gen_batch(system)
    calls = []
    original = system.llm.forward
    system.llm.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    system.train()
    fed_loss = system.loss_terms(batch)["regression_loss"]
    assert len(calls) == 2 and torch.isfinite(fed_loss)
    fed_loss.backward()                                                      # gradients reach the LLM
    assert system.llm.model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    system.eval()
    calls.clear()
    system.loss_terms(batch)
    assert len(calls) == 1                                                   # evaluation: plain teacher forcing
    system.self_feedback = 0.0
    system.train()
    calls.clear()
    teacher = system.loss_terms(batch)["regression_loss"]
    assert len(calls) == 1 and not torch.isclose(teacher, fed_loss)


def test_self_feedback_must_be_a_probability():
    with pytest.raises(ValueError, match="self_feedback=1.5"):
        tiny_gen(self_feedback=1.5)
