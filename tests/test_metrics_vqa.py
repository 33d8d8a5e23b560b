"""VQA accuracy by the official rules (GT-Vision-Lab/VQA, vqaEval.py; docs/evaluation.md), case by case.

Each case reads as a rule of the script: what is normalised on which side, and when. The leave-one-out arithmetic
is worked out by hand below TEN_DOGS.
"""
import pytest
import torch
from torch.testing import assert_close

from emu_lightning.metrics.vqa import (
    RULES, VQAAccuracy, normalize_answer, process_punctuation, vqa_accuracy,
)

TEN_DOGS = ["dog"] * 10

# Leave-one-out by hand, 10 annotators of whom k match: holding out a non-match leaves k matches
# among 9 (10 - k such subsets), holding out a match leaves k - 1 (k subsets); each scores min(m/3, 1).
#   k=0: 0
#   k=1: (9 * 1/3 + 1 * 0) / 10 = 3/10 = 0.3
#   k=2: (8 * 2/3 + 2 * 1/3) / 10 = (16/3 + 2/3) / 10 = 6/10 = 0.6
#   k=3: (7 * 1 + 3 * 2/3) / 10 = (7 + 2) / 10 = 0.9
#   k=4: (6 * 1 + 4 * 1) / 10 = 1.0  (the 4 held-out matches still leave 3 = a full score)


def split(answer: str, k: int, other: str = "cat") -> list[str]:
    """k annotators gave `answer`, the other 10 - k gave `other`: the humans disagree."""
    return [answer] * k + [other] * (10 - k)


# ------------------------------------------------------------------ the official rules (the default)


@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_scores_exactly(k, expected):
    """The values worked out above TEN_DOGS, for every position of the matches among the annotators."""
    for start in (0, 3, 10 - k):
        answers = ["dog"] * 10
        answers[start : start + k] = ["cat"] * k
        assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("pred", "answers", "expected"),
    [
        # Unanimous humans: their answer is compared as written; the prediction is normalised in full.
        ("dog", TEN_DOGS, 1.0),
        ("Dog", TEN_DOGS, 1.0),                  # the prediction is lowercased
        ("a dog.", TEN_DOGS, 1.0),               # its article and period go
        ("two", ["2"] * 10, 1.0),                # its number word becomes a digit
        ("2", ["two"] * 10, 0.0),                # ... but ten humans' "two" stays "two"
        ("two", ["two"] * 10, 0.0),              # ... even against itself: "two" -> "2" on one side only
        ("the dog", ["the dog"] * 10, 0.0),      # the same for articles
        # Split humans: their answers lose punctuation only (no lowercasing, no digits, no articles).
        ("Dog.", split("dog", 1), 0.3),
        ("2", split("2", 3, "two"), 0.9),        # the 7 "two"s never match
        ("two", split("2", 3, "two"), 0.9),      # the prediction "two" is "2" by then
        ("dog", split("Dog", 4), 0.0),           # a capitalised human answer never matches
        ("dog", split("the dog", 4), 0.0),
        ("black and white", split("black-and-white", 3), 0.9),   # a glued hyphen becomes a space on both sides
        # "!": in the prediction it becomes a space, then the words are re-joined; in a human answer the space stays.
        ("yes!", ["yes"] * 10, 1.0),
        ("yes", split("yes!", 5, "no"), 0.0),    # "yes!" -> "yes " (trailing space) != "yes"
        ("yes", split("yes !", 5, "no"), 0.0),   # a spaced "!" is deleted, its space stays: "yes "
        ("yes", split("yes", 5, "yes !"), 1.0),
        # Contractions are restored in the prediction only.
        ("dont", split("don't", 3, "no"), 0.9),
        ("dont", split("dont", 3, "no"), 0.0),
        ("don't", split("dont", 3, "no"), 0.0),
        # Articles are dropped from the prediction only.
        ("a dog", split("dog", 4), 1.0),
        ("an apple", ["apple"] * 10, 1.0),
    ],
)
def test_official_rules(pred, answers, expected):
    assert vqa_accuracy(pred, answers) == pytest.approx(expected, abs=1e-12)
    assert vqa_accuracy(pred, answers, rules="official") == vqa_accuracy(pred, answers)


