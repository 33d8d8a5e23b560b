"""Stage-2 datamodule: a per-step mixture of image-text, interleaved, video and storyboard sources.

Sources are injected by `class_path` (synthetic generators by default; `CocoCaptions`, `WebDatasetPairs`,
`Mmc4Documents`, `VideoFolder` for real data) and laid out by kind (`Layout`, inferred from the sample keys
or named in `layouts`). Evaluation sets are named; each batch carries both the teacher-forced sequences
(for the losses) and the prepared samples (for few-shot prompts, built by the system), and each set has a
pool of training examples to draw demonstrations from (`demo_pool`).
"""
from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset, IterableDataset

from emu_lightning.data.layout.chat import chat_template
from emu_lightning.data.layout.packing import PackingCollator
from emu_lightning.data.modules.captions import NamedEvalSets, image_transform
from emu_lightning.data.modules.mixture import ResumableLoader, SourceMixture, Step, step_counts
from emu_lightning.data.modules.workers import ignore_sigterm
from emu_lightning.data.layout.sequence import Layout, SequenceCollator


def _synthetic(kind: str, split: str, size: int, image_size: int) -> Dataset:
    from emu_lightning.data.synthetic import scenes as synthetic

    cls = {"captions": synthetic.SyntheticCaptions, "vqa": synthetic.SyntheticVQA,
           "documents": synthetic.SyntheticDocuments, "videos": synthetic.SyntheticVideos}[kind]
    return cls(split=split, size=size, image_size=image_size)


class _TrainCollate:
    """A step's documents → a batch, carrying the stream position after it (`stream_state`)."""

    def __init__(self, collate: SequenceCollator | PackingCollator):
        self.collate = collate

    def __call__(self, step: Step) -> dict:
        return {**self.collate(step), "stream_state": step.state}


class _EvalCollate:
    def __init__(self, dm: MultimodalDataModule, layout: Layout):
        self.dm, self.layout = dm, layout

    def __call__(self, samples: list[dict]) -> dict:
        samples = [self.dm.prepare_sample(s) for s in samples]
        docs = []
        for s in samples:
            segs = self.layout(s)
            docs.append({"id": s["id"], "source": "eval", "segments": segs, "regress": segs.regress,
                         "targets": segs.targets})
        return {**self.dm.collator()(docs), "samples": samples, "layout": self.layout.kind}


