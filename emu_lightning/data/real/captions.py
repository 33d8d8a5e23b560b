"""Real image-text data from local paths: COCO-captions JSON and webdataset/LAION tar shards.

Both yield the same sample dict as ``SyntheticCaptions`` minus ``scene``:
``{"id": str, "image": PIL RGB, "captions": list[str]}``, so collate and evaluation code
cannot tell them apart. Tar shards are read with the stdlib ``tarfile`` (no webdataset
dependency); a bad stream sample is skipped *and counted*, and too many bad samples abort.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from emu_lightning.data.layout.sequence import SkipSample
from emu_lightning.data.real.images import UNDECODABLE, check_image_files, open_rgb

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class BadImage(SkipSample):
    """An image file that exists but does not decode (truncated, corrupt, not an image). Training skips and counts
    the sample (`train/skipped/bad_image`) up to the data's `max_bad_fraction`; `dataset[i]` raises it, naming
    the file."""

    kind = "bad_image"


def _load_rgb(path: Path, where: str = "") -> Image.Image:
    """The image at `path` as RGB; an undecodable file raises `BadImage` naming it (and `where` it is listed)."""
    try:
        return open_rgb(path)
    except FileNotFoundError:
        raise
    except UNDECODABLE as err:
        raise BadImage(f"{where}image {path} does not decode ({type(err).__name__}: {err})") from None


class CocoCaptions(Dataset):
    """COCO-captions JSON (``images: [{id, file_name}]``, ``annotations: [{image_id, caption}]``).

    One item per image, in ``images`` order, with all its captions. The JSON is validated up
    front (missing field -> ValueError naming file, field and entry index). Image files are
    checked up front too when ``check_files`` (the default: fail before training, not hours in);
    either way a missing image raises FileNotFoundError naming it and the annotation file.
    """

    def __init__(self, annotations: str, image_dir: str, check_files: bool = True) -> None:
        """Args:
        annotations: path of the COCO-captions JSON.
        image_dir: folder holding each ``file_name``.
        check_files: stat every image at construction and read a sample's headers (`check_image_files`).
        """
        self.annotations, self.image_dir = Path(annotations), Path(image_dir)
        if not self.annotations.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.annotations}")
        try:
            with open(self.annotations, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.annotations}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.annotations}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        images = self._field(data, "images", "top level", list)
        anns = self._field(data, "annotations", "top level", list)
        captions: dict[int, list[str]] = {}
        for i, ann in enumerate(anns):
            image_id = self._field(ann, "image_id", f"annotations[{i}]", (int, str))
            caption = self._field(ann, "caption", f"annotations[{i}]", str).strip()
            if not caption:
                raise ValueError(f"{self.annotations}: annotations[{i}] (image_id {image_id}) has an empty 'caption'")
            captions.setdefault(image_id, []).append(caption)
        self.items: list[tuple[str, str, list[str]]] = []
        for i, img in enumerate(images):
            image_id = self._field(img, "id", f"images[{i}]", (int, str))
            file_name = self._field(img, "file_name", f"images[{i}]", str)
            if image_id not in captions:
                raise ValueError(
                    f"{self.annotations}: images[{i}] (id {image_id}, {file_name}) has no caption"
                )
            self.items.append((str(image_id), file_name, captions.pop(image_id)))
        if captions:
            orphan = next(iter(captions))
            raise ValueError(
                f"{self.annotations}: {len(captions)} caption group(s) with unknown image_id, e.g. {orphan}"
            )
        if check_files:   # every image exists (else an error); empty or undecodable ones listed before training
            check_image_files([self._path(name) for _, name, _ in self.items], str(self.annotations))

    def _field(self, entry: dict, name: str, where: str, kind: type | tuple[type, ...]):
        if not isinstance(entry, dict) or name not in entry:
            raise ValueError(f"{self.annotations}: {where} lacks required field {name!r}")
        value = entry[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ValueError(f"{self.annotations}: {where} field {name!r} is {value!r:.60} "
                             f"({type(value).__name__}); expected {expected}")
        return value

    def _path(self, file_name: str) -> Path:
        path = self.image_dir / file_name
        if not path.is_file():
            raise FileNotFoundError(f"image {path} listed in {self.annotations} does not exist")
        return path

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        image_id, file_name, captions = self.items[index]
        image = _load_rgb(self._path(file_name), f"{self.annotations} (image id {image_id}): ")
        return {"id": image_id, "image": image, "captions": list(captions)}


def expand_urls(urls: str | list[str]) -> list[str]:
    """Expand ``shard-{000..003}.tar`` brace ranges (zero padding kept); lists are concatenated."""
    if isinstance(urls, (list, tuple)):
        return [u for url in urls for u in expand_urls(url)]
    m = re.search(r"\{(\d+)\.\.(\d+)\}", urls)
    if m is None:
        return [urls]
    lo, hi = m.group(1), m.group(2)
    if int(hi) < int(lo):
        raise ValueError(f"shard pattern {urls!r}: range end {hi} < start {lo}")
    width = len(lo) if lo.startswith("0") else 0
    return [u for k in range(int(lo), int(hi) + 1)
            for u in expand_urls(urls[: m.start()] + str(k).zfill(width) + urls[m.end():])]  # fmt: skip


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename; ext = the rest."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class WebDatasetPairs(IterableDataset):
    """Image-text pairs from local webdataset tar shards (``KEY.jpg`` + ``KEY.txt``/``KEY.json``).

    Shards are dealt round-robin to (rank, worker) so each sample is read once per epoch.
    Skipped samples are counted in ``self.stats`` (``seen``, ``ok``, ``skipped/<reason>``) and
    warned about by key. Stats are per process: with DataLoader workers each worker holds its
    own copy and checks its own bad fraction. ``stats`` resets at each ``__iter__``.
    """

    def __init__(
        self, urls: str | list[str], max_bad_fraction: float = 0.1, min_samples_for_check: int = 20
    ) -> None:
        """Args:
        urls: shard path, brace pattern (``shard-{000..003}.tar``) or list of them.
        max_bad_fraction: abort once skipped / seen exceeds this (after ``min_samples_for_check``).
        min_samples_for_check: samples seen before the bad fraction is enforced.
        """
        self.shards = expand_urls(urls)
        if not self.shards:
            raise ValueError(f"WebDatasetPairs: no shards in {urls!r}")
        missing = [s for s in self.shards if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"WebDatasetPairs: {len(missing)} shard(s) missing, first: {missing[0]}")
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction={max_bad_fraction}; expected in [0, 1)")
        self.max_bad_fraction, self.min_samples_for_check = max_bad_fraction, min_samples_for_check
        self.stats: Counter = Counter()

    def my_shards(self, reader: int | None = None, readers: int | None = None) -> list[str]:
        """Reader ``reader`` of ``readers``'s shards: every ``readers``-th from index ``reader``.

        By default the reader is the (rank, DataLoader worker) running this: rank * workers + worker id of
        world * workers. The stage-2 mixture names the reader instead, since after a resume a worker plays
        another worker's role (`mixture._shard`) and must read that reader's shards.
        """
        if reader is None or readers is None:
            rank, world = 0, 1
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            info = get_worker_info()
            wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
            reader, readers = rank * nworkers + wid, world * nworkers
        if readers > len(self.shards):
            warnings.warn(f"WebDatasetPairs: {len(self.shards)} shards < {readers} readers (rank x worker)")
        return self.shards[reader::readers]

    def __iter__(self) -> Iterator[dict]:
        return self.iter_shard()

    def iter_shard(self, reader: int | None = None, readers: int | None = None) -> Iterator[dict]:
        """The samples of `my_shards(reader, readers)`, in order (``__iter__``: the running worker's)."""
        self.stats, self._pending = Counter(), Counter()
        for shard in self.my_shards(reader, readers):
            try:
                for key, files in self._groups(shard):
                    sample = self._decode(shard, key, files)
                    if sample is not None:
                        # the skips since the last sample ride on this one: the training process counts them
                        sample["skipped"], self._pending = dict(self._pending), Counter()
                        yield sample
            except (tarfile.TarError, EOFError, OSError) as err:
                # A truncated or corrupt shard: what was read is kept, the rest of the shard is skipped and counted.
                self.stats["skipped/bad_shard"] += 1
                self._pending["bad_shard"] += 1
                warnings.warn(f"{shard}: unreadable tar past sample {self.stats['seen']} ({type(err).__name__}: "
                              f"{err}); the rest of this shard is skipped")
        if self.stats["seen"] and not self.stats["ok"]:
            n_seen = self.stats["seen"]
            raise RuntimeError(f"WebDatasetPairs: all {n_seen} samples skipped; {dict(self.stats)}")

    def _groups(self, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Consecutive tar members sharing a key, as ``(key, {ext: bytes})``."""
        key, files = None, {}
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_key(member.name)
                if k != key and key is not None:
                    yield key, files
                    files = {}
                key = k
                files[ext] = tar.extractfile(member).read()
        if key is not None:
            yield key, files

    def _skip(self, shard: str, key: str, reason: str) -> None:
        self.stats[f"skipped/{reason}"] += 1
        self._pending[reason] += 1
        warnings.warn(f"{shard}: skipped sample {key!r} ({reason})")
        skipped = self.stats["seen"] - self.stats["ok"]
        fraction = skipped / self.stats["seen"]
        if self.stats["seen"] >= self.min_samples_for_check and fraction > self.max_bad_fraction:
            raise RuntimeError(
                f"{shard}: {skipped} of {self.stats['seen']} samples skipped ({fraction:.1%} > "
                f"max_bad_fraction {self.max_bad_fraction:.1%}): {dict(self.stats)}"
            )

    def _decode(self, shard: str, key: str, files: dict[str, bytes]) -> dict | None:
        self.stats["seen"] += 1
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        if image_ext is None:
            return self._skip(shard, key, "missing_image")
        try:  # a .txt wins over a .json caption
            text = files["txt"].decode("utf-8").strip() if "txt" in files else None
            if text is None and "json" in files:
                text = json.loads(files["json"]).get("caption")
        except (ValueError, AttributeError):  # UnicodeDecodeError / JSONDecodeError / non-dict JSON
            return self._skip(shard, key, "bad_text")
        if text is not None and not isinstance(text, str):
            return self._skip(shard, key, "bad_text")
        if not text:
            return self._skip(shard, key, "missing_text")
        try:
            image = open_rgb(io.BytesIO(files[image_ext]))
        except (OSError, ValueError, Image.DecompressionBombError):
            return self._skip(shard, key, "bad_image")
        self.stats["ok"] += 1
        return {"id": key, "image": image, "captions": [str(text).strip()]}