def test_punctuation_pass_keeps_case_and_spaces():
    assert process_punctuation("Yes!") == "Yes "
    assert process_punctuation("yes !") == "yes "
    assert process_punctuation("1,000 Dogs") == "1000 Dogs"   # a "1,000"-style number deletes every mark
    assert process_punctuation("u.s.a.") == "usa"


# ------------------------------------------------------------------ the 2021 revision and the lenient variant


@pytest.mark.parametrize(
    ("pred", "answers", "expected"),
    [
        ("two", ["2"] * 10, 0.0),          # unanimous: nothing is normalised, not even case
        ("Yes", ["yes"] * 10, 0.0),
        (" yes\n", ["yes"] * 10, 1.0),     # whitespace is still cleaned on both sides
        ("two", split("2", 4, "3"), 1.0),  # split: both sides in full
        ("2", split("two", 4, "3"), 1.0),
        ("dog", split("the dog", 4), 1.0),
    ],
)
def test_official_2021_rules(pred, answers, expected):
    assert vqa_accuracy(pred, answers, rules="official_2021") == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("pred", "answers", "expected"),
    [
        ("2", ["two"] * 10, 1.0),
        ("two", ["two"] * 10, 1.0),
        ("the first", ["the first"] * 10, 1.0),   # the synthetic chat's answers (why the variant exists)
        ("dog", split("Dog", 4), 1.0),
        ("yes", split("yes!", 5, "no"), 1.0),
        ("dont", split("dont", 3, "no"), 0.9),
    ],
)
def test_lenient_rules_normalise_both_sides(pred, answers, expected):
    assert vqa_accuracy(pred, answers, rules="lenient") == pytest.approx(expected, abs=1e-12)
    assert vqa_accuracy(pred, answers) < expected   # each case is one the official rules score lower


# ------------------------------------------------------------------ full normalisation (the prediction's)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Punctuation: a mark touching a space anywhere is deleted everywhere in the answer ...
        ("black-and-white - dog", "blackandwhite dog"),
        ("what ?!", "what"),  # "?" is spaced (deleted), "!" is glued (a space), then stripped
        # ... otherwise it becomes a space ...
        ("red,blue", "red blue"),
        ("(3)", "3"),
        # ... and any "1,000"-style number deletes every listed mark, not only the comma.
        ("1,000-ish", "1000ish"),
        ("1,000 dogs, maybe", "1000 dogs maybe"),
        # Periods go, unless a digit follows.
        ("yes.", "yes"),
        ("u.s.a.", "usa"),
        ("3.5.", "3.5"),
        (".5", ".5"),
        # Number words zero..ten (and "none") become digits, others stay words.
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("two. five", "2 5"),
        # Articles dropped wherever they stand.
        ("the dog", "dog"),
        ("a dog on the mat", "dog on mat"),
        # Contractions missing their apostrophe are restored; real words are not touched.
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("couldnt've", "couldn't've"),
        ("its", "its"),
        ("it's", "it's"),
        ("somebody'd", "somebodyd"),   # the script's one reversed entry
        # Case.
        ("YES", "yes"),
        ("Dont Know", "don't know"),
        # Whitespace: newlines and tabs are spaces, runs collapse, ends are stripped.
        ("  two\n dogs\t", "2 dogs"),
        ("red \n\n blue", "red blue"),
    ],
)
def test_full_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


# ------------------------------------------------------------------ the metric


def test_metric_accumulates_resets_and_names_its_rules():
    metric = VQAAccuracy()
    metric.update(["dog", "cat"], [TEN_DOGS, split("cat", 1, "dog")])  # 1.0, 0.3
    metric.update(["two"], [["2", "2"] + ["3"] * 8])  # 0.6
    assert_close(metric.compute(), torch.tensor((1.0 + 0.3 + 0.6) / 3, dtype=torch.float64))
    metric.reset()
    metric.update(["cat"], [TEN_DOGS])
    assert metric.compute().item() == 0.0
    with pytest.raises(ValueError, match="sample 0: no human answers"):
        metric.update(["cat"], [[]])
    lenient = VQAAccuracy(rules="lenient")
    lenient.update(["2"], [["two"] * 10])
    assert lenient.compute().item() == 1.0
    with pytest.raises(ValueError, match=r"rules='strict'; expected one of \('official'"):
        VQAAccuracy(rules="strict")
    assert RULES == ("official", "official_2021", "lenient")
