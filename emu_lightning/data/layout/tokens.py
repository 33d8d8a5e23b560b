"""Special tokens of the Emu token layout (docs/design.md §2): the one source of truth for their strings.

Ids are never hard-coded: they depend on the tokenizer (a synthetic BPE puts them first, a LLaMA
tokenizer appends them after 32000), so code asks `SpecialIds.from_tokenizer(tok)`.
"""
from __future__ import annotations

from dataclasses import dataclass

BOS, EOS, PAD = "<s>", "</s>", "[PAD]"
IMG, IMG_END, IMAGE = "[IMG]", "[/IMG]", "<image>"
VIDEO = "[VIDEO]"
USER, ASSISTANT = "[USER]", "[ASSISTANT]"
# The Emu2 release's video-frame placeholder (baaivision/Emu 13c395e, `Emu2/emu/emu.py` L64-65): only a converted
# Emu2's tokenizer has it (the release's row); the platform's own tokenizers do not, and write frames at `<image>`.
FRAME = "[gIMG]"
GROUNDING = ["<grounding>", "<p>", "</p>", "<coor>", "</coor>"]
LOCS = [f"<loc{i:03d}>" for i in range(225)]  # grounding bins 0..224 (docs/design.md §2, Grounded)

SPECIAL_TOKENS: list[str] = [BOS, EOS, PAD, IMG, IMG_END, IMAGE, VIDEO, USER, ASSISTANT, *GROUNDING, *LOCS]


@dataclass(frozen=True)
class SpecialIds:
    """Token ids of the special tokens in one tokenizer."""

    bos: int
    eos: int
    pad: int
    img: int
    img_end: int
    image: int
    video: int
    frame: int | None = None   # `[gIMG]`, where the tokenizer has it (a converted Emu2's); else None

    @property
    def visual(self) -> int | tuple[int, int]:
        """The placeholder id(s) whose rows receive visual embeddings: `<image>`, and `[gIMG]` where the tokenizer
        has it (video frames in the release's layout, `spelling.py`)."""
        return self.image if self.frame is None else (self.image, self.frame)

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialIds:
        ids = {name: tok.convert_tokens_to_ids(s) for name, s in
               dict(bos=BOS, eos=EOS, pad=PAD, img=IMG, img_end=IMG_END, image=IMAGE, video=VIDEO).items()}
        missing = [name for name, i in ids.items() if i is None or i == tok.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}; load it with emu_lightning.data.layout.tokenizer")
        frame = tok.convert_tokens_to_ids(FRAME) if FRAME in tok.get_vocab() else None
        return cls(**ids, frame=frame)
