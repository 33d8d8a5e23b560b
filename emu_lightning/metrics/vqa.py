"""VQA accuracy (Antol et al., 2015) as a torchmetrics ``Metric``.

Normalisation follows the official VQA evaluation script (``vqaEval.py``): punctuation handling,
number words to digits, articles dropped, apostrophe-less contractions restored. Accuracy of one
answer against N human answers is the mean, over the N leave-one-out subsets, of
min(#matches / 3, 1): with 10 annotators, 1 match scores 0.3, 2 score 0.6, 3 score 0.9, 4+ score 1.

One deliberate difference: the official script normalises only when the human answers disagree,
so "Two" scores 0 against ten "2"s; here both sides are always normalised.
"""

import re

import torch
from torch import Tensor
from torchmetrics import Metric

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# The official table maps each contraction with exactly one apostrophe missing to the full form
# ("dont" -> "don't", "couldnt've" -> "couldn't've"). Its "I'm"-style keys are capitalised and never
# match lowercased text, its one reversed entry ("somebody'd" -> "somebodyd") is left out, and "she'd",
# "we'd", "it's" are absent because "shed", "wed", "its" are words.
_FULL_FORMS = """
    ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
    he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've
    mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't
    shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
    something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
    they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's
    where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
    wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
_CONTRACTIONS = {
    full[:i] + full[i + 1 :]: full for full in _FULL_FORMS for i, c in enumerate(full) if c == "'"
}
_PUNCT = list(';/[]"{}()=+\\_-><@`,?!')  # the official list; "'" stays for contractions, "." is below
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)
_DIGIT_COMMA = re.compile(r"\d,\d")


def normalize_answer(text: str) -> str:
    """Official VQA answer normalisation: "Two dogs." -> "2 dogs", "a Dog" -> "dog", "dont" -> "don't"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # A punctuation mark touching a space, or any "1,000"-style number, is deleted; otherwise it splits words.
    out = text
    for p in _PUNCT:
        glued = (p + " " in text or " " + p in text) or _DIGIT_COMMA.search(text) is not None
        out = out.replace(p, "" if glued else " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(pred: str, answers: list[str]) -> float:
    """Accuracy of one predicted answer against N human ``answers``, averaged over leave-one-out subsets."""
    if not answers:
        raise ValueError("no human answers to score against")
    pred = normalize_answer(pred)
    matches = [normalize_answer(a) == pred for a in answers]
    total = sum(matches)
    # Holding out annotator i leaves total - matches[i] matching answers among the other N - 1.
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(answers)


class VQAAccuracy(Metric):
    """Mean VQA accuracy in [0, 1] over ``update(preds, answers)`` calls.

    Args:
        **kwargs: Forwarded to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # float64: sums of 0.3 / 0.6 / 0.9 over a large eval set should not drift.
        self.add_state("score", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[str], answers: list[list[str]]) -> None:
        if len(preds) != len(answers):
            raise ValueError(f"{len(preds)} predictions but {len(answers)} answer lists")
        for i, ans in enumerate(answers):
            if not ans:
                raise ValueError(f"sample {i}: no human answers")
        self.score += sum(vqa_accuracy(p, a) for p, a in zip(preds, answers))
        self.count += len(preds)

    def compute(self) -> Tensor:
        if self.count == 0:
            raise ValueError("VQAAccuracy has no samples: call update() before compute()")
        return self.score / self.count
