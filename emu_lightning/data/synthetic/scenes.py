"""Deterministic synthetic shape scenes: captions, VQA, interleaved documents and videos.

The small-scale stand-in for LAION/COCO (captions), VQAv2 (VQA), MMC4 (documents) and
WebVid/YT-Storyboard (videos). Every sample is a pure function of ``(seed, split, index)``,
rendered on the fly with PIL (~0.5 ms at 64 px), so no files and no cache.

Splits are disjoint *by construction*: a scene's object tuple is hashed (blake2b, stable across
processes) into 100 buckets, train owns buckets 0-79, val 80-89, test 90-99; scenes holding any
colour-shape pair of ``HELDOUT_PAIRS`` never enter those three and are exactly the ``heldout``
split (compositional generalisation). Captions list objects in canonical (row-major cell) order
with a parseable per-object grammar, so ``attribute_accuracy`` can score generated captions.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from emu_lightning.data.synthetic.text import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    SYNONYMS,
    Obj,
    Scene,
    attribute_accuracy,
    describe_object,
    describe_scene,
    document_story,
    has_heldout_pair,
    make_captions,
    make_video_qa,
    make_vqa,
    object_hits,
    parse_caption,
    video_subtitles,
    vocabulary_sentences,
)

__all__ = [
    "BACKGROUNDS", "COLORS", "HELDOUT_PAIRS", "POSITIONS", "SHAPES", "SIZES", "SPLITS", "SYNONYMS",
    "NUM_FRAMES",
    "Obj", "Scene", "SyntheticCaptions", "SyntheticDocuments", "SyntheticVQA", "SyntheticVideos",
    "attribute_accuracy", "caption_corpus", "describe_object", "describe_scene", "in_split", "object_hits",
    "parse_caption", "place",
    "render", "render_placed", "sample_scene", "scene_bucket",
]  # fmt: skip

SPLITS: tuple[str, ...] = ("train", "val", "test", "heldout")
_BUCKETS: dict[str, range] = {"train": range(0, 80), "val": range(80, 90), "test": range(90, 100)}
_MAX_TRIES = 2000  # rejection sampling; val needs ~15 tries on average
_SUPERSAMPLE = 2  # draw at 2x, box-downsample: anti-aliased edges keep small stars legible
NUM_FRAMES = 8


def scene_bucket(scene: Scene) -> int:
    """Stable bucket in [0, 100) of the scene's object tuple (never Python's salted ``hash``)."""
    digest = hashlib.blake2b(repr(scene.key()).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100


def in_split(scene: Scene, split: str) -> bool:
    """Whether ``scene`` belongs to ``split``; a property of the scene alone, not of the seed."""
    if split == "heldout":
        return has_heldout_pair(scene.objects)
    return not has_heldout_pair(scene.objects) and scene_bucket(scene) in _BUCKETS[split]


def random_objects(rng: random.Random, n: int, cells: list[int] | None = None) -> tuple[Obj, ...]:
    """``n`` random objects in distinct random cells (or the given ``cells``), canonical order."""
    cells = sorted(cells if cells is not None else rng.sample(range(9), n))
    return tuple(
        Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)), POSITIONS[c])
        for c in cells
    )


def sample_scene(split: str = "train", index: int = 0, seed: int = 0, stream: str = "scene") -> Scene:
    """The scene of ``(seed, split, index)``: rejection-sampled until it lies in ``split``.

    Args:
        split: one of ``SPLITS``.
        index: sample index within the split.
        seed: global data seed; distinct seeds give distinct scene streams.
        stream: stream name, so captions and documents draw independent scenes.
    """
    _check_split(split)
    rng = random.Random(f"emu-synth/{stream}/{seed}/{split}/{index}")
    for _ in range(_MAX_TRIES):
        n = rng.choices((1, 2, 3), weights=(1, 2, 2))[0]
        scene = Scene(random_objects(rng, n), rng.choice(list(BACKGROUNDS)))
        if in_split(scene, split):
            return scene
    raise RuntimeError(f"no {split!r} scene after {_MAX_TRIES} tries (seed={seed}, index={index})")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    """Draw ``shape`` centred at (cx, cy) with half-side ``r`` pixels."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = 0.88 * r  # a square fills its box; shrink so its area is comparable to the others
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif shape == "diamond":  # narrower than tall, so it never reads as a rotated square
        draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=fill)
    elif shape == "star":
        angles = [np.pi / 2 + k * np.pi / 5 for k in range(10)]
        radii = [r if k % 2 == 0 else 0.42 * r for k in range(10)]
        draw.polygon([(cx + q * np.cos(a), cy - q * np.sin(a)) for a, q in zip(angles, radii)], fill=fill)
    elif shape == "cross":
        w = 0.34 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_placed(
    placed: list[tuple[str, str, str, float, float]], background: str, image_size: int = 64, seed: int = 0
) -> Image.Image:
    """Render ``(shape, color, size, cx, cy)`` objects (centres as fractions of the side).

    Args:
        placed: objects with continuous centres in [0, 1].
        background: a ``BACKGROUNDS`` name.
        image_size: output side in pixels.
        seed: seed of the mild background noise.
    """
    side = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    for shape, color, size, cx, cy in placed:
        _draw_shape(draw, shape, cx * side, cy * side, SIZES[size] * side / 2, COLORS[color])
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    # Mild luminance-only noise: breaks flat colours without shifting hue.
    noise = np.random.default_rng(seed).integers(-6, 7, size=(image_size, image_size, 1), dtype=np.int16)
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def place(scene: Scene, seed: int = 0) -> tuple[list[tuple[str, str, str, float, float]], int]:
    """Where ``render`` draws each object: ``(shape, color, size, cx, cy)`` with a small deterministic jitter
    inside its cell, and the seed of the background noise (``render_placed(placed, bg, size, noise_seed)``)."""
    rng = random.Random(f"emu-synth/render/{seed}")
    placed = []
    for o in scene.objects:
        row, col = divmod(POSITIONS.index(o.position), 3)
        slack = max(0.0, (1 / 3 - SIZES[o.size]) / 2) * 0.8  # keep the object inside its cell
        cx = (col + 0.5) / 3 + rng.uniform(-slack, slack)
        cy = (row + 0.5) / 3 + rng.uniform(-slack, slack)
        placed.append((o.shape, o.color, o.size, cx, cy))
    return placed, rng.getrandbits(32)


