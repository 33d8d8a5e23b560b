"""Synthetic instruction data from the shape world: LLaVA-style chats and Emu2-Gen instructions.

The small-scale stand-in for Emu2-Chat's instruction mixture (LLaVA conversations, VQA, video QA)
and Emu2-Gen's instruction tuning (captions, grounded captions, subject-driven prompts, in-context edits; the layouts of
docs/design.md §2; the whole world: docs/synthetic_world.md). As in ``scenes.py`` every item is a pure
function of ``(seed, split, index)``; scenes come from `sample_scene` on streams of their own ("chat",
"chat-compare", "gen"; edits: `edits.py`), so splits stay disjoint and ``heldout`` holds exactly the held-out pairs.

In chat turns the literal ``<image>`` / ``<video>`` marks where each image / the clip goes, in
order, each in the first human turn that needs it (the layout replaces it); ``answers`` are 10
annotator answers to the last gpt turn, scored with VQA accuracy.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
from PIL import Image

from emu_lightning.data.layout.grounding import box_tokens, grounded
from emu_lightning.data.synthetic.edits import EDIT_KINDS, make_edit, place_edit
from emu_lightning.data.synthetic.scenes import (
    COLORS,
    HELDOUT_PAIRS,
    SHAPES,
    SIZES,
    Scene,
    SyntheticVideos,
    _SyntheticDataset,
    place,
    render_placed,
    sample_scene,
)
from emu_lightning.data.synthetic.text import _annotate, _join, describe_object, make_captions, make_vqa

__all__ = ["CHAT_KINDS", "EDIT_KINDS", "GEN_KINDS", "SyntheticChat", "SyntheticGen", "object_box", "object_phrase",
           "place"]

CHAT_KINDS: tuple[str, ...] = ("vqa", "describe", "count", "compare", "video")
GEN_KINDS: tuple[str, ...] = ("t2i", "grounded", "subject", "edit")
_DESCRIBE = ("describe the image.", "what does this image show?", "describe what you see in the picture.")
_MORE = ("the first", "the second", "neither")  # which image has more shapes
_PHRASE_FIRST_P = 0.7  # docs/design.md §2, grounded text: the phrase goes before its box with p 0.7


def _star_extent() -> tuple[float, float, float, float]:
    # The same vertices `_draw_shape` draws, at r = 1, y pointing down.
    angles = [np.pi / 2 + k * np.pi / 5 for k in range(10)]
    xs = [(1.0 if k % 2 == 0 else 0.42) * np.cos(a) for k, a in enumerate(angles)]
    ys = [-(1.0 if k % 2 == 0 else 0.42) * np.sin(a) for k, a in enumerate(angles)]
    return -min(xs), -min(ys), max(xs), max(ys)


# Per shape: how far (in half-sides r) it reaches left, up, right and down of its centre.
_EXTENT: dict[str, tuple[float, float, float, float]] = {
    "circle": (1, 1, 1, 1), "square": (0.88, 0.88, 0.88, 0.88), "triangle": (1, 1, 1, 0.8),
    "diamond": (0.7, 1, 0.7, 1), "star": _star_extent(), "cross": (1, 1, 1, 1),
}  # fmt: skip


def object_box(shape: str, size: str, cx: float, cy: float) -> tuple[float, float, float, float]:
    """Tight ``(x1, y1, x2, y2)`` of a drawn object, fractions of the side, clamped to [0, 1]."""
    r = SIZES[size] / 2
    left, up, right, down = _EXTENT[shape]
    box = (cx - left * r, cy - up * r, cx + right * r, cy + down * r)
    return tuple(min(1.0, max(0.0, float(c))) for c in box)  # type: ignore[return-value]


def object_phrase(shape: str, color: str, size: str) -> str:
    """A grounding phrase without position words, e.g. "a large red circle"."""
    return f"a {size} {color} {shape}"


class SyntheticChat(_SyntheticDataset):
    """LLaVA-style conversations about one scene, two scenes or a clip.

    Returns ``{"id", "images": [PIL], "conversations": [{"from": "human"|"gpt", "value"}...],
    "answers" (10 annotators for the last gpt turn), "task", "scenes": [Scene] (one per image)}``
    plus ``"video": [8 PIL frames]`` for ``task == "video"`` (then ``images`` and ``scenes`` are []).
    Kinds (uniform over ``kinds``): ``vqa`` 1-3 distinct `make_vqa` turns; ``describe`` a caption,
    then a VQA follow-up with p 0.5; ``count``; ``compare`` 1-2 questions on two different scenes;
    ``video`` a `SyntheticVideos` clip (same generation code, its own stream) and its motion question.
    """

    kind = "chat"

    def __init__(
        self, split: str = "train", size: int = 10000, image_size: int = 64, seed: int = 0,
        kinds: list[str] | None = None,
    ) -> None:  # fmt: skip
        """Args:
        split: one of ``SPLITS``.
        size: number of items.
        image_size: image side in pixels (>= 16).
        seed: data seed; ``(seed, split, index)`` fixes every byte of an item.
        kinds: task kinds to draw from (subset of ``CHAT_KINDS``); None for all.
        """
        super().__init__(split, size, image_size, seed)
        self.kinds = tuple(kinds) if kinds is not None else CHAT_KINDS
        bad = [k for k in self.kinds if k not in CHAT_KINDS]
        if not self.kinds or bad:
            raise ValueError(f"SyntheticChat: kinds={kinds!r}; expected a non-empty subset of {CHAT_KINDS}")
        self._videos = _ChatVideos(split, size, image_size, seed)

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        task = rng.choice(self.kinds)
        if task == "video":
            clip = self._videos[index]
            turns = [("<video>\n" + clip["question"], _majority(clip["answers"]))]
            return self._item(index, task, [], [], turns, clip["answers"], video=clip["frames"])
        scene = sample_scene(self.split, index, self.seed, stream="chat")
        scenes = [scene] if task != "compare" else [scene, self._other_scene(index, scene)]
        images = [self._render(s, rng) for s in scenes]
        heldout = self.split == "heldout"
        if task == "vqa":
            turns, answers = self._vqa_turns(scene, rng, rng.randint(1, 3), heldout)
        elif task == "describe":
            caption = make_captions(scene, rng, n=1)[0]
            turns, answers = [(rng.choice(_DESCRIBE), caption)], [caption] * 10
            if rng.random() < 0.5:
                more, answers = self._vqa_turns(scene, rng, 1, heldout)
                turns += more
        elif task == "count":
            count = str(len(scene.objects))
            turns, answers = [("how many shapes are there?", count)], _annotate(count, ["1", "2", "3"], rng)
        else:
            turns, answers = self._compare_turns(scenes, rng, heldout)
        q, a = turns[0]
        turns[0] = ("<image>\n" * len(images) + q, a)
        return self._item(index, task, images, scenes, turns, answers)

    def _render(self, scene: Scene, rng: random.Random) -> Image.Image:
        placed, noise = place(scene, rng.getrandbits(32))
        return render_placed(placed, scene.background, self.image_size, noise)

    def _other_scene(self, index: int, scene: Scene) -> Scene:
        """A second scene of the split with a different object tuple (bounded retries on another stream)."""
        for k in range(100):
            other = sample_scene(self.split, index, self.seed, stream=f"chat-compare/{k}")
            if other.key() != scene.key():
                return other
        raise RuntimeError(f"{self._id(index)}: no second scene differing from {scene.key()} in 100 tries")

    @staticmethod
    def _vqa_turns(scene: Scene, rng: random.Random, n: int, heldout: bool) -> tuple[list, list[str]]:
        """Up to ``n`` distinct `make_vqa` questions (fewer if 20 draws repeat) and the last one's answers."""
        turns, answers = [], []
        for _ in range(20):
            question, anns = make_vqa(scene, rng, allow_heldout=heldout)
            if all(question != q for q, _ in turns):
                turns.append((question, _majority(anns)))
                answers = anns
            if len(turns) == n:
                break
        return turns, answers

    @staticmethod
    def _compare_turns(scenes: list[Scene], rng: random.Random, heldout: bool) -> tuple[list, list[str]]:
        """1-2 distinct questions answerable from the two images together."""
        first, second = scenes
        counts = (len(first.objects), len(second.objects))
        pairs = [{(o.color, o.shape) for o in s.objects} for s in scenes]
        askable = []  # (question, answer, annotator pool)
        more = _MORE[0] if counts[0] > counts[1] else _MORE[1] if counts[1] > counts[0] else _MORE[2]
        askable.append(("which image has more shapes?", more, list(_MORE)))
        both, union = sorted(pairs[0] & pairs[1]), sorted(pairs[0] | pairs[1])
        allowed = [(c, s) for c in COLORS for s in SHAPES if heldout or (c, s) not in HELDOUT_PAIRS]
        color, shape = rng.choice(both if both and rng.random() < 0.5 else union if rng.random() < 0.7 else allowed)
        answer = "yes" if (color, shape) in pairs[0] & pairs[1] else "no"
        askable.append((f"is there a {color} {shape} in both images?", answer, ["yes", "no"]))
        for which, scene in (("first", first), ("second", second)):
            shapes = [o.shape for o in scene.objects]
            unique = [o for o in scene.objects if shapes.count(o.shape) == 1]
            if unique:
                obj = rng.choice(unique)
                askable.append((f"what color is the {obj.shape} in the {which} image?", obj.color, list(COLORS)))
        chosen = rng.sample(askable, rng.randint(1, 2))
        turns = [(q, a) for q, a, _ in chosen]
        return turns, _annotate(chosen[-1][1], chosen[-1][2], rng)

    def _item(self, index, task, images, scenes, turns, answers, video=None) -> dict:
        conversations = [{"from": role, "value": v} for q, a in turns for role, v in (("human", q), ("gpt", a))]
        item = {"id": self._id(index), "images": images, "conversations": conversations,
                "answers": list(answers), "task": task, "scenes": scenes}  # fmt: skip
        if video is not None:
            item["video"] = video
        return item


