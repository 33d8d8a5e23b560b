"""Fast-binding accuracy (Tsimpoukelli et al. 2021, arXiv:2106.13884) as a torchmetrics ``Metric``.

An episode's question ends just before the bound word ("... answer: this is a"), so the answer is the first
generated word. The generation is cleaned as the few-shot harness cleans a VQA answer (`first_answer`: up to the
first period or line break), lower-cased, and its first word, stripped of surrounding punctuation, must equal the
bound word exactly: "Dafu" and "dafu, the red one" are right; "dafus", "a dafu" and "kimo" are wrong.
"""
from __future__ import annotations

import string

import torch
from torch import Tensor
from torchmetrics import Metric

from emu_lightning.data.layout.fewshot import first_answer


def first_word(text: str) -> str:
    """The first word of a generated answer, after `first_answer`: lower-cased, surrounding punctuation stripped."""
    words = first_answer(text).lower().split()
    return words[0].strip(string.punctuation) if words else ""


def binding_correct(pred: str, word: str) -> bool:
    """Whether the generated ``pred`` answers with the bound ``word`` (see the module docstring)."""
    return first_word(pred) == word.lower()


class BindingAccuracy(Metric):
    """Fraction of episodes whose generated answer starts with the bound word, over ``update(preds, words)``.

    Args:
        **kwargs: Forwarded to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[str], words: list[str]) -> None:
        if len(preds) != len(words):
            raise ValueError(f"BindingAccuracy: {len(preds)} predictions but {len(words)} bound words; need equal")
        self.correct += sum(binding_correct(p, w) for p, w in zip(preds, words))
        self.count += len(preds)

    def compute(self) -> Tensor:
        if self.count == 0:
            raise ValueError("BindingAccuracy has no samples: call update() before compute()")
        return self.correct.double() / self.count
