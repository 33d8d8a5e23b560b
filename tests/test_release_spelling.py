"""The `emu2` spelling (emu_lightning/data/layout/spelling.py), a data-layout preset: grounding written with the
Emu2 release's own tokens, so a converted Emu2 trains on its released rows, not on appended mean rows.

Released vocabulary as read in baaivision/Emu 13c395e: `Emu2/emu/constants.py` L25-30 (`<grounding>`, `<phrase>`,
`</phrase>`, `<object>`, `</object>`), `Emu2/emu/lm.py` L12-27 (`<patch_index_0000>` … `<patch_index_0256>`,
`quantized_size=256`) and L53-54 (`[USER]`, `[ASSISTANT]` for the chat model); the converter gives each its released
id (`checkpoints/convert/tokenizer.py`). The same preset writes video frames at the release's `[gIMG]` placeholder
(`Emu2/emu/emu.py` L64-65), and the model writes the frames' embeddings there.
"""
from __future__ import annotations

import pytest
import torch

from emu_lightning.checkpoints.convert.tokenizer import ASSISTANT, EMU2_SPECIALS, USER, released_tokenizer
from emu_lightning.data.layout.grounding import NUM_BINS, grounded, parse_grounded
from emu_lightning.data.layout.sequence import Layout, SequenceCollator
from emu_lightning.data.layout.spelling import EMU2_BINS, respell, spelling_tokens
from emu_lightning.data.layout.tokenizer import load_tokenizer
from emu_lightning.data.layout.tokens import VIDEO, SpecialIds
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


# Video frames in the release's layout. baaivision/Emu 13c395e, `Emu2/emu/emu.py` L62: an image is
# `[IMG]` + `<image>`×n_query + `[/IMG]`; L64-65: a video frame is `[IMG]` + `[gIMG]`×v_query + `[/IMG]`
# (`[gIMG]` borrowed as the frame placeholder), and `generate` (L182, L205-211) writes the frames' embeddings
# into the `[gIMG]` rows.
def _frame(seed: int, size: int = 8) -> torch.Tensor:
    return torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed))


def _video_doc(size: int = 8) -> dict:
    """A 3-frame video sample laid out by the `video` layout (2 frames kept), then an image and text."""
    sample = {"id": "v", "frames": [_frame(i, size) for i in range(3)], "subtitles": ["a cat", "a cat", "a cat runs"]}
    segments = Layout("video", num_frames=2, train=False)(sample)
    return {"id": "v", "source": "videos", "segments": [*segments, ("image", _frame(9, size)), ("text", " end")]}


def test_video_frames_in_the_release_layout_are_written_at_gimg(chat_tokenizer):
    N = 3
    batch = SequenceCollator(chat_tokenizer, N, max_length=128, spelling="emu2")([_video_doc()])
    ids = batch["input_ids"][0].tolist()
    frame = "[IMG]" + "[gIMG]" * N + "[/IMG]"                         # emu.py L65, v_query = N here
    image = "[IMG]" + "<image>" * N + "[/IMG]"                        # emu.py L62: images keep <image>
    text = chat_tokenizer.decode(ids, skip_special_tokens=False)
    assert text == f"<s>[VIDEO]{frame}{frame}a cat a cat runs{image} end</s>"
    gimg = chat_tokenizer.convert_tokens_to_ids("[gIMG]")
    assert gimg == BASE + EMU2_SPECIALS.index("[gIMG]") < ROWS          # the released row
    assert ids.count(gimg) == 2 * N and all(y == -100 for x, y in zip(ids, batch["labels"][0].tolist()) if x == gimg)
    assert len(batch["pixel_values"]) == 3


