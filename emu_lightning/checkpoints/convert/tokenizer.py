"""The released tokenizers: the LLaMA vocabulary plus each release's special tokens, at the released ids.

The released code adds its specials to the LLaMA tokenizer with `add_special_tokens({pad_token: "[PAD]", ...,
additional_special_tokens: [...]})`, which appends `[PAD]` first and then the list in order (ids from 32000; the
Emu1 source comments `<image>` as 32003, docs/design.md §8). We rebuild exactly that, check every id, then append the
platform's own special tokens that the release lacks (`emu_lightning.data.layout.tokens.SPECIAL_TOKENS`, as
`load_tokenizer` would at run time) so that the converted LLM's vocabulary never changes size after conversion.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from emu_lightning.checkpoints.convert.common import ConversionError
from emu_lightning.data.layout.tokens import BOS, EOS, PAD, SPECIAL_TOKENS

USER, ASSISTANT = "[USER]", "[ASSISTANT]"
# Emu1 (modeling_llama.py LLaMAForClsAndRegression): [PAD], then [IMG] [/IMG] <image> (+ [USER] [ASSISTANT]).
EMU1_SPECIALS = ["[PAD]", "[IMG]", "[/IMG]", "<image>"]
# Emu2 (emu/lm.py EmuForClsAndRegression + constants.py + add_location_symbols(quantized_size=256)).
EMU2_SPECIALS = ["[PAD]", "[IMG]", "[/IMG]", "<image>", "[gIMG]", "[/gIMG]", "[EOC]", "[VIDEO]", "<grounding>",
                 "<phrase>", "</phrase>", "<object>", "</object>", "</delimiter_of_multi_objects/>", "<REC>",
                 *[f"<patch_index_{i:04d}>" for i in range(257)]]


def _load_base(path: str) -> PreTrainedTokenizerFast:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer {path!r} not found (a LLaMA tokenizer folder or tokenizer.json)")
    if p.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(p))
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def released_tokenizer(base: str, specials: list[str], rows: int) -> tuple[PreTrainedTokenizerFast, bool, int]:
    """The released tokenizer for an LLM embedding of `rows` rows, with the platform's tokens appended.

    Args:
        base: the LLaMA tokenizer the release started from (with or without the released specials already).
        specials: the release's added tokens, in order (instruct variants add `[USER]`, `[ASSISTANT]`).
        rows: rows of the released `embed_tokens` (32004 / 32006 for Emu1 / Emu-I, 32272 / 32274 for Emu2 / Chat).

    Returns:
        the tokenizer, whether it is the instruct variant, and how many platform tokens were appended after `rows`.
    """
    tok = _load_base(base)
    vocab = tok.get_vocab()
    appended = {*specials, USER, ASSISTANT, *SPECIAL_TOKENS} - {BOS, EOS}   # all come after the LLaMA vocabulary
    plain = min([vocab[t] for t in appended if t in vocab], default=len(tok))
    added = rows - plain
    if added == len(specials):
        instruct = False
    elif added == len(specials) + 2:
        instruct, specials = True, [*specials, USER, ASSISTANT]
    else:
        raise ConversionError(f"the checkpoint's embedding has {rows} rows but tokenizer {base} has {plain} plain "
                              f"tokens: {added} added rows, expected {len(specials)} (base) or {len(specials) + 2} "
                              f"(instruct: + {USER} {ASSISTANT})")
    for i, token in enumerate(specials):
        want = plain + i
        if token not in tok.get_vocab():
            if len(tok) != want:
                raise ConversionError(f"cannot give {token!r} its released id {want}: the tokenizer has "
                                      f"{len(tok)} tokens")
            tok.add_tokens([token], special_tokens=True)
        got = tok.convert_tokens_to_ids(token)
        if got != want:
            raise ConversionError(f"released token {token!r} has id {got} in {base}; the release gives it {want}")
    ours = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if ours:
        tok.add_tokens(ours, special_tokens=True)
    tok.bos_token, tok.eos_token, tok.pad_token = BOS, EOS, PAD
    return tok, instruct, len(tok) - rows
