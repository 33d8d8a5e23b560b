"""CIDEr-D parity with pycocoevalcap, accumulation and distributed sync (VQA accuracy: test_metrics_vqa.py).
The 2-process CIDEr sync is slow: `.venv/bin/python -m pytest -q -m slow tests/test_metrics_cider.py`.
"""

import random
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from emu_lightning.metrics.cider import CIDErD, tokenize

Cider = pytest.importorskip("pycocoevalcap.cider.cider", reason="pycocoevalcap is a [dev] extra").Cider

# 8 images × 5 refs; candidates range from a verbatim reference to an empty string after tokenization.
MINI_REFS = [
    ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
     "A person on a surfboard riding a wave.", "Man surfing on a big blue wave.",
     "A surfer catching a wave."],
    ["Two dogs playing with a frisbee in the park.", "Dogs chase a red frisbee on the grass.",
     "A pair of dogs playing in a grassy field.", "Two brown dogs run after a frisbee.",
     "Dogs at play in a park."],
    ["A plate of food with broccoli and rice.", "Rice, broccoli and chicken on a white plate.",
     "A healthy meal on a plate.", "A dinner plate with vegetables and rice.",
     "Broccoli next to rice on a dish."],
    ["A red double decker bus on a city street.", "A bus driving down the street.",
     "A double-decker bus parked by the curb.", "Red bus in the city.", "A large red bus on the road."],
    ["A cat sleeping on a laptop keyboard.", "A cat lying on top of a laptop.",
     "The cat is napping on the computer.", "A grey cat curled up on a keyboard.",
     "Cat asleep on a notebook computer."],
    ["Two giraffes standing next to a tree.", "Giraffes eating leaves from a tall tree.",
     "A pair of giraffes in the zoo.", "Two giraffes near some trees.", "Giraffes standing in a field."],
    ["A kitchen with a stove and a refrigerator.", "A clean kitchen with white cabinets.",
     "The kitchen has a fridge and an oven.", "An empty kitchen with appliances.",
     "A small kitchen in an apartment."],
    ["A man's bike leaning against a wall.", "A bicycle parked next to a brick wall.",
     "Someone's bike isn't locked.", "A blue bike by the wall.", "Bike resting against the building."],
]  # fmt: skip
MINI_PREDS = [
    "A man riding a wave on top of a surfboard.",  # verbatim reference
    "Two dogs playing with a frisbee.",  # large overlap, shorter
    "A plate with rice",  # partial overlap
    "A red bus",  # very short
    "A dog running on the beach.",  # unrelated
    "giraffes giraffes giraffes giraffes giraffes",  # repetition: clipping must cap it
    "...",  # empty after tokenization
    "A bike leaning against the wall, isn't it?",  # clitics and punctuation
]


def reference_cider(preds: list[str], refs: list[list[str]]) -> tuple[float, list[float]]:
    """pycocoevalcap on the same tokenized captions (its PTBTokenizer needs Java, so we tokenize)."""
    gts = {i: [tokenize(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [tokenize(p)] for i, p in enumerate(preds)}
    score, scores = Cider().compute_score(gts, res)
    return float(score), [float(s) for s in scores]


def random_corpus(seed: int, num_images: int = 50) -> tuple[list[str], list[list[str]]]:
    """Captions over a 16-word vocabulary, so n-grams recur across images and the IDF varies."""
    rng = random.Random(seed)
    vocab = "a the dog cat man red blue big small on in with park street ball runs sits near".split()

    def caption(lo: int = 1, hi: int = 14) -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))

    refs = [[caption() for _ in range(rng.randint(1, 6))] for _ in range(num_images)]
    preds = []
    for rs in refs:
        kind = rng.random()
        if kind < 0.25:
            preds.append(rng.choice(rs))  # a copy of one reference
        elif kind < 0.5:
            words = rng.choice(rs).split()
            # A truncated reference followed by noise.
            preds.append(" ".join(words[: rng.randint(0, len(words))] + caption(0, 4).split()))
        else:
            preds.append(caption(0, 16))  # unrelated, sometimes empty
    return preds, refs