def render(scene: Scene, image_size: int = 64, seed: int = 0) -> Image.Image:
    """Render ``scene`` with a small deterministic jitter of each object inside its cell (see `place`).

    Args:
        scene: the scene to draw.
        image_size: output side in pixels.
        seed: seed of placement jitter and noise; same seed, same bytes.
    """
    placed, noise_seed = place(scene, seed)
    return render_placed(placed, scene.background, image_size, noise_seed)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")


class _SyntheticDataset(Dataset):
    """Shared index checks and per-item RNG of the synthetic datasets."""

    kind = "base"

    def __init__(self, split: str = "train", size: int = 10000, image_size: int = 64, seed: int = 0) -> None:
        """Args:
        split: one of ``SPLITS``.
        size: number of items.
        image_size: image side in pixels (>= 16).
        seed: data seed; ``(seed, split, index)`` fixes every byte of an item.
        """
        _check_split(split)
        if size < 1 or image_size < 16:
            raise ValueError(
                f"{type(self).__name__}: size={size} must be >= 1, image_size={image_size} >= 16"
            )
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        if not 0 <= index < self.size:
            raise IndexError(f"{type(self).__name__}({self.split}): index {index} outside [0, {self.size})")
        return random.Random(f"emu-synth/{self.kind}/{self.seed}/{self.split}/{index}")

    def _id(self, index: int) -> str:
        return f"synth-{self.kind}-{self.seed}-{self.split}-{index:07d}"


class SyntheticCaptions(_SyntheticDataset):
    """Image-caption pairs: ``{"id", "image", "captions" (5 paraphrases), "scene"}``."""

    kind = "captions"

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        scene = sample_scene(self.split, index, self.seed)
        image = render(scene, self.image_size, rng.getrandbits(32))
        return {"id": self._id(index), "image": image, "captions": make_captions(scene, rng), "scene": scene}


class SyntheticVQA(_SyntheticDataset):
    """One question per item about the same scene as ``SyntheticCaptions[index]``.

    Returns ``{"id", "image", "question", "answers" (10 annotators), "scene"}``.
    """

    kind = "vqa"

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        scene = sample_scene(self.split, index, self.seed)
        image = render(scene, self.image_size, rng.getrandbits(32))
        question, answers = make_vqa(scene, rng, allow_heldout=self.split == "heldout")
        return {
            "id": self._id(index), "image": image, "question": question, "answers": answers, "scene": scene
        }  # fmt: skip


