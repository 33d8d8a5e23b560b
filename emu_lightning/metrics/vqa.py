"""VQA accuracy (Antol et al., 2015) as a torchmetrics ``Metric``, by the rules of the official evaluation.

The official script is ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` in GT-Vision-Lab/VQA (docs/evaluation.md).
Accuracy of one answer against the N human answers of a question is the mean, over the N leave-one-out subsets,
of min(#matches / 3, 1): with 10 annotators, 1 match scores 0.3, 2 score 0.6, 3 score 0.9, 4 or more score 1.

Which strings are compared is a choice of ``rules``:

- ``"official"`` (the default): the script as released with VQA v1 and v2 (2015-2016, last changed in commit
  458a8b2). The prediction is always normalised in full (`normalize_answer`: punctuation,
  lowercase, number words to digits, articles dropped, apostrophe-less contractions restored). The human answers
  are normalised only for punctuation (`process_punctuation`: no lowercasing, no digits) and only when they
  disagree. So "Two" scores 1 against ten "2"s (the prediction becomes "2"), while a human "two" among other
  answers never matches anything, since a normalised prediction never reads "two".
- ``"official_2021"``: the same repository after its March 2021 change ("Fixed processing answers bug"): when the
  humans disagree, both sides are normalised in full; when they agree, neither is, not even lowercased ("Two" and
  "Yes." then score 0 against ten "2"s and ten "yes"s). OpenFlamingo's ``vqa_metric.py`` carries this version.
- ``"lenient"``: both sides always normalised in full. Not an official rule set; it suits answer sets written
  freely, like the synthetic chat's ("the first", whole captions), which the official rules, written for
  annotations that are already normalised, would never match.

Whitespace follows the script too: newlines and tabs become spaces and the ends are stripped (the 2016 rules
strip only the prediction), and a punctuation pass leaves the spaces it makes.
"""

import re
from collections.abc import Callable

import torch
from torch import Tensor
from torchmetrics import Metric

RULES = ("official", "official_2021", "lenient")

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# The official table maps each contraction with exactly one apostrophe missing to its full form ("dont" ->
# "don't", "couldnt've" -> "couldn't've"); it is derived here from the full forms. Its "I'm"-style keys are
# capitalised and never match lowercased text; "she'd", "we'd", "it's" are absent because "shed", "wed", "its" are
# words. It has one reversed entry, "somebody'd" -> "somebodyd", kept below because the script applies it.
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
} | {"somebody'd": "somebodyd"}
_PUNCT = list(';/[]"{}()=+\\_-><@`,?!')  # the official list; "'" stays for contractions, "." is below
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)
# The script passes re.UNICODE (= 32) where `sub` takes its count, so at most 32 periods go (kept for exactness).
_PERIOD_COUNT = int(re.UNICODE)
_DIGIT_COMMA = re.compile(r"\d,\d")


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The script's punctuation pass: a mark touching a space, or any mark in a "1,000"-style answer, is deleted,
    otherwise it becomes a space; then periods not followed by a digit go. Case and spaces are left as they are."""
    out = text
    glued_number = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or glued_number) else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The script's word pass: lowercase, number words zero..ten (and "none") to digits, articles dropped,
    apostrophe-less contractions restored, words joined by single spaces."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """Full official normalisation: "Two dogs." -> "2 dogs", "a Dog" -> "dog", "dont" -> "don't"."""
    return process_digit_article(process_punctuation(_clean(text)))


def _official(pred: str, answers: list[str]) -> tuple[str, list[str]]:
    if len(set(answers)) > 1:
        answers = [process_punctuation(a) for a in answers]
    return normalize_answer(pred), answers


def _official_2021(pred: str, answers: list[str]) -> tuple[str, list[str]]:
    pred, answers = _clean(pred), [_clean(a) for a in answers]
    if len(set(answers)) > 1:
        return normalize_answer(pred), [normalize_answer(a) for a in answers]
    return pred, answers


def _lenient(pred: str, answers: list[str]) -> tuple[str, list[str]]:
    return normalize_answer(pred), [normalize_answer(a) for a in answers]


_COMPARED: dict[str, Callable[[str, list[str]], tuple[str, list[str]]]] = {
    "official": _official, "official_2021": _official_2021, "lenient": _lenient}


def vqa_accuracy(pred: str, answers: list[str], rules: str = "official") -> float:
    """Accuracy of one predicted answer against N human ``answers``, averaged over leave-one-out subsets.

    Args:
        pred: the model's answer.
        answers: the human answers (10 in VQAv2, OKVQA, VizWiz and TextVQA).
        rules: which strings are compared (module docstring): "official", "official_2021" or "lenient".
    """
    if rules not in _COMPARED:
        raise ValueError(f"rules={rules!r}; expected one of {RULES}")
    if not answers:
        raise ValueError("no human answers to score against")
    pred, answers = _COMPARED[rules](pred, answers)
    matches = [a == pred for a in answers]
    total = sum(matches)
    # Holding out annotator i leaves total - matches[i] matching answers among the other N - 1.
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(answers)


class VQAAccuracy(Metric):
    """Mean VQA accuracy in [0, 1] over ``update(preds, answers)`` calls.

    Args:
        rules: "official" (default), "official_2021" or "lenient" (module docstring).
        **kwargs: Forwarded to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, rules: str = "official", **kwargs) -> None:
        super().__init__(**kwargs)
        if rules not in _COMPARED:
            raise ValueError(f"rules={rules!r}; expected one of {RULES}")
        self.rules = rules
        # float64: sums of 0.3 / 0.6 / 0.9 over a large eval set should not drift.
        self.add_state("score", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[str], answers: list[list[str]]) -> None:
        if len(preds) != len(answers):
            raise ValueError(f"{len(preds)} predictions but {len(answers)} answer lists")
        for i, ans in enumerate(answers):
            if not ans:
                raise ValueError(f"sample {i}: no human answers")
        self.score += sum(vqa_accuracy(p, a, self.rules) for p, a in zip(preds, answers))
        self.count += len(preds)

    def compute(self) -> Tensor:
        if self.count == 0:
            raise ValueError("VQAAccuracy has no samples: call update() before compute()")
        return self.score / self.count
