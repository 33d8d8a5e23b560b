"""Captioning evaluation sets: Karpathy's split files, and COCO-captions JSON through `CocoCaptions`.

Karpathy's files (`dataset_coco.json`, `dataset_flickr30k.json`; Karpathy & Fei-Fei 2015) list every image once:

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test",
                 "cocoid": 391895, "imgid": 0, "sentences": [{"raw": "A man with a red helmet ...", ...}, ...]}]}

The COCO Karpathy test split is the 5,000 images with `"split": "test"` (docs/design.md §6). Items are
`{"id", "image_id", "image" (PIL RGB), "captions"}`, with `image_id` the COCO id (`cocoid`, else `imgid`): what the
COCO result format (`[{"image_id", "caption"}]`) and pycocoevalcap key on. A missing field or a missing image file
stops with the file, the record and the field named.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from torch.utils.data import Dataset

from emu_lightning.data.real.captions import CocoCaptions
from emu_lightning.data.real.images import open_rgb
from emu_lightning.data.real.vqa import field, read_json


class KarpathyCaptions(Dataset):
    """One split of a Karpathy split file.

    Args:
        path: `dataset_coco.json` (or `dataset_flickr30k.json`).
        image_dir: folder holding each image's `filepath/filename` (or `filename` when there is no `filepath`).
        split: "test", "val", "train" or "restval".
        data: the file's parsed contents, when the caller has read it already.
    """

    def __init__(self, path: str, image_dir: str, split: str = "test", data: dict | None = None) -> None:
        self.path, self.image_dir = Path(path), Path(image_dir)
        data = read_json(self.path, "Karpathy split file") if data is None else data   # `caption_set` read it
        rows = field(self.path, data, "images", "top level", list)
        self.items: list[dict] = []
        splits: Counter = Counter()
        for i, img in enumerate(rows):
            where = f"images[{i}]"
            splits[field(self.path, img, "split", where, str)] += 1
            if img["split"] != split:
                continue
            image_id = img.get("cocoid", img.get("imgid"))
            if image_id is None:
                raise ValueError(f"{self.path}: {where} lacks required field 'cocoid' (or 'imgid')")
            where = f"images[{i}] (image id {image_id})"
            name = field(self.path, img, "filename", where, str)
            sentences = field(self.path, img, "sentences", where, list)
            captions = [field(self.path, s, "raw", f"{where} sentences[{j}]", str).strip()
                        for j, s in enumerate(sentences)]
            if not captions or not all(captions):
                raise ValueError(f"{self.path}: {where} field 'sentences' has no or empty captions")
            file = self.image_dir / img.get("filepath", "") / name
            if not file.is_file():
                raise FileNotFoundError(f"{self.path}: {where} field 'filename': its image {file} does not exist")
            self.items.append({"id": str(image_id), "image_id": image_id, "image_file": str(file),
                               "captions": captions})
        if not self.items:
            raise ValueError(f"{self.path}: no image has split {split!r}; the file has {dict(splits)}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.items[index])
        item["image"] = open_rgb(item["image_file"])
        return item


class CocoCaptionSet(Dataset):
    """`CocoCaptions` (COCO-captions JSON: `images` + `annotations`) with the integer COCO `image_id` the result
    format needs."""

    def __init__(self, annotations: str, image_dir: str) -> None:
        self.coco = CocoCaptions(annotations, image_dir)
        # Without images, as `KarpathyCaptions.items`: what scoring reads.
        self.items = [{"id": i, "image_id": int(i) if i.isdigit() else i, "captions": list(caps)}
                      for i, _, caps in self.coco.items]

    def __len__(self) -> int:
        return len(self.items)   # may be cut to a first slice (`evaluate/cli.py --limit`)

    def __getitem__(self, index: int) -> dict:
        return {**self.coco[index], "image_id": self.items[index]["image_id"]}


def caption_set(path: str, image_dir: str, split: str = "test") -> Dataset:
    """A Karpathy split file (its `split`) or a COCO-captions JSON (all its images), told apart by their fields."""
    data = read_json(path, "caption annotation file")
    if isinstance(data, dict) and "annotations" in data:
        return CocoCaptionSet(path, image_dir)
    return KarpathyCaptions(path, image_dir, split, data)
