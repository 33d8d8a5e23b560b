"""The generation loop every text protocol shares: batches of queries, each after its k demonstrations.

Demonstrations come from a pool (a training split), chosen per query as the in-loop evaluation does
(`systems/multimodal_eval.py`, docs/design.md §6): `random` (a seeded draw per query id, so the 2-shot set is a
prefix of the 4-shot one) or `rices` (the k pool images most similar by frozen-encoder cosine, the most similar
placed next to the query). Every query is answered: nothing is skipped, so the result files always cover the
whole question or image set.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from emu_lightning.data.layout.fewshot import random_demos
from emu_lightning.evaluate.model import PromptedModel

SELECTIONS = ("random", "rices")


def pool_features(model: PromptedModel, pool: Dataset, batch_size: int = 64) -> torch.Tensor:
    """(P,D_enc) RICES features of a whole demonstration pool (computed once per run: the encoder is frozen)."""
    out = []
    for start in range(0, len(pool), batch_size):
        out.append(model.features([pool[i]["image"] for i in range(start, min(start + batch_size, len(pool)))]))
    return torch.cat(out)


def generate_all(model: PromptedModel, task: str, data: Dataset, shots: int = 0, selection: str = "random",
                 pool: Dataset | None = None, batch_size: int = 8, max_shots: int = 8, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> list[str]:
    """One generated text per item of `data`, in order.

    Args:
        model: the prompted model.
        task: "caption" or "vqa".
        data: the evaluation set (items with "id", "image" and, for VQA, "question").
        shots: demonstrations per query (k).
        selection: "random" or "rices".
        pool: the demonstration pool (items with "image" and "captions", or "question" and "answers"); needed when
            shots > 0.
        batch_size: queries per generate call.
        max_shots: the largest k of the run: random draws of max(k, max_shots) are cut to k, so smaller k are prefixes.
        seed: the random draws' seed.
        progress: called with (done, total) after each batch.
    """
    model.check(task, shots)
    if shots > 0 and pool is None:
        raise ValueError(f"{shots}-shot evaluation needs a demonstration pool (--demo-* files)")
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}; expected one of {SELECTIONS}")
    feats = pool_features(model, pool) if shots > 0 and selection == "rices" else None
    texts: list[str] = []
    for start in range(0, len(data), batch_size):
        queries = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        demos: Sequence[Sequence[dict]] | None = None
        if shots > 0:
            picks = (model.rices(queries, feats, shots) if feats is not None
                     else [random_demos(len(pool), shots, str(q["id"]), max_shots, seed) for q in queries])
            demos = [[pool[j] for j in row] for row in picks]
        texts += model.generate(task, queries, demos)
        if progress is not None:
            progress(len(texts), len(data))
    return texts
