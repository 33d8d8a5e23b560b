"""Source mixture: every training step takes a fixed number of samples from each source (docs/design.md §3).

The papers batch *per source per step* (Emu2 stage 2: image-text 12800, video 6400, interleaved 3200, ...).
Recipe weights become per-step counts by largest remainder, so a source's share is exact at every step
and its loss can be logged on its own. Map-style sources are read in a fresh seeded permutation each pass,
sharded over ranks and workers; an iterable source (tar shards) shards itself, as the reader the mixture
names: a resumable one (`stream(reader, readers, position)`, e.g. `WebDatasetPairs`) is endless and names its
position, another (`iter_shard(reader, readers)`) is restarted when it ends. Each yielded item is one whole step's
list of documents, laid out and image-transformed in the worker.

Resumable: each step carries the position of its reader after it (`Step.state`: per source the pass and the
offset in it, and the step count). The layouts' random draws (caption pick, text/image order) come from a
generator seeded by (seed, reader, step), not from the process RNG, so a step is a pure function of that
position. `ResumableLoader` records the state of each step the model actually trained on and Lightning saves
it in the checkpoint; on resume every reader starts where its last consumed step ended, and DataLoader workers
take the roles they would have had next, so the resumed stream is the uninterrupted one, batch for batch. On several
ranks the checkpoint holds every rank's readers (docs/scale.md, "Resuming on several ranks").
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from emu_lightning.data.layout.sequence import Layout, SkipSample
from emu_lightning.data.modules.ranks import check_world, gather, own_readers, rank_world, reader_role
from emu_lightning.data.modules.workers import ignore_sigterm


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


class Step(list):
    """One step's documents, plus `state`: where its reader stands after it (see the module docstring)."""

    state: dict


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

    resume: dict | None = None  # set by `ResumableLoader.load_state_dict` before the workers start

    def _samples(self, name: str, pos: list[int], me: int, readers: int) -> Iterator[dict]:
        """Samples of source `name` from `pos` = [pass, offset in this reader's slice of it]; `pos` is advanced
        in place before each sample is handed out, so it always names the next one."""
        ds = self.sources[name]
        if isinstance(ds, IterableDataset) and hasattr(ds, "stream"):
            # A resumable stream (e.g. WebDatasetPairs): endless, it names the position after each sample itself and
            # starts from one without re-reading what came before it.
            for sample, (pass_, drawn) in ds.stream(me, readers, (pos[0], pos[1])):
                pos[0], pos[1] = pass_, drawn
                yield sample
            return
        for epoch in itertools.count(pos[0]):
            if isinstance(ds, IterableDataset):
                # Shards itself; a resume re-reads `offset` samples. After a resume a worker plays another reader
                # (`reader_role`), so a source that can be told which one (`iter_shard`) is told.
                stream = ds.iter_shard(me, readers) if hasattr(ds, "iter_shard") else iter(ds)
                items = itertools.islice(stream, pos[1], None)
            else:
                # Every reader draws the same permutation of this pass and keeps its own slice of it.
                salt = sorted(self.sources).index(name)
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + salt)
                order = torch.randperm(len(ds), generator=g)[me::readers].tolist()
                items = (self._read(ds, i) for i in order[pos[1]:])
            for sample in items:
                pos[1] += 1
                yield sample
            pos[0], pos[1] = epoch + 1, 0

    @staticmethod
    def _read(ds: Dataset, index: int) -> dict | SkipSample:
        # A sample that cannot be read (e.g. `BadImage`) comes back as its SkipSample, to be counted by the step.
        try:
            return ds[index]
        except SkipSample as err:
            return err

    def _start(self, me: int) -> dict:
        """This reader's starting position: fresh, or the one recorded in `resume` (a reader with none there had
        consumed no step yet)."""
        fresh = {"step": 0, "sources": {name: [0, 0] for name in self.counts}}
        state = (self.resume or {}).get("readers", {}).get(str(me), fresh)
        if set(state["sources"]) != set(self.counts):
            raise ValueError(f"the checkpoint's data position covers sources {sorted(state['sources'])}, this run "
                             f"reads {sorted(self.counts)}")
        return {"step": state["step"], "sources": {k: list(v) for k, v in state["sources"].items()}}

    def __iter__(self) -> Iterator[Step]:
        me, readers, nw = reader_role(self.resume["offset"] if self.resume else 0)
        state = self._start(me)
        blind = [n for n, ds in self.sources.items()
                 if isinstance(ds, IterableDataset) and not hasattr(ds, "iter_shard") and not hasattr(ds, "stream")]
        if blind and self.resume and self.resume["offset"] % nw:
            warnings.warn(f"streamed sources {blind} shard by worker id and take no reader role (`iter_shard`): "
                          f"after this resume their workers read other readers' samples (not the exact stream)")
        streams = {name: self._samples(name, state["sources"][name], me, readers) for name in self.counts}
        while True:
            step = Step()
            # The layouts' draws come from (seed, reader, step), never from the process RNG (see the docstring).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(((self.seed * 1_000_003 + me) * 1_000_033 + state["step"]) % 2**63)
                for name, n in self.counts.items():
                    for _ in range(n):
                        step.append(self._document(name, streams[name]))
            state["step"] += 1
            step.state = {"reader": me, "workers": nw, "step": state["step"],
                          "sources": {k: list(v) for k, v in state["sources"].items()}}
            yield step

    def _document(self, name: str, stream: Iterator[dict]) -> dict:
        """The next sample of `stream` that its layout accepts, laid out. The samples read past are counted on the
        document by kind (`{kind: n}`, e.g. `bad_image`), with those a stream source counted itself and hands on
        with its next sample (`sample["skipped"]`, e.g. `WebDatasetPairs`): the collator sums them into the
        batch's `skipped`, which the system logs as `train/skipped/<kind>` and bounds by `max_bad_fraction`."""
        skipped: dict[str, int] = {}
        misses = 0                                                     # samples this loop read past in a row
        while True:
            sample = next(stream)
            try:
                if isinstance(sample, SkipSample):
                    raise sample
                for kind, n in (sample.get("skipped") or {}).items():   # skipped inside a stream source
                    skipped[kind] = skipped.get(kind, 0) + int(n)
                segments = self.layouts[name](sample)
                break
            except SkipSample as err:
                skipped[err.kind] = skipped.get(err.kind, 0) + 1
                misses += 1
                warnings.warn(f"source {name!r}: sample skipped and counted: {err}")
                if misses >= self.max_skips:
                    raise RuntimeError(f"source {name!r}: {misses} samples skipped in a row ({skipped}); "
                                       f"last: {err}") from None
        return {"id": sample.get("id"), "source": name, "skipped": skipped,
                "segments": [(k, self._prep(v)) for k, v in segments],
                "regress": getattr(segments, "regress", "all"), "targets": getattr(segments, "targets", None)}

    def _prep(self, value: Any) -> Any:
        if isinstance(value, str):
            return value
        return [self.prepare(v) for v in value] if isinstance(value, list) else self.prepare(value)