class _ChatVideos(SyntheticVideos):
    """`SyntheticVideos`' generation code, unchanged, on a stream of its own (chat clips differ from
    ``SyntheticVideos[index]`` of the same seed)."""

    kind = "chat-videos"


def _majority(answers: list[str]) -> str:
    return Counter(answers).most_common(1)[0][0]  # the true answer: >= 7 of 10 annotators give it


class SyntheticGen(_SyntheticDataset):
    """Instruction -> image items for Emu2-Gen-style tuning, one scene each.

    Returns ``{"id", "image" (target), "scene", "instruction", "boxes": [(phrase, (x1, y1, x2, y2))]
    (every object's tight box as fractions of the side, canonical order), "references": [PIL],
    "kind"}``. Kinds: ``subject`` with p ``subject_p`` (one object shown alone, centred on the same
    background, as a reference; its place in the instruction is the literal ``<image>``, followed by
    ``<p>this shape</p>`` and its box; the other objects are described with positions), else
    ``grounded`` with p ``grounded_p`` (every object as `grounded` phrase and box, phrase first with
    p 0.7, else box first), else ``t2i`` (a plain caption).

    With p ``edit_p`` an item is an ``edit`` instead (in-context generation, Emu2 §"in-context generation";
    `edits.py`): the source image is the reference at the instruction's ``<image>``, e.g. "<image> the same shape in
    blue.", the target scene and image are ``scene`` / ``image``, plus ``"edit"`` (one of ``EDIT_KINDS``, uniform over
    ``edits``) and ``"source_scene"``. The edit coin and the edit come from RNGs of their own, so the other items are
    byte for byte those of ``edit_p=0``.
    """

    kind = "gen"

    def __init__(
        self, split: str = "train", size: int = 10000, image_size: int = 64, seed: int = 0,
        grounded_p: float = 0.5, subject_p: float = 0.25, edit_p: float = 0.0, edits: list[str] | None = None,
    ) -> None:  # fmt: skip
        """Args:
        split: one of ``SPLITS``.
        size: number of items.
        image_size: image side in pixels (>= 16).
        seed: data seed; ``(seed, split, index)`` fixes every byte of an item.
        grounded_p: probability of a grounded instruction among non-subject items.
        subject_p: probability of a subject-driven item (reference image).
        edit_p: probability of an edit item (source image + edit instruction → edited scene); 0 = none.
        edits: edit kinds to draw from (subset of ``EDIT_KINDS``); None for all.
        """
        super().__init__(split, size, image_size, seed)
        for name, p in (("grounded_p", grounded_p), ("subject_p", subject_p), ("edit_p", edit_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"SyntheticGen: {name}={p}; expected a probability in [0, 1]")
        self.edits = tuple(edits) if edits is not None else EDIT_KINDS
        bad = [k for k in self.edits if k not in EDIT_KINDS]
        if not self.edits or bad:
            raise ValueError(f"SyntheticGen: edits={edits!r}; expected a non-empty subset of {EDIT_KINDS}")
        self.grounded_p, self.subject_p, self.edit_p = grounded_p, subject_p, edit_p

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        if self.edit_p > 0 and random.Random(f"{self._id(index)}/edit-coin").random() < self.edit_p:
            return self._edit(index)
        scene = sample_scene(self.split, index, self.seed, stream="gen")
        placed, noise = place(scene, rng.getrandbits(32))
        image = render_placed(placed, scene.background, self.image_size, noise)
        boxes = [(object_phrase(s, c, z), object_box(s, z, cx, cy)) for s, c, z, cx, cy in placed]
        kind = "subject" if rng.random() < self.subject_p else "grounded" if rng.random() < self.grounded_p else "t2i"
        references = []
        if kind == "t2i":
            instruction = make_captions(scene, rng, n=1)[0]
        elif kind == "grounded":
            parts = [grounded(p, box) if rng.random() < _PHRASE_FIRST_P else box_tokens(box) + f"<p>{p}</p>"
                     for p, box in boxes]  # fmt: skip
            instruction = f"a picture of {_join(parts)}."
        else:
            i = rng.randrange(len(placed))
            shape, color, size, _, _ = placed[i]
            references = [render_placed([(shape, color, size, 0.5, 0.5)], scene.background, self.image_size,
                                        rng.getrandbits(32))]  # fmt: skip
            parts = [f"<image> {grounded('this shape', boxes[i][1])}" if j == i else describe_object(o)
                     for j, o in enumerate(scene.objects)]  # fmt: skip
            instruction = f"a picture of {_join(parts)}."
        return {"id": self._id(index), "image": image, "scene": scene, "instruction": instruction,
                "boxes": boxes, "references": references, "kind": kind}  # fmt: skip

    def _edit(self, index: int) -> dict:
        rng = random.Random(f"emu-synth/gen-edit/{self.seed}/{self.split}/{index}")
        edit = make_edit(rng.choice(self.edits), self.split, rng)
        source, target, noise = place_edit(edit, rng.getrandbits(32))
        background = edit.source.background
        images = [render_placed(placed, background, self.image_size, noise) for placed in (source, target)]
        boxes = [(object_phrase(s, c, z), object_box(s, z, cx, cy)) for s, c, z, cx, cy in target]
        return {"id": self._id(index), "image": images[1], "scene": edit.target, "instruction": f"<image> {edit.text}",
                "boxes": boxes, "references": [images[0]], "kind": "edit", "edit": edit.kind,
                "source_scene": edit.source}  # fmt: skip
