"""Fast-binding episodes: fresh nonsense words bound, in context, to colours, shapes or whole objects.

The debug world's test of in-context learning, after Frozen's fast-binding tasks (Tsimpoukelli et al. 2021,
arXiv:2106.13884): each episode gives 1-3 *categories* (a colour, a shape, or a colour-shape pair) a nonsense
word drawn fresh from a large pool ("dafu", "kimo"...), shows k single-object images each followed by its word
("this is a dafu."), then a new image of one of the categories and the question, whose answer is the bound word:

    [img] this is a dafu. [img] this is a kimo. [img] this is a dafu.
    [img] question: what is this? answer: this is a dafu.

A word means something only inside its episode, so a model can answer only by reading the demonstrations: with
k = 0 the answer is at chance by construction (an open answer among the pool's words: ~0). Training episodes are
*bursty* (Chan et al. 2022, arXiv:2205.05055: few categories per sequence, each repeated, is what makes
in-context learning emerge): 1-3 categories, 1-8 demonstrations, every category shown at least once, the query
always answerable. Evaluation episodes (`BindingEpisodes`) are Frozen's 2-way form at fixed k: the demonstrations
come in rounds (each round shows every category once, in random order), so a k-shot prompt is the first k of
them; with k = 1 the query's category was shown half of the time, from k = 2 on always.

Words are consonant-vowel-consonant-vowel strings (14 consonants × 5 vowels: 4900, less the world's words and
common English ones); each word's split is a property of the word (blake2b into 100 buckets: train 0-79, val
80-89, test 90-99), so validation and test ask about words training never wrote. Images avoid the held-out
colour-shape pairs (`HELDOUT_PAIRS`): the episodes test binding, not compositional generalisation. Every item is a
pure function of ``(seed, split, index)``, like the other synthetic datasets. docs/synthetic_world.md, "Episodes".

Item: ``{"id", "images", "texts", "answer", "episode"}``: image i is followed by text i (the last image is the
query, its text the question and answer); ``episode`` holds ``kind``, ``words`` (word → category), ``labels``
(the word of each image), ``objects`` (the `Obj` of each image), ``prompt`` (the question without its answer)
and, for `BindingEpisodes`, ``shots``. The stage-2 `binding` layout (`emu_lightning/data/layout/binding.py`)
lays it out; the `episode` key is what `Layout.infer` recognises.
"""

from __future__ import annotations

import functools
import hashlib
import random

from emu_lightning.data.synthetic.scenes import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    _SyntheticDataset,
    render,
)
from emu_lightning.data.synthetic.text import vocabulary_sentences

__all__ = [
    "BINDING_KINDS", "EPISODE_SPLITS", "BindingEpisodes", "SyntheticEpisodes", "category", "episode_texts",
    "word_pool",
]  # fmt: skip

EPISODE_SPLITS: tuple[str, ...] = ("train", "val", "test")
BINDING_KINDS: tuple[str, ...] = ("color", "shape", "object")
_WORD_BUCKETS: dict[str, range] = {"train": range(0, 80), "val": range(80, 90), "test": range(90, 100)}
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
# (demonstration, question) per kind; the question ends just before the word, so the first generated word is
# the answer (`emu_lightning/metrics/binding.py`).
_TEMPLATES: dict[str, tuple[str, str]] = {
    "object": ("this is a {}.", "question: what is this? answer: this is a"),
    "color": ("this color is {}.", "question: what color is this? answer: this color is"),
    "shape": ("this shape is a {}.", "question: what shape is this? answer: this shape is a"),
}  # fmt: skip
# CVCV words that are words already: the world's own ("size", "move", "more", "same", "none"...; the test checks
# against all the text the world writes) and common English ones, so no "nonsense" word means anything.
_REAL_WORDS = frozenset("""
    base bike bone cage came cane care case cave code cone cope core cute data date dime dine dive dome done dose
    dune face fade fame fate fine fire five fume fuse gale game gave gaze give gone kite lake lame lane late
    life like lime line live lobe lode lone lose love lure made make male mane mare mate maze mile mime mine
    mode mole more move mule mute name nine node none nose note pale pane pave pike pile pine pipe poke pole pose
    pure rake rate rave rice ride rise robe rode role rope rose rude rule safe sage sake sale same sane save
    side site size sole some sore sure take tale tame tape tide tile time tone tore tube tune vane vase vile
    vine vote zone
""".split())