def test_tokenize_matches_ptb_on_plain_english():
    assert tokenize("A Dog's ball, (red)!") == "a dog 's ball red"
    assert tokenize("It isn't \"here\"...  'quoted'") == "it is n't here quoted"
    assert tokenize("A black-and-white photo - of dogs'") == "a black-and-white photo of dogs"


def test_cider_matches_pycocoevalcap_on_mini_corpus():
    metric = CIDErD()
    metric.update(MINI_PREDS, MINI_REFS)
    score, scores = reference_cider(MINI_PREDS, MINI_REFS)
    assert_close(metric.compute(), torch.tensor(score, dtype=torch.float64), rtol=1e-6, atol=0)
    assert_close(metric.per_sample(), torch.tensor(scores, dtype=torch.float64), rtol=1e-6, atol=1e-12)
    assert scores[0] > 1.0 and scores[6] == 0.0  # the corpus exercises both extremes


@pytest.mark.parametrize("seed", [0, 1])
def test_cider_matches_pycocoevalcap_on_random_corpus(seed):
    preds, refs = random_corpus(seed)
    metric = CIDErD()
    metric.update(preds, refs)
    score, scores = reference_cider(preds, refs)
    assert_close(metric.compute(), torch.tensor(score, dtype=torch.float64), rtol=1e-6, atol=0)
    assert_close(metric.per_sample(), torch.tensor(scores, dtype=torch.float64), rtol=1e-6, atol=1e-12)


def test_cider_accumulates_over_updates_and_resets():
    preds, refs = random_corpus(seed=2)
    whole = CIDErD()
    whole.update(preds, refs)
    chunked = CIDErD()
    for start, stop in [(0, 7), (7, 8), (8, 30), (30, 50)]:
        chunked.update(preds[start:stop], refs[start:stop])
    assert_close(chunked.compute(), whole.compute(), rtol=1e-12, atol=0)
    assert_close(chunked.per_sample(), whole.per_sample(), rtol=1e-12, atol=0)

    chunked.reset()
    with pytest.raises(ValueError, match="no samples"):
        chunked.per_sample()
    chunked.update(MINI_PREDS, MINI_REFS)  # after reset only the new corpus counts, IDF included
    expected = reference_cider(MINI_PREDS, MINI_REFS)[0]
    assert_close(chunked.compute(), torch.tensor(expected, dtype=torch.float64))


def test_cider_ranks_a_perfect_caption_above_a_wrong_one():
    refs = MINI_REFS[:4]
    good, bad = CIDErD(), CIDErD()
    good.update([r[0] for r in refs], refs)
    bad.update(["a kitchen with a stove"] * 4, refs)
    assert good.compute() > 1.0 > 0.1 > bad.compute()


def test_cider_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        CIDErD().update(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="sample 0: no reference captions"):
        CIDErD().update(["a"], [[]])


def _sync_worker(rank: int, init_file: str, preds: list[str], refs: list[list[str]], queue) -> None:
    # A short gloo timeout so that a broken gather fails the test in seconds rather than hanging it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=10))  # fmt: skip
    metric = CIDErD()
    if rank == 0:  # rank 1 sees no samples: its empty state must still gather with rank 0's
        metric.update(preds[:5], refs[:5])
        metric.update(preds[5:], refs[5:])
    queue.put((rank, metric.compute().item(), metric.per_sample().tolist()))
    dist.destroy_process_group()


@pytest.mark.slow
def test_cider_syncs_across_ranks_when_one_rank_is_empty(tmp_path):
    preds, refs = MINI_PREDS, MINI_REFS
    queue = mp.get_context("spawn").SimpleQueue()
    # Raises as soon as either rank fails or dies (a dtype mismatch aborts gloo with a size error).
    mp.spawn(_sync_worker, args=(str(tmp_path / "init"), preds, refs, queue), nprocs=2)
    results = {rank: (score, scores) for rank, score, scores in (queue.get() for _ in range(2))}
    score, scores = reference_cider(preds, refs)
    for rank in (0, 1):  # both ranks see the whole corpus
        assert_close(results[rank][0], score, rtol=1e-6, atol=0)
        assert_close(results[rank][1], scores, rtol=1e-6, atol=1e-12)
