"""Token spellings, a data-layout preset: the platform's grounding tokens, or the Emu2 release's own.

The platform writes a grounded phrase as `<p>phrase</p><coor><loc x1><loc y1><loc x2><loc y2></coor>`, each
coordinate one of 225 bins (`grounding.py`). A converted Emu2 has those tokens only as appended rows (the mean of
the released rows, docs/converting.md), while the release trained rows of its own for grounding
(baaivision/Emu 13c395e, `Emu2/emu/constants.py` L25-30 and `Emu2/emu/lm.py` L12-27 `add_location_symbols(
quantized_size=256)`): `<phrase>` `</phrase>` `<object>` `</object>` and `<patch_index_0000>` … `<patch_index_0256>`.
`spelling="emu2"` writes the platform's grounding with those tokens, so a converted Emu2 running in its release layout
trains and generates on its released rows:

    <p> → <phrase>    </p> → </phrase>    <coor> → <object>    </coor> → </object>
    <loc b> (b in 0..224) → <patch_index_{round(b · 256 / 224):04d}>   (the same coordinate on a 0..256 grid)

What the release pins and what it does not: the token strings and ids are the release's (`tokenizer.py` in the
converter checks every id). The release publishes no code that writes a box with them (Emu2-Gen's pipeline puts a
box *image* between `<object>` and `</object>`, `Emu2/README.md` L466-482), so four patch indexes per box, one per
coordinate x1 y1 x2 y2 on 0..256, is our reading of its 257 = quantized_size + 1 tokens [ours]. The rest of the
release's layout is already the platform's: `<grounding>`, `[VIDEO]`, `[USER]` and `[ASSISTANT]` have the same
strings, so a converted model's tokenizer gives them their released ids in either spelling.

Video frames: the release feeds each frame at `[IMG]` + `[gIMG]`×v_query + `[/IMG]` (its `[gIMG]` borrowed as the
frame placeholder, `Emu2/emu/emu.py` L64-65) and images at `<image>` (L62). In `spelling="emu2"`
the collator (`sequence.py`) writes each frame of a video as `[IMG]` + `[gIMG]`×N + `[/IMG]`, so the frames' visual
embeddings land in `[gIMG]` rows; images (storyboard frames included, which are image segments) stay at `<image>`.
The model takes both ids as placeholders wherever its tokenizer has `[gIMG]` (`SpecialIds.visual`,
`components/multimodal.py`): scatter, regression and feedback treat a `[gIMG]` run as one image, in reading order.
N is the adapter's one token count for images and frames alike, where the release pools frames to their own
`v_query` (64 for Emu2-Chat against 256 per image, `Emu2/emu/chat.py` L222) [ours]. The platform spelling writes
every frame at `<image>`, as before.
"""
from __future__ import annotations

import re

from emu_lightning.data.layout.grounding import NUM_BINS

SPELLINGS = ("platform", "emu2")
EMU2_BINS = 256                                                   # add_location_symbols(quantized_size=256)
_EMU2_TAGS = {"<p>": "<phrase>", "</p>": "</phrase>", "<coor>": "<object>", "</coor>": "</object>"}
_PLATFORM = re.compile(r"</?p>|</?coor>|<loc(\d{3})>")


def emu2_index(bin_: int) -> str:
    """The release's token for platform bin `bin_` (0..224): the nearest of its 257 coordinates."""
    return f"<patch_index_{round(bin_ * EMU2_BINS / NUM_BINS):04d}>"


def respell(text: str, spelling: str = "platform") -> str:
    """`text` with the platform's grounding tokens written in `spelling` (`SPELLINGS`); "platform" returns it as is."""
    if spelling == "platform":
        return text
    if spelling != "emu2":
        raise ValueError(f"spelling {spelling!r} is not one of {SPELLINGS}")
    return _PLATFORM.sub(lambda m: emu2_index(int(m[1])) if m[1] else _EMU2_TAGS[m[0]], text)


def spelling_tokens(spelling: str) -> list[str]:
    """The grounding tokens text in `spelling` is written with (besides `<grounding>`, which both share)."""
    if spelling == "platform":
        return ["<p>", "</p>", "<coor>", "</coor>", *[f"<loc{b:03d}>" for b in range(NUM_BINS + 1)]]
    if spelling == "emu2":
        return [*_EMU2_TAGS.values(), *[f"<patch_index_{i:04d}>" for i in range(EMU2_BINS + 1)]]
    raise ValueError(f"spelling {spelling!r} is not one of {SPELLINGS}")
