"""Packing: several documents per row with per-document attention give the losses (CE and regression,
both target spaces) and gradients of the same documents unpacked, one per row."""
from __future__ import annotations

import pytest
import torch

from emu_lightning.data.layout.packing import PackingCollator
from emu_lightning.data.layout.sequence import SequenceCollator
from tests.helpers import IMAGE_SIZE, tiny_stage2


def _img(seed: int) -> torch.Tensor:
    return torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _docs() -> list[dict]:
    words = ["a red circle.", "two blue squares on the left.", "a big green triangle.", "it moves up and away."]
    pair = lambda i: [("image", _img(i)), ("text", words[i % 4])][::1 - 2 * (i % 2)]  # noqa: E731  odd: text first
    docs = [{"id": f"pair{i}", "source": "pairs", "segments": pair(i)} for i in range(5)]
    docs.append({"id": "doc", "source": "documents", "regress": "last",
                 "segments": [("image", _img(10)), ("text", "then it moves."), ("image", _img(11)), ("text", "end.")]})
    docs.append({"id": "text", "source": "documents", "segments": [("text", "only words here, no image.")]})
    return docs


@pytest.mark.parametrize("adapter", ["meanpool", "cformer"])   # Emu2 pooled targets; Emu1 adapter space + [/IMG]
def test_packed_losses_equal_unpacked(adapter):
    system = tiny_stage2(adapter)
    collate = SequenceCollator(system.tokenizer, system.num_image_tokens, max_length=40)
    unpacked = collate(_docs())
    packed = PackingCollator(collate, max_length=96)(_docs())
    assert len(packed["input_ids"]) < len(unpacked["input_ids"]) == 7          # it packed
    assert int(packed["attention_mask"].max()) >= 3                             # up to 3+ documents in one row
    assert packed["input_ids"].numel() < unpacked["input_ids"].numel()
    assert [sorted(x) for x in [sum(packed["ids"], [])]] == [sorted(unpacked["ids"])]

    grads = []
    for batch in (unpacked, packed):
        system.zero_grad()
        terms = system.loss_terms(batch)
        terms["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in system.named_parameters() if p.grad is not None})
        grads.append(terms)
    g_unpacked, t_unpacked, g_packed, t_packed = grads
    for key in ("text_loss", "regression_loss", "loss"):
        torch.testing.assert_close(t_packed[key], t_unpacked[key], rtol=1e-5, atol=1e-6, msg=key)
    assert g_packed.keys() == g_unpacked.keys() and g_packed
    for name in g_packed:
        torch.testing.assert_close(g_packed[name], g_unpacked[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_documents_do_not_see_each_other():
    # The second document's hidden states are the same whatever the first one says.
    system = tiny_stage2("meanpool")
    collate = PackingCollator(SequenceCollator(system.tokenizer, system.num_image_tokens, max_length=40), 96)
    a = [{"id": "x", "source": "s", "segments": [("text", "one thing.")]},
         {"id": "y", "source": "s", "segments": [("image", _img(0)), ("text", "the same tail.")]}]
    b = [{**a[0], "segments": [("text", "quite another text here.")]}, a[1]]
    hidden = []
    for docs in (a, b):
        batch = collate(docs)
        seg = batch["attention_mask"]
        visual = system.encode_images(batch["pixel_values"])
        h, _ = system.llm(system.embed_multimodal(batch["input_ids"], visual), seg)
        hidden.append(h[seg == 2])
    torch.testing.assert_close(hidden[0], hidden[1], rtol=1e-5, atol=1e-6)


def test_packing_refuses_rows_shorter_than_documents(tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        PackingCollator(SequenceCollator(tokenizer, 4, max_length=64), max_length=32)