class ResumableLoader(DataLoader):
    """DataLoader over a stream whose items carry their reader's position, kept in checkpoints (`state_dict`): a
    `SourceMixture` (each item a whole step) or stage 1's resumable caption stream (batched here).

    The loader runs ahead of training (workers, Lightning's prefetch), so the position is not what it yielded but
    what the model consumed: the datamodule reports each training batch's `stream_state` via `consumed`. Each
    `__iter__` (an epoch) starts every reader where its last consumed batch left it, the workers in the roles they
    would have had next; a stream with epochs therefore needs fresh workers each epoch (`persistent_workers=False`).

    On several ranks `state_dict` gathers every rank's readers into the checkpoint and `load_state_dict` keeps this
    rank's; a checkpoint from another number of ranks (or of workers) is refused, naming both (docs/scale.md).
    """

    def __init__(self, dataset: IterableDataset, **kwargs: Any):
        kwargs.setdefault("batch_size", None)
        kwargs.setdefault("worker_init_fn", ignore_sigterm)
        super().__init__(dataset, **kwargs)
        self.readers: dict[str, dict] = {}   # reader index → its position after its last consumed batch
        self.steps = 0                       # batches consumed since the stream began (on this rank)
        self.epoch = 0                       # the epoch being read (its `__iter__` count, restored on resume)
        self._next_epoch = 0
        self.workers = max(1, self.num_workers)

    def consumed(self, state: dict) -> None:
        self.readers[str(state["reader"])] = {k: v for k, v in state.items() if k not in ("reader", "workers")}
        self.steps += 1

    def __iter__(self):
        self.epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        self.dataset.resume = {"readers": dict(self.readers), "workers": self.workers,
                               "offset": self.steps % self.workers, "epoch": self.epoch}
        return super().__iter__()

    def _local_state(self) -> dict:
        return {"steps": self.steps, "epoch": self.epoch, "workers": self.workers, "readers": dict(self.readers)}

    @staticmethod
    def merge(ranks: list[dict]) -> dict:
        """One checkpoint entry from every rank's `_local_state` (in rank order): the readers of all ranks. The ranks
        consume batches in lockstep, so their step and epoch counts agree; a disagreement is an error."""
        counts = [(r["steps"], r["epoch"], r["workers"]) for r in ranks]
        if len(set(counts)) != 1:
            raise RuntimeError(f"the ranks' training loaders disagree on (steps consumed, epoch, workers): {counts}; "
                               "every rank must train the same number of batches")
        steps, epoch, workers = counts[0]
        readers = {k: v for r in ranks for k, v in r["readers"].items()}
        return {"steps": steps, "epoch": epoch, "workers": workers, "offset": steps % workers,
                "world_size": len(ranks), "readers": readers}

    def state_dict(self) -> dict:
        return self.merge(gather(self._local_state()))

    def load_state_dict(self, state: dict) -> None:
        rank, world = rank_world()
        check_world(state.get("world_size", 1), world, "data stream")
        if state["workers"] != self.workers:
            raise ValueError(f"the checkpoint's data position was saved with {state['workers']} DataLoader workers "
                             f"per rank, this run has {self.workers}: set num_workers={state['workers']} to resume "
                             f"exactly (each worker is a reader with its own shards and place in them)")
        self.steps, self.workers = state["steps"], state["workers"]
        self.readers = own_readers(state["readers"], rank, self.workers)
        self.epoch = self._next_epoch = state.get("epoch", 0)