def test_the_platform_layout_of_a_video_is_unchanged(chat_tokenizer):
    """The default layout writes every frame at `<image>` exactly as before, with or without `[gIMG]` in the
    tokenizer; the release layout differs from it only in the frames' placeholder id."""
    N, doc = 3, _video_doc()

    def before(tok) -> list[int]:                                   # the platform's layout, hand-built
        s = SpecialIds.from_tokenizer(tok)
        text = tok("a cat a cat runs", add_special_tokens=False)["input_ids"]
        end = tok(" end", add_special_tokens=False)["input_ids"]
        block = [s.img, *[s.image] * N, s.img_end]
        return [s.bos, s.video, *block, *block, *text, *block, *end, s.eos]

    for tok in (chat_tokenizer, load_tokenizer()):
        for collate in (SequenceCollator(tok, N, max_length=128), SequenceCollator(tok, N, 128, spelling="platform")):
            assert collate([doc])["input_ids"][0].tolist() == before(tok)
    release = SequenceCollator(chat_tokenizer, N, 128, spelling="emu2")([doc])["input_ids"][0]
    s = SpecialIds.from_tokenizer(chat_tokenizer)
    assert release.masked_fill(release == s.frame, s.image).tolist() == before(chat_tokenizer)
    assert SpecialIds.from_tokenizer(load_tokenizer()).frame is None  # the platform's own tokenizer has no [gIMG]
    with pytest.raises(ValueError, match=r"spelling 'emu2' writes video frames at \[gIMG\], which the tokenizer lacks"):
        SequenceCollator(load_tokenizer(), N, spelling="emu2")


def test_the_model_writes_frame_embeddings_into_the_gimg_rows(chat_tokenizer, tmp_path):
    """A tiny stage-2 system on the converted tokenizer: its scatter puts the frames' visual embeddings at the
    `[gIMG]` rows and the image's at `<image>` (hand-built expectation), regression covers the frames as before, and
    the platform layout of the same document gets the same embeddings."""
    from tests.helpers import IMAGE_SIZE, tiny_stage2

    chat_tokenizer.save_pretrained(str(tmp_path / "tok"))
    system = tiny_stage2("meanpool", tokenizer=str(tmp_path / "tok"))
    s, N = system.ids, system.num_image_tokens
    assert s.visual == (s.image, s.frame) and s.frame == chat_tokenizer.convert_tokens_to_ids("[gIMG]")
    doc = _video_doc(IMAGE_SIZE)
    batch = SequenceCollator(system.tokenizer, N, 128, spelling="emu2")([doc])
    ids = batch["input_ids"]
    torch.manual_seed(0)
    visual = torch.randn(3, N, system.llm.hidden_dim)                 # frame 0, frame 1, the image
    with torch.no_grad():
        embeds = system.embed_multimodal(ids, visual)
        expected = system.llm.embed(ids).clone()
    n_text = len(system.tokenizer("a cat a cat runs", add_special_tokens=False)["input_ids"])
    f0, f1 = 3, 3 + N + 2                                      # <s> [VIDEO] [IMG] | [gIMG]×N [/IMG] [IMG] | …
    im = f1 + N + 1 + n_text + 1                                       # … [/IMG] text [IMG] | <image>×N
    expected[0, f0:f0 + N], expected[0, f1:f1 + N], expected[0, im:im + N] = visual[0], visual[1], visual[2]
    assert (ids[0, f0:f0 + N] == s.frame).all() and (ids[0, f1:f1 + N] == s.frame).all()
    assert (ids[0, im:im + N] == s.image).all()
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    platform = SequenceCollator(system.tokenizer, N, 128)([doc])["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(system.embed_multimodal(platform, visual)[ids != s.frame], embeds[ids != s.frame])
        torch.testing.assert_close(system.embed_multimodal(platform, visual), embeds, rtol=0, atol=0)
        # Regression (Emu2: [IMG] and the placeholders before the last predict each placeholder) covers the frames.
        feats = system.encoder(batch["pixel_values"])
        vis = system.adapter(feats)
        rows, target = system.regression_pairs(ids, system.embed_multimodal(ids, vis), feats, vis,
                                               batch["regress_images"])
        rows_p, target_p = system.regression_pairs(platform, system.embed_multimodal(platform, vis), feats, vis,
                                                   batch["regress_images"])
    assert int(rows.sum()) == 3 * N and torch.equal(rows, rows_p) and torch.equal(target, target_p)
    assert (ids[rows] == s.frame).sum() == 2 * N and (ids[rows] == s.image).sum() == N
