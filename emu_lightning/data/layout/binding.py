"""Fast-binding episodes as document segments (`emu_lightning/data/synthetic/episodes.py`).

An episode sample is `{"images", "texts", "answer", "episode": {"prompt", ...}}` with image i followed by text i,
the last pair being the query and its question + answer. Two uses, one ordering:

- training and the teacher-forced evaluation losses (layout `binding`): every demonstration, then the query image
  and `question answer.` — always image before its sentence (unlike `interleaved`, whose training order is
  random: "this is a dafu." must follow the image it names);
- the in-loop metric: the first k demonstrations, the query image and the question without its answer, so the
  k-shot prompt is, token for token, a prefix of what training wrote (with k = the episode's demonstrations).
"""
from __future__ import annotations

from typing import Any


def _check(s: dict) -> None:
    images, texts = s.get("images", []), s.get("texts", [])
    if len(images) != len(texts) or not images:
        raise ValueError(f"episode {s.get('id')!r}: {len(images)} images and {len(texts)} texts; expected equal, "
                         f"> 0 (each image followed by its sentence, the last pair the query)")


def binding_segments(s: dict) -> list[tuple[str, Any]]:
    """The whole episode, each image before its sentence, the query's sentence with its answer."""
    _check(s)
    segs: list[tuple[str, Any]] = []
    for image, text in zip(s["images"], s["texts"]):
        segs += [("image", image), ("text", text)]
    return segs


def binding_prompt(s: dict, k: int) -> list[tuple[str, Any]]:
    """The k-shot prompt of an episode: its first k demonstrations, the query image, the question (no answer)."""
    _check(s)
    demos = len(s["images"]) - 1
    if not 0 <= k <= demos:
        raise ValueError(f"episode {s.get('id')!r}: k={k} demonstrations requested, it has {demos}")
    segs = binding_segments({"images": s["images"][:k], "texts": s["texts"][:k]}) if k else []
    return [*segs, ("image", s["images"][-1]), ("text", s["episode"]["prompt"])]