def _world_words() -> frozenset[str]:
    """Every vocabulary word, synonym and template word of the episodes (a pool word must be none of them)."""
    text = " ".join(vocabulary_sentences()) + " " + " ".join(" ".join(t) for t in _TEMPLATES.values())
    return frozenset("".join(c if c.isalpha() else " " for c in text.lower()).split()) | _REAL_WORDS


def _word_bucket(word: str) -> int:
    """Stable bucket in [0, 100) of a word (never Python's salted ``hash``)."""
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % 100


@functools.lru_cache(maxsize=None)
def word_pool(split: str) -> tuple[str, ...]:
    """The sorted nonsense words of ``split``: train 3801, val 501, test 480, pairwise disjoint."""
    if split not in EPISODE_SPLITS:
        raise ValueError(f"word_pool: split={split!r}; expected one of {EPISODE_SPLITS}")
    reserved = _world_words()
    words = (a + b + c + d for a in _CONSONANTS for b in _VOWELS for c in _CONSONANTS for d in _VOWELS)
    return tuple(w for w in words if w not in reserved and _word_bucket(w) in _WORD_BUCKETS[split])


def category(obj: Obj, kind: str) -> tuple[str, ...]:
    """What a word of ``kind`` names in ``obj``: ``(color,)``, ``(shape,)`` or ``(color, shape)``."""
    if kind not in BINDING_KINDS:
        raise ValueError(f"binding kind {kind!r}; expected one of {BINDING_KINDS}")
    return {"color": (obj.color,), "shape": (obj.shape,), "object": (obj.color, obj.shape)}[kind]


def episode_texts(kind: str, word: str) -> tuple[str, str]:
    """(demonstration sentence naming ``word``, question without its answer) of a ``kind`` episode."""
    demo, question = _TEMPLATES[kind]
    return demo.format(word), question


def _categories(rng: random.Random, kind: str, ways: int) -> list[tuple[str, ...]]:
    """``ways`` distinct categories of ``kind``; every one can be drawn without a held-out pair."""
    if kind == "color":
        return [(c,) for c in rng.sample(list(COLORS), ways)]
    if kind == "shape":
        return [(s,) for s in rng.sample(SHAPES, ways)]
    pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]
    return rng.sample(pairs, ways)


def _draw(rng: random.Random, kind: str, cat: tuple[str, ...]) -> tuple[Obj, str]:
    """A random single object of category ``cat`` (never a held-out pair) and a background."""
    if kind == "color":
        color, shape = cat[0], rng.choice([s for s in SHAPES if (cat[0], s) not in HELDOUT_PAIRS])
    elif kind == "shape":
        color, shape = rng.choice([c for c in COLORS if (c, cat[0]) not in HELDOUT_PAIRS]), cat[0]
    else:
        color, shape = cat
    obj = Obj(shape, color, rng.choice(list(SIZES)), rng.choice(POSITIONS))
    return obj, rng.choice(list(BACKGROUNDS))


class _Episodes(_SyntheticDataset):
    """Shared episode construction; subclasses choose the number of categories and the demonstration order."""

    kind = "episodes"

    def __init__(self, split: str = "train", size: int = 10000, image_size: int = 64, seed: int = 0,
                 kinds: list[str] = BINDING_KINDS) -> None:
        """Args:
        split: one of ``EPISODE_SPLITS`` (it picks the word pool).
        size: number of episodes.
        image_size: image side in pixels (>= 16).
        seed: data seed; ``(seed, split, index)`` fixes every byte of an episode.
        kinds: what words may name, drawn uniformly per episode: ``color``, ``shape``, ``object``.
        """
        super().__init__(split, size, image_size, seed)
        if split not in EPISODE_SPLITS:
            raise ValueError(f"{type(self).__name__}: split={split!r}; expected one of {EPISODE_SPLITS} "
                             f"(episodes split by word pool; held-out colour-shape pairs are not drawn)")
        unknown = [k for k in kinds if k not in BINDING_KINDS]
        if not kinds or unknown:
            raise ValueError(f"{type(self).__name__}: kinds={list(kinds)}; expected a non-empty subset of "
                             f"{BINDING_KINDS}")
        self.kinds = tuple(kinds)

    def _plan(self, rng: random.Random) -> tuple[int, list[int]]:
        """(number of categories, category index of each demonstration in order)."""
        raise NotImplementedError

    def _episode(self, index: int) -> dict:
        rng = self._rng(index)
        kind = rng.choice(self.kinds)
        ways, order = self._plan(rng)
        cats = _categories(rng, kind, ways)
        words = rng.sample(word_pool(self.split), ways)
        query = rng.randrange(ways)
        demos = [_draw(rng, kind, cats[c]) for c in order]
        for _ in range(100):  # a new image: not an object already shown (any background)
            obj, background = _draw(rng, kind, cats[query])
            if obj not in {o for o, _ in demos}:
                break
        labels = [*order, query]
        objects = [o for o, _ in demos] + [obj]
        images = [render(Scene((o,), bg), self.image_size, rng.getrandbits(32))
                  for o, bg in [*demos, (obj, background)]]
        _, question = episode_texts(kind, words[query])
        texts = [episode_texts(kind, words[c])[0] for c in order] + [f"{question} {words[query]}."]
        episode = {"kind": kind, "words": {w: c for w, c in zip(words, cats)}, "labels": [words[c] for c in labels],
                   "objects": objects, "prompt": question}
        return {"id": self._id(index), "images": images, "texts": texts, "answer": words[query], "episode": episode}

    def __getitem__(self, index: int) -> dict:
        return self._episode(index)


