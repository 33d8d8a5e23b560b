"""One datamodule for stage-1 image-text data: synthetic scenes by default, COCO JSON or tar shards by recipe.

Datasets are injected by `class_path` (any map-style or iterable dataset yielding
`{"id", "image": PIL, "captions": [str, ...]}`), so a real source is a recipe change, not a code change.
The tokenizer and N (`<image>` tokens per image) come from the model: the CLI links them.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterator

import lightning as L
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.transforms import v2 as T
import torch

from emu_lightning.data.layout.collate import CaptionCollator
from emu_lightning.data.layout.sequence import SkipSample

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


class EpochSampler(torch.utils.data.Sampler):
    """A random order per epoch, like `RandomSampler`, from a seed drawn from the torch RNG (so
    `seed_everything` fixes the run), yielding `(index, seed)`: the read's caption draw follows from both.
    After `resume(seed, skip)` the next epoch is that seed's order without its first `skip` indices."""

    def __init__(self, n: int):
        self.n, self.seed, self._resume = n, None, None

    def __len__(self) -> int:
        return self.n

    def resume(self, seed: int, skip: int) -> None:
        self._resume = (seed, skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed, skip = self._resume or (int(torch.empty((), dtype=torch.int64).random_().item()), 0)
        self.seed, self._resume = seed, None
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
        for i in order[skip:]:
            yield i, seed


class ResumableMapLoader(DataLoader):
    """Training DataLoader over a map-style set whose position within the epoch Lightning keeps in checkpoints
    (`state_dict`): the epoch's order seed and the batches the model consumed (not those the workers prefetched;
    the datamodule reports each training batch through `consumed`). A resumed run reads exactly the batches
    the uninterrupted one would have. One process only: several ranks shard through Lightning's sampler."""

    def __init__(self, dataset: Dataset, batch_size: int, **kwargs: Any):
        super().__init__(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset)), drop_last=True,
                         **kwargs)
        self.batches, self._seed = 0, None     # batches consumed in the epoch of order seed `_seed`

    def consumed(self) -> None:
        if self._seed != self.sampler.seed:    # the first batch of a new epoch
            self.batches, self._seed = 0, self.sampler.seed
        self.batches += 1

    def state_dict(self) -> dict:
        return {"seed": self._seed, "batches": self.batches, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state["batch_size"] != self.batch_size:
            raise ValueError(f"the checkpoint's training loader read batches of {state['batch_size']}, this run's "
                             f"batch_size is {self.batch_size}: a mid-epoch resume needs the same batch size")
        if state["seed"] is not None:
            self.sampler.resume(state["seed"], state["batches"] * self.batch_size)
            self.batches, self._seed = state["batches"], state["seed"]


class _Streamed(IterableDataset):
    def __init__(self, ds: IterableDataset, transform: T.Compose, train: bool):
        self.ds, self.transform, self.train = ds, transform, train

    def __iter__(self) -> Iterator[dict]:
        for s in self.ds:
            yield _prepare(s, self.transform, self.train)


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
        self._train_loader: ResumableMapLoader | None = None     # set by train_dataloader when resumable

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
                          collate_fn=self._collate(), persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        ranks = self.trainer.world_size if self.trainer is not None else 1
        if isinstance(self.train_set, IterableDataset) or ranks > 1:
            self._train_loader = None          # a stream, or Lightning's distributed sampler: not resumable
            return self._loader(self.train_set, train=True)
        self._train_loader = ResumableMapLoader(
            _Mapped(self.train_set, self.transform, True), self.batch_size, num_workers=self.num_workers,
            collate_fn=self._collate(), persistent_workers=self.num_workers > 0)
        return self._train_loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # The batch the model is about to train on: what a checkpoint's loader position must count.
        if self._train_loader is not None and self.trainer is not None and self.trainer.training:
            self._train_loader.consumed()
        return batch

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(ds, train=False) for ds in self.val_sets.values()]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(ds, train=False) for ds in self.test_sets.values()]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()
