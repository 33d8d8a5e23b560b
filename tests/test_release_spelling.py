"""The `emu2` spelling (emu_lightning/data/layout/spelling.py), a data-layout preset: grounding written with the
Emu2 release's own tokens, so a converted Emu2 trains on its released rows, not on appended mean rows.

Released vocabulary as read in baaivision/Emu 13c395e: `Emu2/emu/constants.py` L25-30 (`<grounding>`, `<phrase>`,
`</phrase>`, `<object>`, `</object>`), `Emu2/emu/lm.py` L12-27 (`<patch_index_0000>` … `<patch_index_0256>`,
`quantized_size=256`) and L53-54 (`[USER]`, `[ASSISTANT]` for the chat model); the converter gives each its released
id (`checkpoints/convert/tokenizer.py`).
"""
from __future__ import annotations

import pytest

from emu_lightning.checkpoints.convert.tokenizer import ASSISTANT, EMU2_SPECIALS, USER, released_tokenizer
from emu_lightning.data.layout.grounding import NUM_BINS, grounded, parse_grounded
from emu_lightning.data.layout.spelling import EMU2_BINS, respell, spelling_tokens
from emu_lightning.data.layout.tokens import VIDEO
from tests.test_convert_common import base_tokenizer

BASE = 300                                                         # the tiny stand-in LLaMA BPE's tokens
ROWS = BASE + len(EMU2_SPECIALS) + 2                               # Emu2-Chat: + [USER] [ASSISTANT]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """A converted Emu2-Chat's tokenizer: the release's specials at their ids, then the platform's appended."""
    tok, instruct, extra = released_tokenizer(base_tokenizer(tmp_path_factory.mktemp("llama")), EMU2_SPECIALS, ROWS)
    assert instruct and extra > 0
    return tok


def test_emu2_spelling_writes_grounding_with_the_release_tokens():
    text = "two shapes: " + grounded("a red circle", (0.0, 0.25, 0.5, 1.0))
    assert parse_grounded(text)                                     # the platform's own form, parseable
    assert respell(text, "platform") == text
    assert respell(text, "emu2") == ("two shapes: <phrase>a red circle</phrase><object><patch_index_0000>"
                                     "<patch_index_0064><patch_index_0128><patch_index_0256></object>")
    # Every platform bin b (coordinate b / 224) lands on the nearest release coordinate i / 256: within half a step.
    for b in range(NUM_BINS + 1):
        i = int(respell(f"<loc{b:03d}>", "emu2")[len("<patch_index_"):-1])
        assert abs(i / EMU2_BINS - b / NUM_BINS) <= 0.5 / EMU2_BINS
    with pytest.raises(ValueError, match=r"spelling 'kosmos' is not one of \('platform', 'emu2'\)"):
        respell(text, "kosmos")


def test_the_emu2_spelling_uses_released_rows_and_the_platform_spelling_appended_ones(chat_tokenizer):
    ids = chat_tokenizer.convert_tokens_to_ids
    released = spelling_tokens("emu2")
    assert ids(released) == [BASE + EMU2_SPECIALS.index(t) for t in released]          # their released ids
    assert min(ids(spelling_tokens("platform"))) >= ROWS                             # appended after the release
    assert ids([USER, ASSISTANT, VIDEO, "<grounding>"]) == [ROWS - 2, ROWS - 1, BASE + EMU2_SPECIALS.index(VIDEO),
                                                           BASE + EMU2_SPECIALS.index("<grounding>")]


def test_a_grounded_generation_batch_in_emu2_spelling_reads_released_rows_only(chat_tokenizer):
    """Emu2-Gen style items (grounded phrases and boxes, `SyntheticGen`) collated by the datamodule in each spelling:
    in `emu2` every id of the batch is a released row (< ROWS); in `platform` the boxes use appended rows."""
    from emu_lightning.data.modules.multimodal import MultimodalDataModule, _EvalCollate
    from emu_lightning.data.synthetic.instruct import SyntheticGen

    data = SyntheticGen(split="train", size=4, image_size=32, grounded_p=1.0, subject_p=0.0)
    samples = [data[i] for i in range(4)]
    batch, args = {}, dict(train={"gen": data}, val={}, test={}, demos={}, tokenizer=chat_tokenizer,
                           num_image_tokens=4)
    for spelling in ("emu2", "platform"):
        dm = MultimodalDataModule(image_size=32, max_length=512, spelling=spelling, **args)
        assert dm.collator().spelling == spelling
        batch[spelling] = _EvalCollate(dm, dm.layout("gen", train=True))(samples)["input_ids"]
    assert int(batch["emu2"].max()) < ROWS and int(batch["platform"].max()) >= ROWS
    phrase, p = chat_tokenizer.convert_tokens_to_ids(["<phrase>", "<p>"])
    assert (batch["emu2"] == phrase).sum() == (batch["platform"] == p).sum() > 0
    with pytest.raises(ValueError, match="spelling 'release' is not one of"):
        MultimodalDataModule(spelling="release", **args).collator()
