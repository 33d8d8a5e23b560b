"""Tokenizers with the Emu special tokens (docs/design.md §2).

`load_tokenizer(None)` trains a small byte-level BPE on the synthetic corpus (deterministic, < 1 s);
`load_tokenizer(path)` loads a local HF tokenizer (e.g. LLaMA's) and appends the missing special tokens,
as the released Emu code does (its ids then start at 32000, docs/design.md §8).
"""
from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from emu_lightning.data.layout.tokens import BOS, EOS, PAD, SPECIAL_TOKENS


def load_tokenizer(path: str | None = None, vocab_size: int = 1024, seed: int = 0) -> PreTrainedTokenizerFast:
    """A tokenizer that knows every Emu special token.

    Args:
        path: local tokenizer directory or `tokenizer.json`; None trains the synthetic BPE.
        vocab_size: BPE vocabulary size (synthetic only), special tokens included.
        seed: synthetic corpus seed (synthetic only).
    """
    if path is None:
        return _synthetic_tokenizer(vocab_size, seed)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist (expected a tokenizer dir or tokenizer.json)")
    if p.is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
    else:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    tok.bos_token, tok.eos_token, tok.pad_token = BOS, EOS, PAD
    return tok


@functools.lru_cache(maxsize=4)
def _synthetic_tokenizer(vocab_size: int, seed: int) -> PreTrainedTokenizerFast:
    from emu_lightning.data.synthetic.scenes import caption_corpus

    bpe = Tokenizer(models.BPE())
    # Byte-level: every string round-trips exactly, no unknown tokens.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(caption_corpus(seed=seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD)
