"""One datamodule for stage-1 image-text data: synthetic scenes by default, COCO JSON or tar shards by recipe.

Datasets are injected by `class_path` (any map-style or iterable dataset yielding
`{"id", "image": PIL, "captions": [str, ...]}`), so a real source is a recipe change, not a code change.
The tokenizer and N (`<image>` tokens per image) come from the model: the CLI links them.
"""
from __future__ import annotations

import itertools
import warnings
from typing import Any, Iterator

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from torchvision.transforms import v2 as T
import torch

from emu_lightning.data.layout.collate import CaptionCollator
from emu_lightning.data.layout.sequence import SkipSample
from emu_lightning.data.modules.mixture import ResumableLoader
from emu_lightning.data.modules.ranks import broadcast, gather, reader_role
from emu_lightning.data.modules.workers import ignore_sigterm

MAX_SKIPS_PER_READ = 32            # unreadable samples in a row before a read gives up
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # docs/design.md §1 preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """(n,3,H,W) CLIP-normalised → [0,1] pixels (on the images' device)."""
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def image_transform(size: int) -> T.Compose:
    """Resize (bicubic) → [0,1] → CLIP normalisation: PIL → (3,size,size) float."""
    return T.Compose([T.ToImage(), T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC,
                                            antialias=True),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(CLIP_MEAN, CLIP_STD)])


def _prepare(sample: dict, transform: T.Compose, train: bool, rng: torch.Generator | None = None) -> dict:
    caps = sample["captions"]
    if not caps:
        raise ValueError(f"sample {sample.get('id')!r}: empty 'captions' list")
    # The training caption is a fresh draw among the references each time the sample is read: every reference
    # gets trained on across epochs. A map-style set draws from `rng` (a function of the epoch's order seed and
    # the index, so a resumed run replays it); a stream draws from the torch RNG that
    # `seed_everything(workers=True)` seeds per worker. Evaluation uses reference 0.
    pick = int(torch.randint(len(caps), (), generator=rng)) if train else 0
    return {**sample, "image": transform(sample["image"]), "caption": caps[pick]}


class _Mapped(Dataset):
    def __init__(self, ds: Dataset, transform: T.Compose, train: bool):
        self.ds, self.transform, self.train = ds, transform, train

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, seed = key if isinstance(key, tuple) else (key, None)    # (index, epoch seed) from `EpochSampler`
        sample, skipped = self._read(i)
        rng = None if seed is None else torch.Generator().manual_seed((seed * 1_000_003 + i) % 2**63)
        return {**_prepare(sample, self.transform, self.train, rng), "skipped": skipped}

    def _read(self, i: int) -> tuple[dict, dict[str, int]]:
        """`ds[i]`, or, when it raises `SkipSample` (an undecodable image...), the next readable index: the
        batch keeps its size and the skips are counted by kind (`train/skipped/<kind>`), never dropped."""
        skipped: dict[str, int] = {}
        for k in range(min(MAX_SKIPS_PER_READ, len(self.ds))):
            try:
                return self.ds[(i + k) % len(self.ds)], skipped
            except SkipSample as err:
                skipped[err.kind] = skipped.get(err.kind, 0) + 1
                warnings.warn(f"sample skipped and counted: {err}")
                last = err
        raise RuntimeError(f"{sum(skipped.values())} samples in a row could not be read, from index {i}; "
                           f"last: {last}") from None


