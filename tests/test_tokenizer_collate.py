"""Tokenizer round trip and special ids; stage-1 layout, CE mask and truncation counting."""
from __future__ import annotations

import json

import pytest
import torch

from emu_lightning.data.layout.collate import IGNORE, CaptionCollator
from emu_lightning.data.layout.tokenizer import load_tokenizer
from emu_lightning.data.layout.tokens import SPECIAL_TOKENS, SpecialIds


@pytest.mark.parametrize("text", ["a large red circle at the top left.", "Q: what color? A: blue!", "ünïcode 42"])
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(tokenizer):
    for tok in SPECIAL_TOKENS:
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(tok)], tok
    ids = SpecialIds.from_tokenizer(tokenizer)
    assert len({ids.bos, ids.eos, ids.pad, ids.img, ids.img_end, ids.image}) == 6


def test_synthetic_tokenizer_is_deterministic(tokenizer):
    from emu_lightning.data.layout.tokenizer import _synthetic_tokenizer

    _synthetic_tokenizer.cache_clear()
    again = load_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again is not tokenizer


def test_tokenizer_save_and_load_from_path(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(str(tmp_path / "nope"))


def test_loaded_tokenizer_gets_missing_special_tokens(tokenizer, tmp_path):
    # A tokenizer.json without the Emu specials (like LLaMA's) gets them appended after its vocabulary.
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in SPECIAL_TOKENS[3:]]
    kept = sorted((i, t) for t, i in spec["model"]["vocab"].items() if t not in SPECIAL_TOKENS[3:])
    spec["model"]["vocab"] = {t: new for new, (_, t) in enumerate(kept)}  # dense ids, no holes, like LLaMA's
    spec["added_tokens"] = [{**t, "id": spec["model"]["vocab"][t["content"]]} for t in spec["added_tokens"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    old_max = max(spec["model"]["vocab"].values())
    new_ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS[3:]]
    assert min(new_ids) > old_max  # appended after the vocabulary, like LLaMA's 32000+
    vocab = tok.get_vocab()
    assert len(set(vocab.values())) == len(vocab)  # no id shared by two tokens
    SpecialIds.from_tokenizer(tok)


def _samples(n, caption="a small blue star in the center."):
    return [{"id": str(i), "image": torch.zeros(3, 8, 8), "caption": caption, "captions": [caption]}
            for i in range(n)]


@pytest.mark.parametrize("num_image_tokens", [1, 4, 16])
def test_stage1_layout_and_labels(tokenizer, num_image_tokens):
    ids = SpecialIds.from_tokenizer(tokenizer)
    collate = CaptionCollator(tokenizer, num_image_tokens, max_length=64)
    short, long = "a red square.", "a large red circle at the top left and a small blue star in the center."
    batch = collate(_samples(1, short) + _samples(1, long))
    x, y, m = batch["input_ids"], batch["labels"], batch["attention_mask"]
    N = num_image_tokens
    prompt = [ids.bos, ids.img, *[ids.image] * N, ids.img_end]
    assert x[:, : N + 3].tolist() == [prompt, prompt]
    assert batch["prompt_ids"].tolist() == [prompt, prompt]
    cap = tokenizer(long, add_special_tokens=False)["input_ids"]
    assert x[1, N + 3:].tolist() == cap + [ids.eos]
    # Loss only on the caption and </s>: never <s>, [IMG], <image>, [/IMG] or [PAD].
    assert (y[:, : N + 3] == IGNORE).all()
    assert y[1, N + 3:].tolist() == cap + [ids.eos]
    n_short = len(tokenizer(short, add_special_tokens=False)["input_ids"]) + 1
    assert (y[0, N + 3 + n_short:] == IGNORE).all() and (x[0, N + 3 + n_short:] == ids.pad).all()
    assert m.sum(1).tolist() == [N + 3 + n_short, N + 3 + len(cap) + 1]
    assert batch["num_truncated"].item() == 0


def test_long_caption_is_truncated_and_counted(tokenizer):
    collate = CaptionCollator(tokenizer, num_image_tokens=4, max_length=12)
    ids = SpecialIds.from_tokenizer(tokenizer)
    batch = collate(_samples(3, "a large red circle at the top left and a small blue star in the center."))
    assert batch["input_ids"].shape[1] == 12
    assert batch["num_truncated"].item() == 3
    assert (batch["input_ids"][:, -1] == ids.eos).all()


def test_max_length_without_room_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="max_length=10"):
        CaptionCollator(tokenizer, num_image_tokens=8, max_length=10)