class SyntheticDocuments(_SyntheticDataset):
    """Interleaved stories: 2-5 (image, sentence) steps of an evolving scene.

    The first scene lies in ``split``; later steps (move / recolour / appear) never introduce a
    held-out pair outside ``heldout``. Returns ``{"id", "images", "texts"}`` of equal length.
    """

    kind = "documents"

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        first = sample_scene(self.split, index, self.seed, stream="documents")
        scenes, texts = document_story(first, rng, allow_heldout=self.split == "heldout")
        images = [render(s, self.image_size, rng.getrandbits(32)) for s in scenes]
        return {"id": self._id(index), "images": images, "texts": texts}


class SyntheticVideos(_SyntheticDataset):
    """8-frame clips of 1-2 shapes moving in two segments, one subtitle per frame.

    Frames 0-3 share the first segment's subtitle and 4-7 the second's (merge adjacent duplicates
    for YT-Storyboard layouts). One motion question per clip (see `make_video_qa`). Returns
    ``{"id", "frames" (8), "subtitles" (8), "question", "answers" (10 annotators)}``.
    """

    kind = "videos"
    step = 0.06  # displacement per frame, fraction of the side

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        for _ in range(_MAX_TRIES):
            n = rng.randint(1, 2)
            objs = [(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))) for _ in range(n)]
            held = any((c, s) in HELDOUT_PAIRS for s, c, _ in objs)
            if held == (self.split == "heldout"):
                break
        else:
            raise RuntimeError(f"{self._id(index)}: no valid object draw after {_MAX_TRIES} tries")
        moves = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
        tracks, directions = [], []
        for _, _, size in objs:
            lo, hi = SIZES[size] / 2, 1 - SIZES[size] / 2
            pos = [rng.uniform(lo, hi), rng.uniform(lo, hi)]
            track, dirs = [tuple(pos)], []
            for n_steps in (3, 4):  # segment 1: frames 1-3; segment 2: frames 4-7
                reach = n_steps * self.step
                ok = [d for d, (dx, dy) in moves.items()
                      if lo <= pos[0] + reach * dx <= hi and lo <= pos[1] + reach * dy <= hi]
                d = rng.choice(ok)  # never empty: the free range (>= 0.68) exceeds 2 * 4 * step
                dirs.append(d)
                for _ in range(n_steps):
                    pos = [pos[0] + self.step * moves[d][0], pos[1] + self.step * moves[d][1]]
                    track.append(tuple(pos))
            tracks.append(track)
            directions.append(dirs)
        background = rng.choice(list(BACKGROUNDS))
        frames = [
            render_placed([(s, c, z, *tr[t]) for (s, c, z), tr in zip(objs, tracks)], background,
                          self.image_size, rng.getrandbits(32))
            for t in range(NUM_FRAMES)
        ]  # fmt: skip
        subtitles = video_subtitles(objs, directions, NUM_FRAMES)
        # A separate, string-seeded RNG drawn last: frames and subtitles stay what they were before QA.
        question, answers = make_video_qa(objs, directions, random.Random(f"{self._id(index)}-qa"))
        return {
            "id": self._id(index), "frames": frames, "subtitles": subtitles, "question": question, "answers": answers
        }  # fmt: skip


def caption_corpus(seed: int = 0, n: int = 2000) -> Iterator[str]:
    """Texts covering the whole synthetic vocabulary, for training the tokenizer.

    Yields every vocabulary sentence first (all words, synonyms and digits), then the captions,
    VQA questions and answers, document sentences and video subtitles of the first ``n`` train
    items. No images are rendered.

    Args:
        seed: data seed.
        n: number of train items per source.
    """
    yield from vocabulary_sentences()
    for i in range(n):
        rng = random.Random(f"emu-synth/corpus/{seed}/{i}")
        scene = sample_scene("train", i, seed)
        yield from make_captions(scene, rng)
        question, answers = make_vqa(scene, rng, allow_heldout=False)
        yield question
        yield from sorted(set(answers))
        first = sample_scene("train", i, seed, stream="documents")
        yield from document_story(first, rng, allow_heldout=False)[1]
        yield describe_scene(scene)
