"""Source mixture: every training step takes a fixed number of samples from each source (EMU_SPEC §3).

The papers batch *per source per step* (Emu2 stage 2: image-text 12800, video 6400, interleaved 3200, ...).
Recipe weights become per-step counts by largest remainder, so a source's share is exact at every step
and its loss can be logged on its own. Map-style sources are read in a fresh seeded permutation each pass,
sharded over ranks and workers; an iterable source (tar shards) shards itself and is restarted when it
ends. Each yielded item is one whole step's list of documents, laid out and image-transformed in the worker.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from emu_lightning.data.sequence import Layout, SkipSample


def step_counts(weights: dict[str, float], batch_size: int) -> dict[str, int]:
    """Per-step sample count of each source: weights × batch_size, rounded by largest remainder."""
    if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"source weights must be non-negative with a positive sum, got {weights}")
    total = sum(weights.values())
    exact = {k: w / total * batch_size for k, w in weights.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: batch_size - sum(counts.values())]:
        counts[k] += 1
    empty = [k for k, w in weights.items() if w > 0 and counts[k] == 0]
    if empty:
        raise ValueError(f"sources {empty} get 0 of batch_size={batch_size} samples per step with weights "
                         f"{weights}: raise batch_size or their weight")
    return counts


def _shard() -> tuple[int, int]:
    """(this reader's index, number of readers) over ranks × DataLoader workers."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    return rank * nw + wid, world * nw


class SourceMixture(IterableDataset):
    """Endless stream of per-step document lists drawn from named sources.

    Args:
        sources: name → dataset yielding raw samples (synthetic or real-format dicts).
        counts: name → samples per step (see `step_counts`).
        layouts: name → `Layout` that turns a sample into segments.
        prepare: image transform applied to every PIL image of a sample (images, frames).
        seed: base of the per-pass permutations of map-style sources.
        max_skips: a source that skips this many samples in a row raises (a filter that rejects everything).
    """

    def __init__(self, sources: dict[str, Dataset], counts: dict[str, int], layouts: dict[str, Layout],
                 prepare: Callable[[Any], Any], seed: int = 0, max_skips: int = 1000):
        self.sources, self.counts, self.layouts = sources, counts, layouts
        self.prepare, self.seed, self.max_skips = prepare, seed, max_skips

    def _samples(self, name: str) -> Iterator[dict]:
        ds = self.sources[name]
        me, readers = _shard()
        for epoch in itertools.count():
            if isinstance(ds, IterableDataset):
                yield from ds  # shards itself over ranks and workers (e.g. WebDatasetPairs)
                continue
            # Every reader draws the same permutation of this pass and keeps its own slice of it.
            salt = sorted(self.sources).index(name)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + salt)
            for i in torch.randperm(len(ds), generator=g)[me::readers].tolist():
                yield ds[i]

    def __iter__(self) -> Iterator[list[dict]]:
        streams = {name: self._samples(name) for name in self.counts}
        while True:
            step: list[dict] = []
            for name, n in self.counts.items():
                skipped = 0
                for _ in range(n):
                    while True:
                        sample = next(streams[name])
                        try:
                            segments = self.layouts[name](sample)
                            break
                        except SkipSample:
                            skipped += 1
                            if skipped >= self.max_skips:
                                raise RuntimeError(f"source {name!r}: {skipped} samples skipped in one step; "
                                                   f"last: {sample.get('id')!r}") from None
                    step.append({"id": sample.get("id"), "source": name, "skipped": skipped,
                                 "segments": [(k, self._prep(v)) for k, v in segments]})
                    skipped = 0
            yield step

    def _prep(self, value: Any) -> Any:
        if isinstance(value, str):
            return value
        return [self.prepare(v) for v in value] if isinstance(value, list) else self.prepare(value)