class EpochSampler(DistributedSampler):
    """A random order per epoch, like `RandomSampler`, from a seed drawn from the torch RNG (so `seed_everything`
    fixes the run; on several ranks rank 0's draw, broadcast), yielding `(index, seed)`: the read's caption draw
    follows from both.

    Rank `rank` of `world` reads every `world`-th index of the epoch's order from its own, and every rank reads
    `len // world` of them (the last `len % world` of the order wait for another epoch): the ranks' epochs have equal
    lengths. After `resume(seed, start)` the next epoch is that seed's order less its first `start` indices, dealt
    the same way over this run's ranks. A `DistributedSampler`, so Lightning keeps it instead of putting its own.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=False, drop_last=True)
        self.n, self.order_seed, self.start, self._resume = n, None, 0, None

    def __len__(self) -> int:
        return self.n // self.num_replicas

    def resume(self, seed: int, start: int) -> None:
        self._resume = (seed, start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self._resume is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            if self.num_replicas > 1:
                seed = broadcast(seed)       # every rank drew (their RNGs stay in step); rank 0's order is the one
            start = 0
        else:
            seed, start = self._resume
        self.order_seed, self.start, self._resume = seed, start, None
        rest = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))[start:].tolist()
        for i in rest[self.rank::self.num_replicas][: len(rest) // self.num_replicas]:
            yield i, seed


class ResumableMapLoader(DataLoader):
    """Training DataLoader over a map-style set whose position within the epoch Lightning keeps in checkpoints
    (`state_dict`): the epoch's order seed and the batches the model consumed (not those the workers prefetched;
    the datamodule reports each training batch through `consumed`). A resumed run reads exactly the batches
    the uninterrupted one would have.

    On `world` ranks each rank reads its share of the epoch's order (`EpochSampler`); `state_dict` gathers every
    rank's position into the checkpoint and `load_state_dict` takes this rank's. The ranks step together, so after
    b batches each they have consumed the first `world * b * batch_size` indices of the order (`samples`); a
    checkpoint from another number of ranks is therefore re-sharded by rule: the rest of its epoch's order is dealt
    over this run's ranks, each unread index read once (docs/scale.md).
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world: int = 1, **kwargs: Any):
        kwargs.setdefault("worker_init_fn", ignore_sigterm)
        super().__init__(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), rank, world),
                         drop_last=True, **kwargs)
        self.rank, self.world = rank, world
        self.batches, self._seed = 0, None     # batches this rank consumed in the epoch of order seed `_seed`
        self.samples = 0                       # indices of that epoch's order consumed by all ranks together

    def consumed(self) -> None:
        if self._seed != self.sampler.order_seed:    # the first batch of a new epoch
            self.batches, self._seed, self.samples = 0, self.sampler.order_seed, self.sampler.start
        self.batches += 1
        self.samples += self.world * self.batch_size

    def _local_state(self) -> dict:
        return {"seed": self._seed, "batches": self.batches, "samples": self.samples, "batch_size": self.batch_size}

    def state_dict(self) -> dict:
        ranks = gather(self._local_state())
        return {"world_size": len(ranks), "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        ranks = state.get("ranks") or [state]            # a checkpoint from before per-rank positions: one process
        saved = state.get("world_size", len(ranks))
        if len(ranks) != saved:
            raise ValueError(f"the checkpoint's training-loader position lists {len(ranks)} ranks for "
                             f"world_size {saved}")
        if ranks[0]["batch_size"] != self.batch_size:
            raise ValueError(f"the checkpoint's training loader read batches of {ranks[0]['batch_size']}, this "
                             f"run's batch_size is {self.batch_size}: a mid-epoch resume needs the same batch size")
        if saved == self.world:
            mine = ranks[self.rank]
        else:
            # Re-shard: the ranks stepped together, so they agree on the epoch and on what its order lost already.
            where = {(r["seed"], r.get("samples", r["batches"] * r["batch_size"])) for r in ranks}
            if len(where) != 1:
                raise ValueError(f"the checkpoint's {saved} ranks disagree on their epoch's (order seed, consumed "
                                 f"indices): {sorted(where, key=str)}; it cannot be re-sharded to {self.world} ranks")
            mine = ranks[0]
            if self.rank == 0:
                warnings.warn(f"the checkpoint's data position was saved on {saved} rank(s), this run has "
                              f"{self.world}: the rest of its epoch is re-dealt over {self.world} rank(s), each unread "
                              f"sample read once (docs/scale.md); the batches differ from a {saved}-rank run's")
        if mine["seed"] is not None:
            samples = mine.get("samples", mine["batches"] * self.batch_size)
            self.sampler.resume(mine["seed"], samples)
            self.batches, self._seed, self.samples = mine["batches"], mine["seed"], samples


class _Streamed(IterableDataset):
    """A stream source's samples, prepared. For training over a source with a resumable `stream` (e.g.
    `WebDatasetPairs`), each sample carries its reader's position after it (`stream_state`, recorded by
    `ResumableLoader`), epochs are the source's `reader_budget` (whole batches), and the caption draw comes from
    (seed, reader, position) rather than the worker's RNG, so a resumed stream reads and draws what the
    uninterrupted one did. Another stream (or evaluation) reads as the source iterates, caption draws from the
    torch RNG that `seed_everything(workers=True)` seeds per worker."""

    resume: dict | None = None   # set by `ResumableLoader` at each epoch's start

    def __init__(self, ds: IterableDataset, transform: T.Compose, train: bool, batch_size: int = 1):
        self.ds, self.transform, self.train, self.batch_size = ds, transform, train, batch_size

    @property
    def resumable(self) -> bool:
        return self.train and hasattr(self.ds, "stream")

    def __iter__(self) -> Iterator[dict]:
        if not self.resumable:
            for s in self.ds:
                yield _prepare(s, self.transform, self.train)
            return
        resume = self.resume or {}
        me, readers, nw = reader_role(resume.get("offset", 0))
        state = resume.get("readers", {}).get(str(me), {"pass": 0, "drawn": 0, "yielded": 0})
        budget = self.ds.reader_budget(readers, self.batch_size)
        if budget is None:
            count = None                                             # one endless epoch
        else:                                                        # the rest of this epoch's budget
            count = max(0, min(budget, (resume.get("epoch", 0) + 1) * budget - state["yielded"]))
        yielded = state["yielded"]
        stream = self.ds.stream(me, readers, (state["pass"], state["drawn"]))
        seed = getattr(self.ds, "seed", 0)
        for sample, (pass_, drawn) in itertools.islice(stream, count):
            key = ((seed * 1_000_003 + me) * 1_000_033 + pass_) * 1_000_037 + drawn
            rng = torch.Generator().manual_seed(key % 2**63)
            yielded += 1
            yield {**_prepare(sample, self.transform, True, rng),
                   "stream_state": {"reader": me, "workers": nw, "pass": pass_, "drawn": drawn, "yielded": yielded}}


class _StreamCollate:
    """Samples → a batch, carrying the position of its reader after its last sample (`stream_state`)."""

    def __init__(self, collate: CaptionCollator):
        self.collate = collate

    def __call__(self, samples: list[dict]) -> dict:
        return {**self.collate(samples), "stream_state": samples[-1]["stream_state"]}


class NamedEvalSets:
    """Names of a datamodule's evaluation sets (`val_sets` / `test_sets` dicts), in dataloader order: each set
    is logged under its own name (`PartsSystem._names`)."""

    val_sets: dict[str, Dataset]
    test_sets: dict[str, Dataset]

    @property
    def val_names(self) -> list[str]:
        return list(self.val_sets)

    @property
    def test_names(self) -> list[str]:
        return list(self.test_sets)


class CaptionDataModule(NamedEvalSets, L.LightningDataModule):
    """Image-caption batches for stage 1.

    Args:
        train: training dataset; None = synthetic scenes (`SyntheticCaptions(split="train")`).
        val: named evaluation sets, each logged under its own name; None = synthetic `val` and `heldout`
            (color-shape pairs never seen in training).
        test: named test sets; None = synthetic `test` and `heldout`.
        image_size: side the images are resized to (encoder input).
        batch_size: training batch size per device.
        eval_batch_size: batch size for validation / test / predict.
        num_workers: DataLoader workers.
        max_length: longest sequence in tokens (image block included); longer captions are truncated and counted.
        text_length: instead of `max_length`: the caption budget in tokens (`</s>` included), added to the
            image block `<s>[IMG]<image>×N[/IMG]`, so the budget holds whatever N the adapter gives.
        max_bad_fraction: the share of training reads that may be skipped (undecodable images...; counted as
            `train/skipped/<kind>`) before the run stops.
        tokenizer: linked from `model.tokenizer` by the CLI.
        num_image_tokens: linked from `model.adapter.num_tokens` by the CLI.
    """

    def __init__(self, train: Dataset | None = None, val: dict[str, Dataset] | None = None,
                 test: dict[str, Dataset] | None = None, image_size: int = 64, batch_size: int = 32,
                 eval_batch_size: int = 64, num_workers: int = 0, max_length: int = 64,
                 tokenizer: Any = None, num_image_tokens: int = 32, text_length: int | None = None,
                 max_bad_fraction: float = 0.01):
        super().__init__()
        from emu_lightning.data.synthetic.scenes import SyntheticCaptions

        self.train_set = train if train is not None else SyntheticCaptions(split="train", image_size=image_size)
        self.val_sets = val if val is not None else {
            "val": SyntheticCaptions(split="val", size=256, image_size=image_size),
            "heldout": SyntheticCaptions(split="heldout", size=256, image_size=image_size)}
        self.test_sets = test if test is not None else {
            "test": SyntheticCaptions(split="test", size=512, image_size=image_size),
            "heldout": SyntheticCaptions(split="heldout", size=512, image_size=image_size)}
        self.transform = image_transform(image_size)
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.max_length, self.text_length, self.max_bad_fraction = max_length, text_length, max_bad_fraction
        self.tokenizer, self.num_image_tokens = tokenizer, num_image_tokens
        self._train_loader: ResumableMapLoader | ResumableLoader | None = None   # set when resumable

    def _collate(self) -> CaptionCollator:
        if self.tokenizer is None:
            raise ValueError("CaptionDataModule.tokenizer is None: the CLI links it from the model; "
                             "set it when using the datamodule directly")
        length = self.max_length if self.text_length is None else self.num_image_tokens + 3 + self.text_length
        return CaptionCollator(self.tokenizer, self.num_image_tokens, length)

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        wrap = _Streamed if isinstance(ds, IterableDataset) else _Mapped
        shuffle = train and not isinstance(ds, IterableDataset)
        return DataLoader(wrap(ds, self.transform, train),
                          batch_size=self.batch_size if train else self.eval_batch_size,
                          shuffle=shuffle, drop_last=train, num_workers=self.num_workers,
                          collate_fn=self._collate(), persistent_workers=self.num_workers > 0,
                          worker_init_fn=ignore_sigterm)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        ds = self.train_set
        if isinstance(ds, IterableDataset) and not hasattr(ds, "stream"):
            self._train_loader = None          # a stream that cannot be told where to start: not resumable
            return self._loader(ds, train=True)
        if isinstance(ds, IterableDataset):
            if trainer is not None and getattr(ds, "epoch_samples", None) is None and trainer.max_steps == -1:
                raise ValueError(f"{type(ds).__name__} has no epoch_samples, so its training stream is one endless "
                                 "epoch: set trainer.max_steps, or the source's epoch_samples (samples per epoch over "
                                 "all ranks and workers)")
            # Fresh workers each epoch: each starts from the position its reader's last consumed batch left.
            self._train_loader = ResumableLoader(
                _Streamed(ds, self.transform, True, self.batch_size), batch_size=self.batch_size, drop_last=True,
                num_workers=self.num_workers, collate_fn=_StreamCollate(self._collate()), persistent_workers=False)
            return self._train_loader
        self._train_loader = ResumableMapLoader(
            _Mapped(ds, self.transform, True), self.batch_size, rank=rank, world=world,
            num_workers=self.num_workers, collate_fn=self._collate(), persistent_workers=self.num_workers > 0)
        return self._train_loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # The batch the model is about to train on: what a checkpoint's loader position must count.
        if isinstance(batch, dict) and "stream_state" in batch:
            batch = dict(batch)
            state = batch.pop("stream_state")
            if self.trainer is not None and self.trainer.training:
                self._train_loader.consumed(state)
        elif isinstance(self._train_loader, ResumableMapLoader) and self.trainer is not None \
                and self.trainer.training:
            self._train_loader.consumed()
        return batch

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(ds, train=False) for ds in self.val_sets.values()]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(ds, train=False) for ds in self.test_sets.values()]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()