class MultimodalDataModule(NamedEvalSets, L.LightningDataModule):
    """Stage-2 batches.

    Args:
        train: name → training source; None = synthetic pairs, documents, videos and storyboards.
        weights: name → share of each step's batch (largest-remainder counts); None = equal shares.
        layouts: name → layout kind (`pair`, `interleaved`, `video`, `storyboard`, `vqa`, `text`, `chat`, `gen`) of a
            training source or an evaluation set; those not named here are inferred from their sample keys (a
            `videos` sample defaults to `video`; caption pairs are `pair` unless named, e.g. `gen` for Emu2-Gen).
        val: name → evaluation set; None = synthetic val captions, VQA and videos.
        test: name → test set; None = synthetic test captions, VQA and videos.
        demos: name of an evaluation set → the training pool its few-shot demonstrations come from; None =
            a synthetic train set of the same kind for each synthetic evaluation set.
        image_size: encoder input side.
        batch_size: documents per training step, over all sources.
        eval_batch_size: evaluation queries per batch.
        num_workers: DataLoader workers.
        max_length: longest sequence; longer documents are cut at a span boundary and counted.
        pack_length: when set, each training step's documents (the `batch_size` the mixture draws, its shares
            unchanged) are packed end to end into rows of at most `pack_length` tokens (`PackingCollator`: each
            document attends only to itself, losses equal the unpacked ones) instead of one padded row each: the
            step's tokens stay those of its documents, its rows shrink to about tokens / `pack_length`. At least
            `max_length`. None = one document per row. Evaluation batches are never packed.
        num_frames: frames per video (uniformly subsampled).
        skip_short_videos: skip and count videos with fewer frames than `num_frames` (False: raise).
        video_token: open each video with `[VIDEO]` (Emu2) or not (Emu1).
        spelling: grounding tokens and video frames as the platform writes them ("platform") or as the Emu2 release
            does ("emu2": its own `<phrase>` / `<object>` / `<patch_index_…>` rows and video frames at `[gIMG]`, for a
            converted Emu2; `layout/spelling.py`).
        text_first_p: probability a pair is laid out caption → image.
        image_first_p: probability an interleaved image precedes its sentence.
        demo_pool_size: demonstrations pool size of the default synthetic pools.
        seed: seed of the per-pass source permutations.
        max_bad_fraction: the share of training reads that may be skipped (undecodable images, short videos with
            `skip_short_videos`, a stream source's own skips...; counted as `train/skipped/<kind>`) before the run
            stops, as in stage 1 (`CaptionDataModule`).
        template: chat template of `chat` sources (a preset name or `ChatTemplate` fields); the CLI copies the
            model's `template` here, so a recipe names it once.
        tokenizer: linked from `model.tokenizer` by the CLI.
        num_image_tokens: linked from `model.adapter.num_tokens` by the CLI.
    """

    def __init__(self, train: dict[str, Dataset] | None = None, weights: dict[str, float] | None = None,
                 layouts: dict[str, str] | None = None, val: dict[str, Dataset] | None = None,
                 test: dict[str, Dataset] | None = None, demos: dict[str, Dataset] | None = None,
                 image_size: int = 64, batch_size: int = 24, eval_batch_size: int = 32, num_workers: int = 0,
                 max_length: int = 256, pack_length: int | None = None, num_frames: int = 8,
                 skip_short_videos: bool = False,
                 video_token: bool = True, text_first_p: float = 0.5, image_first_p: float = 0.5,
                 demo_pool_size: int = 256, seed: int = 0, template: str | dict | None = None,
                 tokenizer: Any = None, num_image_tokens: int = 16, max_bad_fraction: float = 0.01,
                 spelling: str = "platform"):
        super().__init__()
        syn = lambda kind, split, n: _synthetic(kind, split, n, image_size)  # noqa: E731
        self.train_sets = train if train is not None else {
            "pairs": syn("captions", "train", 100_000), "documents": syn("documents", "train", 100_000),
            "videos": syn("videos", "train", 100_000), "storyboards": syn("videos", "train", 100_000)}
        layouts = dict(layouts or ({"storyboards": "storyboard"} if train is None else {}))
        self.val_sets = val if val is not None else {
            "val_captions": syn("captions", "val", 64), "val_vqa": syn("vqa", "val", 64),
            "val_videos": syn("videos", "val", 32)}
        self.test_sets = test if test is not None else {
            "test_captions": syn("captions", "test", 256), "test_vqa": syn("vqa", "test", 256),
            "test_videos": syn("videos", "test", 128)}
        unknown = sorted(set(layouts) - set(self.train_sets) - set(self.val_sets) - set(self.test_sets))
        if unknown:
            raise ValueError(f"layouts names {unknown}, which are neither training sources {sorted(self.train_sets)} "
                             f"nor evaluation sets {sorted({**self.val_sets, **self.test_sets})}")
        self.eval_layouts = {n: k for n, k in layouts.items() if n not in self.train_sets}
        self.layout_kinds: dict[str, str] = {}
        for n, ds in self.train_sets.items():
            if n not in layouts and isinstance(ds, IterableDataset):
                raise ValueError(f"training source {n!r} is a stream: name its layout in `layouts`")
            self.layout_kinds[n] = layouts.get(n) or Layout.infer(ds[0])
        chats = [n for n, k in self.layout_kinds.items() if k == "chat"]
        if chats and template is None:
            raise ValueError(f"training sources {chats} are chat conversations but `template` is None: set the "
                             f"model's `template` (the CLI copies it here) or the datamodule's")
        self.weights = weights or {n: 1.0 for n in self.train_sets}
        if set(self.weights) != set(self.train_sets):
            raise ValueError(f"weights name {sorted(self.weights)} but the sources are {sorted(self.train_sets)}")
        self.counts = step_counts(self.weights, batch_size)
        self.demo_sets = demos if demos is not None else self._default_demos(demo_pool_size, image_size)
        self.transform = image_transform(image_size)
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.max_length, self.num_frames, self.skip_short_videos = max_length, num_frames, skip_short_videos
        if pack_length is not None and pack_length < max_length:
            raise ValueError(f"pack_length={pack_length} is shorter than max_length={max_length}: a packed row must "
                             "hold the longest document; raise pack_length or lower max_length")
        self.pack_length = pack_length
        self.video_token, self.text_first_p, self.image_first_p = video_token, text_first_p, image_first_p
        self.spelling = spelling
        self.seed, self.tokenizer, self.num_image_tokens = seed, tokenizer, num_image_tokens
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction={max_bad_fraction}; expected in [0, 1)")
        self.max_bad_fraction = max_bad_fraction
        self.template = chat_template(template)
        self._pools: dict[str, list[dict]] = {}

    def _default_demos(self, size: int, image_size: int) -> dict[str, Dataset]:
        from emu_lightning.data.synthetic import scenes as synthetic

        kinds = {synthetic.SyntheticCaptions: "captions", synthetic.SyntheticVQA: "vqa",
                 synthetic.SyntheticVideos: "videos", synthetic.SyntheticDocuments: "documents"}
        return {name: _synthetic(kinds[type(ds)], "train", size, image_size)
                for name, ds in {**self.val_sets, **self.test_sets}.items() if type(ds) in kinds}

    def layout(self, kind: str, train: bool) -> Layout:
        return Layout(kind, self.text_first_p, self.image_first_p, self.num_frames, self.skip_short_videos, train,
                      self.template)

    def collator(self) -> SequenceCollator:
        if self.tokenizer is None:
            raise ValueError("MultimodalDataModule.tokenizer is None: the CLI links it from the model; "
                             "set it when using the datamodule directly")
        return SequenceCollator(self.tokenizer, self.num_image_tokens, self.max_length, self.video_token,
                                self.spelling)

    def prepare_sample(self, s: dict) -> dict:
        """Transform every image of a raw sample ("image", "images", "frames", a chat "video", gen "references")
        to a normalised tensor."""
        out = dict(s)
        for key in ("images", "frames", "video", "references"):
            if key in s:
                out[key] = [self.transform(im) for im in s[key]]
        if "image" in s:
            out["image"] = self.transform(s["image"])
        return out

    def demo_pool(self, name: str) -> list[dict]:
        """Prepared training examples the few-shot demonstrations of evaluation set `name` come from."""
        if name not in self.demo_sets:
            raise KeyError(f"evaluation set {name!r} has no demonstration pool; `demos` names {sorted(self.demo_sets)}")
        if name not in self._pools:
            ds = self.demo_sets[name]
            self._pools[name] = [self.prepare_sample(ds[i]) for i in range(len(ds))]
        return self._pools[name]

    def train_dataloader(self) -> DataLoader:
        layouts = {n: self.layout(k, train=True) for n, k in self.layout_kinds.items()}
        stream = SourceMixture(self.train_sets, self.counts, layouts, self.transform, self.seed)
        collate = PackingCollator(self.collator(), self.pack_length) if self.pack_length else self.collator()
        self._train_loader = ResumableLoader(stream, num_workers=self.num_workers, collate_fn=_TrainCollate(collate),
                                             persistent_workers=self.num_workers > 0)
        return self._train_loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # The batch the model is about to train on: its stream position is what a checkpoint must record.
        if isinstance(batch, dict) and "stream_state" in batch:
            batch = dict(batch)
            self._train_loader.consumed(batch.pop("stream_state"))
            # Non-padding tokens, counted while the mask is on the CPU (a plain int stays there).
            batch["num_tokens"] = int((batch["attention_mask"] > 0).sum())
        return batch

    def _eval_loader(self, name: str, ds: Dataset) -> DataLoader:
        collate = _EvalCollate(self, self.layout(self.eval_layouts.get(name) or Layout.infer(ds[0]), train=False))
        return DataLoader(ds, batch_size=self.eval_batch_size, num_workers=self.num_workers,
                          collate_fn=collate, persistent_workers=self.num_workers > 0, worker_init_fn=ignore_sigterm)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(n, ds) for n, ds in self.val_sets.items()]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(n, ds) for n, ds in self.test_sets.items()]

    def predict_dataloader(self) -> list[DataLoader]:
        # `main.py predict` runs over the test sets (a prediction writer saves the outputs).
        return self.test_dataloader()