class SyntheticEpisodes(_Episodes):
    """Bursty training episodes (Chan et al. 2022): 1-3 categories (weights 1 : 2 : 2), 1-8 demonstrations,
    every category shown at least once, the rest uniform, shuffled; the query's category is always shown.

    Args of `_Episodes`, plus:
        max_ways: most categories per episode.
        max_demos: most demonstrations (the evaluation's largest k: longer contexts are not trained).
    """

    kind = "episodes"

    def __init__(self, split: str = "train", size: int = 10000, image_size: int = 64, seed: int = 0,
                 kinds: list[str] = BINDING_KINDS, max_ways: int = 3, max_demos: int = 8) -> None:
        super().__init__(split, size, image_size, seed, kinds)
        if not 1 <= max_ways <= len(SHAPES) or max_demos < max_ways:
            raise ValueError(f"SyntheticEpisodes: max_ways={max_ways} must be in [1, {len(SHAPES)}] and "
                             f"max_demos={max_demos} >= max_ways")
        self.max_ways, self.max_demos = max_ways, max_demos

    def _plan(self, rng: random.Random) -> tuple[int, list[int]]:
        weights = [1] + [2] * (self.max_ways - 1)
        ways = rng.choices(range(1, self.max_ways + 1), weights=weights)[0]
        k = rng.randint(ways, self.max_demos)
        order = list(range(ways)) + [rng.randrange(ways) for _ in range(k - ways)]
        rng.shuffle(order)
        return ways, order


class BindingEpisodes(_Episodes):
    """Evaluation episodes at fixed k (Frozen's form): ``ways`` categories, ``max(shots)`` demonstrations in
    rounds of every category once (random order per round), one query of a uniformly drawn category. The k-shot
    prompt is the first k demonstrations (`emu_lightning/data/layout/binding.py`); the system scores each k in
    ``shots`` as ``<set>/binding_acc_k<k>``.

    Args of `_Episodes`, plus:
        ways: categories per episode.
        shots: the k values evaluated (0 = the question alone: chance).
    """

    kind = "binding"

    def __init__(self, split: str = "val", size: int = 64, image_size: int = 64, seed: int = 0,
                 kinds: list[str] = BINDING_KINDS, ways: int = 2, shots: list[int] = (0, 1, 2, 4, 8)) -> None:
        super().__init__(split, size, image_size, seed, kinds)
        if not 1 <= ways <= len(SHAPES):
            raise ValueError(f"BindingEpisodes: ways={ways}; expected in [1, {len(SHAPES)}]")
        if not shots or any(int(k) != k or k < 0 for k in shots):
            raise ValueError(f"BindingEpisodes: shots={list(shots)}; expected non-negative integers")
        self.ways, self.shots = ways, sorted(int(k) for k in shots)

    def _plan(self, rng: random.Random) -> tuple[int, list[int]]:
        order: list[int] = []
        while len(order) < max(self.shots):
            order += rng.sample(range(self.ways), self.ways)
        return self.ways, order[: max(self.shots)]

    def __getitem__(self, index: int) -> dict:
        item = self._episode(index)
        item["episode"]["shots"] = list(self.shots)
        return item
