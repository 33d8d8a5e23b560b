"""Vocabulary, scene records and all text of the synthetic shape world.

The leaf module of ``scenes.py`` (which re-exports everything here; docs/synthetic_world.md): vocabulary constants,
``Obj``/``Scene``, and the text side (reference captions, their parser and the attribute
accuracy metric, VQA items with 10 annotators, story sentences, video subtitles and video QA).

Caption grammar, which ``parse_caption`` inverts: ``FRAME + objects + "."`` where objects are
joined by ", " and " and " and each object phrase names size, color, shape and position with no
comma or "and" inside, e.g. "a picture of a large red circle at the top left and a small blue
star in the center." Frames never contain a vocabulary word.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (20, 170, 45),
    "blue": (35, 85, 240),
    "yellow": (250, 220, 0),
    "purple": (155, 45, 205),
    "orange": (255, 130, 0),
}
# Side of the object's bounding box as a fraction of the image side; large < 1/3 keeps
# objects inside their grid cell, so neighbours never overlap.
SIZES: dict[str, float] = {"small": 0.19, "large": 0.32}
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
# Neutral tones only: no background can be read as a shape colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "dark": (32, 32, 36), "gray": (110, 110, 110), "light": (210, 210, 205),
}  # fmt: skip
# One pair per colour and per shape (a Latin-square diagonal); never in train/val/test.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "star"), ("green", "circle"), ("blue", "triangle"),
    ("yellow", "square"), ("purple", "cross"), ("orange", "diamond"),
)  # fmt: skip


@dataclass(frozen=True)
class Obj:
    """One object of a scene; every field is a vocabulary word."""

    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for field, value, vocab in (
            ("shape", self.shape, SHAPES), ("color", self.color, COLORS),
            ("size", self.size, SIZES), ("position", self.position, POSITIONS),
        ):  # fmt: skip
            if value not in vocab:
                raise ValueError(f"Obj.{field}={value!r} is not one of {list(vocab)}")


@dataclass(frozen=True)
class Scene:
    """1-3 objects in distinct cells, in canonical row-major cell order, on a background.

    ``objects`` is a tuple (not a list) so scenes are hashable and can be compared across splits.
    """

    objects: tuple[Obj, ...]
    background: str = "gray"

    def __post_init__(self) -> None:
        cells = [POSITIONS.index(o.position) for o in self.objects]
        if not 1 <= len(cells) <= 3 or cells != sorted(set(cells)):
            raise ValueError(f"Scene needs 1-3 objects in distinct cells, row-major order; got cells {cells}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"Scene.background={self.background!r} is not one of {list(BACKGROUNDS)}")

    def key(self) -> tuple[tuple[str, str, str, str], ...]:
        """What captions can see: the object tuple (background and jitter excluded)."""
        return tuple((o.size, o.color, o.shape, o.position) for o in self.objects)


def has_heldout_pair(objects: tuple[Obj, ...]) -> bool:
    """Whether any object is a held-out colour-shape combination."""
    return any((o.color, o.shape) in HELDOUT_PAIRS for o in objects)


# Annotator / paraphrase synonyms; parse_caption also accepts them, VQA normalisation does not
# map them back, so a synonym answer counts as a (realistic) disagreement.
SYNONYMS: dict[str, str] = {
    "purple": "violet", "diamond": "rhombus", "cross": "plus", "large": "big", "small": "little",
    "center": "middle", "top left": "upper left", "top right": "upper right",
    "bottom left": "lower left", "bottom right": "lower right", "1": "one", "2": "two", "3": "three",
}  # fmt: skip
_FRAMES = (
    "{}.", "a picture of {}.", "there is {}.", "this image shows {}.", "an image with {}.", "we can see {}.",
)  # fmt: skip
_FORMS = (
    "a {size} {color} {shape} {loc}",
    "a {size} {shape} in {color} {loc}",
    "a {color} {shape} of {size} size {loc}",
)  # fmt: skip
_STORY_OPENERS = ("at first there is", "the story begins with", "in the first picture we see")


def loc_phrase(position: str, variant: int = 0) -> str:
    """Prepositional phrase for a cell, e.g. "at the top left" / "in the top left corner"."""
    if position == "center":
        return ("in the center", "at the center")[variant]
    if " " in position:  # corner
        return (f"at the {position}", f"in the {position} corner")[variant]
    near = "at the" if position in ("top", "bottom") else "on the"
    return (f"{near} {position}", f"near the {position} edge")[variant]


def describe_object(obj: Obj, form: int = 0, loc: int = 0, article: str = "a") -> str:
    """One object phrase naming size, color, shape and position (no comma, no "and")."""
    where = loc_phrase(obj.position, loc)
    text = _FORMS[form].format(size=obj.size, color=obj.color, shape=obj.shape, loc=where)
    return article + text[1:]


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe_scene(scene: Scene, form: int = 0, loc: int = 0) -> str:
    """All objects in canonical order, e.g. "a large red circle at the top left and a small ..."."""
    return _join([describe_object(o, form, loc) for o in scene.objects])


def make_captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """``n`` (<= 6) paraphrased references, each with a different sentence frame."""
    if not 1 <= n <= len(_FRAMES):
        raise ValueError(f"n={n} captions requested; expected 1..{len(_FRAMES)} (one per frame)")
    start = rng.randrange(len(_FRAMES))
    out = []
    for k in range(n):
        form = rng.randrange(len(_FORMS))
        objs = _join([describe_object(o, form, rng.randrange(2)) for o in scene.objects])
        out.append(_FRAMES[(start + k) % len(_FRAMES)].format(objs))
    return out


def _alternation(words: dict[str, str]) -> re.Pattern:
    # Longest alternative first, so "top left" wins over "top" at the same offset.
    alts = sorted(words, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in alts) + r")\b")


def _vocab_with_synonyms(vocab) -> dict[str, str]:
    table = {w: w for w in vocab}
    table.update({SYNONYMS[w]: w for w in vocab if w in SYNONYMS})
    return table


_ATTRS: dict[str, tuple[re.Pattern, dict[str, str]]] = {
    name: (_alternation(table), table)
    for name, table in (
        ("size", _vocab_with_synonyms(SIZES)), ("color", _vocab_with_synonyms(COLORS)),
        ("shape", _vocab_with_synonyms(SHAPES)), ("position", _vocab_with_synonyms(POSITIONS)),
    )
}  # fmt: skip
_SEP = re.compile(r",|;|\band\b")


def parse_caption(text: str) -> list[dict[str, str | None]]:
    """Object mentions of a caption, in order: ``[{"size", "color", "shape", "position"}]``.

    The caption is split at "," / ";" / "and"; each piece naming at least one attribute is a
    mention, and each attribute is its first vocabulary word (or synonym) there, else None.
    """
    mentions = []
    for piece in _SEP.split(text.lower()):
        found = {}
        for name, (pattern, table) in _ATTRS.items():
            m = pattern.search(piece)
            found[name] = table[m.group(1)] if m else None
        if any(v is not None for v in found.values()):
            mentions.append(found)
    return mentions


def object_hits(caption: str, scene: Scene) -> list[dict[str, bool]]:
    """Per ground-truth object: is each attribute named right by the i-th mention of the caption?

    Objects and mentions are both in canonical order; a missing mention is wrong on every attribute.
    """
    mentions = parse_caption(caption)
    names = ("color", "shape", "size", "position")
    hits = []
    for i, obj in enumerate(scene.objects):
        right = {k: i < len(mentions) and mentions[i][k] == getattr(obj, k) for k in names}
        hits.append({**right, "all": all(right.values())})
    return hits


def attribute_accuracy(captions: list[str], scenes: list[Scene]) -> dict[str, float]:
    """Fraction of ground-truth objects whose attributes the captions name correctly.

    ``all`` needs all four right; ``count`` is the fraction of captions with exactly as many mentions
    as objects (see `object_hits` for the matching rule).

    Args:
        captions: one generated caption per scene.
        scenes: the ground-truth scenes.
    """
    if len(captions) != len(scenes) or not scenes:
        raise ValueError(f"attribute_accuracy: {len(captions)} captions for {len(scenes)} scenes; need equal, > 0")
    per_object = [h for c, s in zip(captions, scenes) for h in object_hits(c, s)]
    count_ok = sum(len(parse_caption(c)) == len(s.objects) for c, s in zip(captions, scenes))
    keys = ("color", "shape", "size", "position", "all")
    return {**{k: sum(h[k] for h in per_object) / len(per_object) for k in keys}, "count": count_ok / len(scenes)}


def _annotate(answer: str, pool: list[str], rng: random.Random) -> list[str]:
    """10 annotator answers: 0-3 disagree (synonym or wrong answer), ~12% overall."""
    answers = [answer] * 10
    for i in rng.sample(range(10), rng.choice((0, 0, 1, 1, 1, 2, 2, 3))):
        use_synonym = answer in SYNONYMS and rng.random() < 0.5
        answers[i] = SYNONYMS[answer] if use_synonym else rng.choice([w for w in pool if w != answer])
    return answers


def make_vqa(scene: Scene, rng: random.Random, allow_heldout: bool = False) -> tuple[str, list[str]]:
    """One question about ``scene`` and its 10 annotator answers.

    Args:
        scene: the scene asked about.
        rng: item RNG.
        allow_heldout: whether an absent-object question may name a held-out pair.
    """
    objs = scene.objects
    triples = [(o.size, o.color, o.shape) for o in objs]
    unique = [o for o, t in zip(objs, triples) if triples.count(t) == 1]
    kinds = ["color", "shape", "size", "count", "exists"] + (["position"] if unique else [])
    kind, obj = rng.choice(kinds), rng.choice(objs)
    where = loc_phrase(obj.position)
    if kind == "color":
        return f"what color is the {obj.shape} {where}?", _annotate(obj.color, list(COLORS), rng)
    if kind == "shape":
        return f"what shape is {where}?", _annotate(obj.shape, list(SHAPES), rng)
    if kind == "size":
        question = f"is the {obj.color} {obj.shape} {where} large or small?"
        return question, _annotate(obj.size, list(SIZES), rng)
    if kind == "count":
        return "how many shapes are there?", _annotate(str(len(objs)), ["1", "2", "3"], rng)
    if kind == "position":
        obj = rng.choice(unique)
        question = f"where is the {obj.size} {obj.color} {obj.shape}?"
        return question, _annotate(obj.position, list(POSITIONS), rng)
    present = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES
                  if (c, s) not in present and (allow_heldout or (c, s) not in HELDOUT_PAIRS)]  # fmt: skip
        color, shape = rng.choice(absent)
    answer = "yes" if (color, shape) in present else "no"
    return f"is there a {color} {shape}?", _annotate(answer, ["yes", "no"], rng)


def _allowed(color: str, shape: str, allow_heldout: bool) -> bool:
    return allow_heldout or (color, shape) not in HELDOUT_PAIRS


def document_story(
    first: Scene, rng: random.Random, allow_heldout: bool = False
) -> tuple[list[Scene], list[str]]:
    """2-5 scenes where an object moves, changes color or appears, with one sentence each."""
    scenes = [first]
    texts = [f"{rng.choice(_STORY_OPENERS)} {describe_scene(first)}."]
    for _ in range(rng.randint(2, 5) - 1):
        cur = list(scenes[-1].objects)
        i = rng.randrange(len(cur))
        old = cur[i]
        the_old = describe_object(old, article="the")
        free = [p for p in POSITIONS if p not in {o.position for o in cur}]
        event = rng.choice(["move", "recolor"] + (["appear"] if len(cur) < 3 else []))
        if event == "move":
            cur[i] = replace(old, position=rng.choice(free))
            texts.append(f"then the {old.size} {old.color} {old.shape} moves to the {cur[i].position}.")
        elif event == "recolor":
            colors = [c for c in COLORS if c != old.color and _allowed(c, old.shape, allow_heldout)]
            cur[i] = replace(old, color=rng.choice(colors))
            texts.append(f"then {the_old} turns {cur[i].color}.")
        else:
            pairs = [(c, s) for c in COLORS for s in SHAPES if _allowed(c, s, allow_heldout)]
            color, shape = rng.choice(pairs)
            new = Obj(shape, color, rng.choice(list(SIZES)), rng.choice(free))
            cur.append(new)
            texts.append(f"then {describe_object(new)} appears.")
        cur.sort(key=lambda o: POSITIONS.index(o.position))
        scenes.append(Scene(tuple(cur), scenes[-1].background))
    return scenes, texts


_MOTION = {"right": "to the right", "left": "to the left", "up": "up", "down": "down"}


def video_subtitles(
    objs: list[tuple[str, str, str]], directions: list[list[str]], num_frames: int = 8
) -> list[str]:
    """One subtitle per frame; the first half shows segment 1's motion, the rest segment 2's.

    Args:
        objs: ``(shape, color, size)`` per object.
        directions: per object, the direction of each of the two segments.
        num_frames: number of frames.
    """
    segments = [
        " and ".join(f"the {z} {c} {s} moves {_MOTION[d[k]]}" for (s, c, z), d in zip(objs, directions)) + "."
        for k in range(2)
    ]
    return [segments[0] if t < num_frames // 2 else segments[1] for t in range(num_frames)]


_WHEN = ("first", "at the end")  # segment 1 (frames 0-3), segment 2 (frames 4-7)


def make_video_qa(
    objs: list[tuple[str, str, str]], directions: list[list[str]], rng: random.Random
) -> tuple[str, list[str]]:
    """One question about a clip's motion and its 10 annotator answers (single words).

    Kinds, drawn uniformly among those the clip can answer unambiguously (each description in a
    question fits exactly one object):
    "which way does the {size} {color} {shape} move first?" / "... move at the end?" (right, left,
    up, down); "what color is the moving {shape}?" or "what color is the {shape} that moves
    {motion} first?" / "... at the end?" (a colour); "how many shapes are moving?" (1 or 2).

    Args:
        objs: ``(shape, color, size)`` per object, as for `video_subtitles`.
        directions: per object, the direction ("right", "left", "up", "down") of each of the two segments.
        rng: a question-only RNG, so the clip's own draws are untouched.
    """
    if len(objs) != len(directions) or not objs:
        raise ValueError(f"make_video_qa: {len(objs)} objects but {len(directions)} direction lists; need equal, > 0")

    def unique(shape: str, segment: int | None = None, direction: str | None = None) -> bool:
        """Whether exactly one object is a ``shape`` (moving ``direction`` in ``segment``, if given)."""
        return sum(
            o[0] == shape and (segment is None or d[segment] == direction) for o, d in zip(objs, directions)
        ) == 1

    # Per object: the segments a which-way question may ask about (its full description must be
    # unique), and the colour questions that name it alone (by shape, or shape and a motion).
    ways = {i: [0, 1] if objs.count(objs[i]) == 1 else [] for i in range(len(objs))}
    colors = {}
    for i, ((shape, _, _), dirs) in enumerate(zip(objs, directions)):
        colors[i] = [f"what color is the moving {shape}?"] if unique(shape) else []
        colors[i] += [
            f"what color is the {shape} that moves {_MOTION[dirs[k]]} {_WHEN[k]}?"
            for k in range(2) if unique(shape, k, dirs[k])
        ]  # fmt: skip
    kinds = ["count"] + [name for name, table in (("way", ways), ("color", colors)) if any(table.values())]
    kind = rng.choice(kinds)
    if kind == "count":
        return "how many shapes are moving?", _annotate(str(len(objs)), ["1", "2"], rng)
    if kind == "way":
        i = rng.choice([i for i in ways if ways[i]])
        k = rng.choice(ways[i])
        shape, color, size = objs[i]
        question = f"which way does the {size} {color} {shape} move {_WHEN[k]}?"
        return question, _annotate(directions[i][k], list(_MOTION), rng)
    i = rng.choice([i for i in colors if colors[i]])
    return rng.choice(colors[i]), _annotate(objs[i][1], list(COLORS), rng)


def vocabulary_sentences() -> list[str]:
    """Sentences naming every vocabulary word, synonym and digit once (tokenizer coverage)."""
    return [
        "shapes: " + " ".join(SHAPES) + ".",
        "colors: " + " ".join(COLORS) + ".",
        "sizes: " + " ".join(SIZES) + ".",
        "positions: " + ", ".join(POSITIONS) + ".",
        "synonyms: " + ", ".join(SYNONYMS.values()) + ".",
        "answers: yes no 1 2 3.",
    ]
