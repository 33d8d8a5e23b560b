"""Real image-text data from local paths: COCO-captions JSON and webdataset/LAION tar shards.

Both yield the same sample dict as ``SyntheticCaptions`` minus ``scene``:
``{"id": str, "image": PIL RGB, "captions": list[str]}``, so collate and evaluation code
cannot tell them apart. Tar shards are read with the stdlib ``tarfile`` (no webdataset
dependency); a bad stream sample is skipped *and counted*, and too many bad samples abort.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from emu_lightning.data.layout.sequence import SkipSample
from emu_lightning.data.modules.ranks import rank_world
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

    Readers are the (rank, DataLoader worker) pairs. Each *pass* over the data deals the shards round-robin to the
    readers: in their listed order, or, with ``shuffle``, in an order drawn from (``seed``, pass). A reader's
    samples then go through a shuffle buffer of ``shuffle`` samples whose draws come from (``seed``, pass, reader).
    Both are functions of those numbers alone, so any process can rebuild any reader's stream (docs/scale.md).

    - Iterating the dataset reads one pass (pass 0), each sample once; with ``epoch_samples``, each iteration reads
      the next ``epoch_samples // readers`` samples of the endless stream instead (see below).
    - ``stream`` is what training reads: endless, pass after pass (a reader whose shards run out starts its next
      pass), each sample with its position ``(pass, draws)``. Started from a position, it replays only the tar
      headers and the buffer's draws before it, reading and decoding no image, so a checkpoint holds two integers
      per reader.
    - ``epoch_samples``: equal epochs on every rank. Each of the R readers yields ``epoch_samples // R`` samples
      per epoch (stage 1 rounds it down to whole batches) from its endless stream, so every rank trains the same
      number of steps per epoch even when the shards hold different numbers of samples. None: one endless epoch
      (training ends at ``max_steps``).

    Skipped samples are counted in ``self.stats`` (``seen``, ``ok``, ``skipped/<reason>``) and warned about by key;
    each yielded sample carries the skips since the previous one (``sample["skipped"]``). Stats are per process (each
    DataLoader worker checks its own bad fraction) and reset when an iteration or a stream starts.
    """

    def __init__(
        self, urls: str | list[str], max_bad_fraction: float = 0.1, min_samples_for_check: int = 20,
        shuffle: int = 0, seed: int = 0, epoch_samples: int | None = None,
    ) -> None:
        """Args:
        urls: shard path, brace pattern (``shard-{000..003}.tar``) or list of them.
        max_bad_fraction: abort once skipped / seen exceeds this (after ``min_samples_for_check``).
        min_samples_for_check: samples seen before the bad fraction is enforced.
        shuffle: shuffle-buffer size in samples (0: the shards' order, and the shards dealt in listed order);
            it also shuffles the shard order of every pass.
        seed: seed of the shard order and of the buffer's draws.
        epoch_samples: samples per epoch over all readers (None: one endless epoch in training, one pass when
            iterated).
        """
        self.shards = expand_urls(urls)
        if not self.shards:
            raise ValueError(f"WebDatasetPairs: no shards in {urls!r}")
        missing = [s for s in self.shards if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"WebDatasetPairs: {len(missing)} shard(s) missing, first: {missing[0]}")
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction={max_bad_fraction}; expected in [0, 1)")
        if isinstance(shuffle, bool) or not isinstance(shuffle, int) or shuffle < 0:
            raise ValueError(f"WebDatasetPairs: shuffle={shuffle!r}; expected a buffer size in samples, >= 0 "
                             "(0: no shuffle)")
        if epoch_samples is not None and (isinstance(epoch_samples, bool) or not isinstance(epoch_samples, int)
                                          or epoch_samples < 1):
            raise ValueError(f"WebDatasetPairs: epoch_samples={epoch_samples!r}; expected a positive number of "
                             "samples per epoch, or None (one endless epoch)")
        self.max_bad_fraction, self.min_samples_for_check = max_bad_fraction, min_samples_for_check
        self.shuffle, self.seed, self.epoch_samples = shuffle, seed, epoch_samples
        self.stats: Counter = Counter()
        self._pending: Counter = Counter()
        self._quiet = False                    # replaying up to a resume position: no warnings, no counts
        self._live: dict[int, tuple[int, int]] = {}   # reader → position where its last epoch (`__iter__`) ended

    def _role(self, reader: int | None, readers: int | None) -> tuple[int, int]:
        """(reader, readers), by default the (rank, DataLoader worker) running this: rank * workers + worker id of
        world * workers. The stage-2 mixture and stage 1's stream name the reader instead, since after a resume a
        worker plays another worker's role (`ranks.reader_role`) and must read that reader's shards."""
        if reader is None or readers is None:
            rank, world = rank_world()
            info = get_worker_info()
            wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
            reader, readers = rank * nworkers + wid, world * nworkers
        return reader, readers

    def pass_shards(self, pass_: int, reader: int | None = None, readers: int | None = None) -> list[str]:
        """Reader ``reader`` of ``readers``'s shards in pass ``pass_``: every ``readers``-th of the pass's shard order
        (the listed order; with ``shuffle`` a permutation drawn from (seed, pass)) from index ``reader``."""
        reader, readers = self._role(reader, readers)
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"shards/{self.seed}/{pass_}").shuffle(shards)
        return shards[reader::readers]

    def my_shards(self, reader: int | None = None, readers: int | None = None) -> list[str]:
        """The shards of one iteration (pass 0) of reader ``reader`` of ``readers`` (default: the running one)."""
        reader, readers = self._role(reader, readers)
        if readers > len(self.shards):
            warnings.warn(f"WebDatasetPairs: {len(self.shards)} shards < {readers} readers (rank x worker)")
        return self.pass_shards(0, reader, readers)

    def reader_budget(self, readers: int, multiple: int = 1) -> int | None:
        """Samples each of ``readers`` readers yields per epoch: ``epoch_samples // readers`` rounded down to a
        multiple of ``multiple`` (a batch); None without ``epoch_samples`` (endless)."""
        if self.epoch_samples is None:
            return None
        n = self.epoch_samples // readers // multiple * multiple
        if n == 0:
            raise ValueError(f"WebDatasetPairs: epoch_samples={self.epoch_samples} over {readers} readers (ranks x "
                             f"DataLoader workers) leaves less than one batch of {multiple} per reader; raise "
                             f"epoch_samples to at least {readers * multiple}")
        return n

    def __iter__(self) -> Iterator[dict]:
        if self.epoch_samples is None:
            return self.iter_shard()
        return self._epoch()

    def _epoch(self) -> Iterator[dict]:
        """The running reader's next ``reader_budget`` samples, continuing where its previous epoch in this process
        ended (with DataLoader workers, `persistent_workers` keeps that place between epochs)."""
        reader, readers = self._role(None, None)
        stream = self.stream(reader, readers, self._live.get(reader, (0, 0)))
        for sample, position in itertools.islice(stream, self.reader_budget(readers)):
            self._live[reader] = position
            yield sample

    def iter_shard(self, reader: int | None = None, readers: int | None = None) -> Iterator[dict]:
        """One pass (pass 0) of `my_shards(reader, readers)` (``__iter__``: the running worker's), each sample once."""
        reader, readers = self._role(reader, readers)
        self.my_shards(reader, readers)           # warns when some readers get no shard
        self.stats, self._pending = Counter(), Counter()
        for sample, _ in self._pass(0, reader, readers, 0):
            yield sample
        self._check_some_read()

    def stream(self, reader: int | None = None, readers: int | None = None,
               start: tuple[int, int] = (0, 0)) -> Iterator[tuple[dict, tuple[int, int]]]:
        """Endless: ``(sample, (pass, draws))`` pairs from position ``start``, the position after each sample (its
        pass and the buffer draws made in that pass, skipped samples included)."""
        reader, readers = self._role(reader, readers)
        if readers > len(self.shards):
            raise ValueError(f"WebDatasetPairs: {len(self.shards)} shard(s) for {readers} readers (ranks x DataLoader "
                             f"workers): each pass deals whole shards, so every reader needs one; write at least "
                             f"{readers} shards or use fewer workers")
        pass_, skip = int(start[0]), int(start[1])
        self.stats, self._pending = Counter(), Counter()
        while True:
            for sample, drawn in self._pass(pass_, reader, readers, skip):
                yield sample, (pass_, drawn)
            self._check_some_read()
            if self._pass_groups == 0:
                raise RuntimeError(f"WebDatasetPairs: reader {reader} of {readers} found no sample in pass {pass_}'s "
                                   f"shards {self.pass_shards(pass_, reader, readers)}: an endless stream needs some")
            pass_, skip = pass_ + 1, 0

    def _check_some_read(self) -> None:
        if self.stats["seen"] and not self.stats["ok"]:
            n_seen = self.stats["seen"]
            raise RuntimeError(f"WebDatasetPairs: all {n_seen} samples skipped; {dict(self.stats)}")

    def _pass(self, pass_: int, reader: int, readers: int, skip: int) -> Iterator[tuple[dict, int]]:
        """Pass ``pass_`` of one reader: ``(sample, draws so far)``. The first ``skip`` draws are replayed (headers
        only: no image read, decoded, warned about or counted)."""
        rng = random.Random(f"buffer/{self.seed}/{pass_}/{reader}")
        tars = _OpenTars()
        self._quiet = skip > 0
        drawn = 0

        def draw(group: tuple[str, str, dict]) -> Iterator[tuple[dict, int]]:
            nonlocal drawn
            drawn += 1
            if drawn == skip:              # replayed up to the position: from here on as the uninterrupted stream
                self._quiet, self._pending = False, Counter()
            if drawn <= skip:
                return
            files = self._read(tars, *group)
            if files is None:
                self.stats["seen"] += 1
                sample = self._skip(group[0], group[1], "unreadable")
            else:
                sample = self._decode(group[0], group[1], files)
            if sample is not None:
                # the skips since the last sample ride on this one: the training process counts them
                sample["skipped"], self._pending = dict(self._pending), Counter()
                yield sample, drawn

        buffer: list[tuple[str, str, dict]] = []
        self._pass_groups = 0
        try:
            for group in self._scan(self.pass_shards(pass_, reader, readers)):
                self._pass_groups += 1
                if self.shuffle > 1:
                    if len(buffer) < self.shuffle:
                        buffer.append(group)
                        continue
                    j = rng.randrange(len(buffer))
                    group, buffer[j] = buffer[j], group
                yield from draw(group)
            while buffer:
                j = rng.randrange(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield from draw(buffer.pop())
        finally:
            tars.close()
            if drawn < skip:               # the whole pass was replayed: its skips were counted before the resume
                self._pending = Counter()
            self._quiet = False

    def _scan(self, shards: list[str]) -> Iterator[tuple[str, str, dict[str, tarfile.TarInfo]]]:
        """Consecutive tar members sharing a key, as ``(shard, key, {ext: member})``: headers only, no data read. A
        truncated or corrupt shard keeps the samples before the damage; the rest is skipped and counted."""
        for shard in shards:
            key, members = None, {}
            try:
                with tarfile.open(shard) as tar:
                    plain = isinstance(tar.fileobj, io.BufferedReader)   # uncompressed: check each member's extent
                    size = Path(shard).stat().st_size
                    for member in tar:
                        if not member.isfile():
                            continue
                        if plain and member.offset_data + member.size > size:
                            raise tarfile.ReadError(f"unexpected end of data in {member.name!r}")
                        k, ext = _split_key(member.name)
                        if k != key and key is not None:
                            yield shard, key, members
                            members = {}
                        key = k
                        members[ext] = member
                if key is not None:
                    yield shard, key, members
            except (tarfile.TarError, EOFError, OSError) as err:
                if not self._quiet:
                    self.stats["skipped/bad_shard"] += 1
                    warnings.warn(f"{shard}: unreadable tar past sample {self.stats['seen']} ({type(err).__name__}: "
                                  f"{err}); the rest of this shard is skipped")
                self._pending["bad_shard"] += 1

    def _read(self, tars: _OpenTars, shard: str, key: str,
              members: dict[str, tarfile.TarInfo]) -> dict[str, bytes] | None:
        """A group's files, read by offset from its shard; None when they cannot be read."""
        try:
            tar = tars.get(shard)
            return {ext: tar.extractfile(m).read() for ext, m in members.items()}
        except (tarfile.TarError, EOFError, OSError):
            return None

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


class _OpenTars:
    """The last few shards opened for reading samples by offset (a shuffle buffer draws from recent shards)."""

    def __init__(self, size: int = 8):
        self.size, self.open = size, {}

    def get(self, shard: str) -> tarfile.TarFile:
        tar = self.open.pop(shard, None) or tarfile.open(shard)
        self.open[shard] = tar                    # most recent last
        while len(self.open) > self.size:
            self.open.pop(next(iter(self.open))).close()
        return tar

    def close(self) -> None:
        for tar in self.open.values():
            tar.close()
        self.open = {}
