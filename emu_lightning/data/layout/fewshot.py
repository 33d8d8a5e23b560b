"""The papers' evaluation prompts, the one place they live (docs/design.md §5, §6; docs/evaluation.md).

Few-shot in-context prompts of a pretrained (stage-2) model, demonstrations + query as document segments:
- captioning (Emu, arXiv:2307.05222, in-context): `{img}{caption}{img}{caption}…{img}` → the model continues with a
  caption;
- VQA (Emu2, arXiv:2312.13286): demos `{img} based on the picture, {q} short answer: {a}` joined by ". "; the query
  ends `short answer:`; with k = 0 the query says `answer in one word or phrase`;
- video QA: the same with `[VIDEO]` + frames and "based on the video".

Zero-shot prompts of a chat-tuned model (`instruct_segments`): Emu-I's captioning and VQA instructions (Emu,
arXiv:2307.05222, the release's evaluation prompts) in one user turn of the model's own chat template.

Demonstrations come from a training pool: a seeded random draw per query (the k-shot set is the prefix of
one draw, so 2 ⊂ 4 ⊂ 8), or RICES (the most similar pool images by frozen-encoder cosine, the most similar
placed next to the query).
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Any

import torch
from torch import Tensor

from emu_lightning.data.layout.chat import ChatTemplate
from emu_lightning.data.layout.sequence import vqa_text

TASKS = ("caption", "vqa", "videoqa")
# Emu-I's instructions (docs/design.md §5, from the release): captioning, and VQA answered in a word or phrase.
CAPTION_INSTRUCTION = "please provide an accurate and concise description of the given image."
VQA_INSTRUCTION = ("based on the content of the image and common sense, please provide an accurate answer consisting "
                   "of only one word or phrase. ")


def task_of(layout: str, sample: dict) -> str | None:
    """The few-shot task of an evaluation set, from its layout; None = losses only (e.g. documents)."""
    if layout == "pair":
        return "caption"
    if layout in ("vqa", "vqa_zero_shot"):   # vqa_zero_shot: trained on the zero-shot prompt (sequence.py)
        return "vqa"
    if layout == "video" and "question" in sample:
        return "videoqa"
    return None


def majority_answer(answers: list[str]) -> str:
    """The most common annotator answer (ties: the first given), used as a demonstration's answer."""
    return Counter(answers).most_common(1)[0][0]


def _visual(task: str, s: dict) -> tuple[str, Any]:
    return ("video", s["frames"]) if task == "videoqa" else ("image", s["image"])


def _qa(task: str, question: str, answer: str | None = None, zero_shot: bool = False) -> str:
    text = vqa_text(question, answer, zero_shot)
    return text.replace("the picture", "the video") if task == "videoqa" else text


def few_shot_segments(task: str, demos: list[dict], query: dict) -> list[tuple[str, Any]]:
    """Segments of one few-shot prompt: each demonstration in order, then the query."""
    if task not in TASKS:
        raise ValueError(f"few-shot task {task!r} is not one of {TASKS}")
    segs: list[tuple[str, Any]] = []
    for d in demos:
        if task == "caption":
            segs += [_visual(task, d), ("text", d["captions"][0])]
        else:
            segs += [_visual(task, d), ("text", _qa(task, d["question"], majority_answer(d["answers"])) + ". ")]
    segs.append(_visual(task, query))
    if task != "caption":
        segs.append(("text", _qa(task, query["question"], zero_shot=not demos)))
    return segs


def instruct_segments(task: str, query: dict, template: ChatTemplate) -> list[tuple[str, Any]]:
    """A chat-tuned model's zero-shot prompt: the query's image and Emu-I's instruction (for VQA followed by the
    question) in one user turn, ending with the template's generation prompt."""
    if task == "caption":
        text = CAPTION_INSTRUCTION
    elif task == "vqa":
        text = VQA_INSTRUCTION + query["question"]
    else:
        raise ValueError(f"instruct task {task!r}; expected 'caption' or 'vqa'")
    return template.segments([("user", [("image", query["image"]), ("text", text)])], prompt=True)


def random_demos(pool_size: int, k: int, key: str, max_k: int = 8, seed: int = 0) -> list[int]:
    """k pool indices for the query `key`: the first k of one seeded draw of max(k, max_k)."""
    if k > pool_size:
        raise ValueError(f"{k} demonstrations requested from a pool of {pool_size}")
    draw = random.Random(f"{seed}-{key}").sample(range(pool_size), min(pool_size, max(k, max_k)))
    return draw[:k]


def rices_demos(query_feats: Tensor, pool_feats: Tensor, k: int) -> Tensor:
    """(B,D) query and (P,D) pool features → (B,k) pool indices, least to most similar (most similar last)."""
    sims = torch.nn.functional.normalize(query_feats.float(), dim=-1) @ \
        torch.nn.functional.normalize(pool_feats.float(), dim=-1).T   # (B,P) cosine
    return sims.topk(k, dim=-1).indices.flip(-1)


def first_answer(text: str) -> str:
    """A generated answer up to its first period or line break (demonstrations end with ". ")."""
    return text.split("\n")[0].split(".")[0].strip()
