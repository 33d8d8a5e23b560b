"""Real instruction data: LLaVA conversation JSON plus an image folder.

``LlavaConversations`` yields ``SyntheticChat``'s dict minus ``scenes``: ``{"id", "images": [PIL
RGB], "conversations": [{"from": "human"|"gpt", "value"}...], "answers": [last gpt value],
"task": "llava"}``, so chat collation cannot tell them apart. The JSON is validated at
construction (a bad record fails before training, naming file, record index and id, field,
value and what was expected); an image that exists but does not decode raises `BadImage`, which
the stream skips and counts, as for the other real loaders.

LLaVA conventions kept: roles "user"/"assistant" are read as "human"/"gpt"; a record with images
but no ``<image>`` placeholder gets ``"<image>\\n"`` per image prepended to its first human turn.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from emu_lightning.data.real.captions import _load_rgb
from emu_lightning.data.real.images import check_image_files
from emu_lightning.data.layout.tokens import IMAGE

_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


class LlavaConversations(Dataset):
    """LLaVA-format records ``{"id", "image"?: "rel.jpg" | ["a.jpg", ...], "conversations": [{"from",
    "value"}...]}``: turns alternate human, gpt, ... starting with human and ending with gpt; the
    ``<image>`` placeholders of the human turns match the images one to one, in order (none may
    sit in a gpt turn). Every image file is checked to exist at construction, and, as for the other
    real loaders, empty or header-undecodable ones are listed in one warning before training.
    """

    def __init__(self, json_path: str, image_root: str, image_size: int | None = None,
                 check_files: bool = True) -> None:
        """Args:
        json_path: the conversation JSON (a list of records).
        image_root: folder the records' image paths are relative to.
        image_size: resize every image to this square side (bicubic); None keeps its size.
        check_files: stat every image at construction and read a sample's headers (`check_image_files`); a
            missing image is an error either way.
        """
        self.json_path, self.image_root = Path(json_path), Path(image_root)
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size={image_size}; expected None or >= 1")
        self.image_size = image_size
        if not self.json_path.is_file():
            raise FileNotFoundError(f"LLaVA conversation file not found: {self.json_path}")
        try:
            with open(self.json_path, encoding="utf-8") as f:
                records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.json_path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.json_path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        if not isinstance(records, list):
            raise ValueError(f"{self.json_path}: top level is a {type(records).__name__}; expected a list of records")
        self.items = [self._validate(i, r) for i, r in enumerate(records)]
        paths = [self._path(name, item_id) for item_id, images, _ in self.items for name in images]
        if check_files:   # empty or undecodable files listed up front (each file once, however many records use it)
            check_image_files(list(dict.fromkeys(paths)), str(self.json_path))

    def _validate(self, index: int, record: object) -> tuple[str, list[str], list[dict]]:
        """``(id, image names, normalized turns)`` of one record, or ValueError naming what is wrong."""
        if not isinstance(record, dict):
            raise ValueError(f"{self.json_path}: record {index} is a {type(record).__name__}; expected an object")
        item_id = str(record.get("id", f"{self.json_path.stem}:{index}"))
        where = f"{self.json_path}: record {index} (id {item_id!r})"
        images = record.get("image", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(n, str) and n for n in images):
            raise ValueError(f"{where}: field 'image' is {record['image']!r:.80}; expected a path or a list of paths")
        if "conversations" not in record:
            raise ValueError(f"{where}: lacks required field 'conversations'")
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: field 'conversations' is {turns!r:.80}; expected a non-empty list of turns")
        out = []
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise ValueError(
                    f"{where}: conversations[{k}] is {turn!r:.80}; expected {{'from': ..., 'value': str}}"
                )
            role = _ROLES.get(turn.get("from"))
            if role is None:
                raise ValueError(f"{where}: conversations[{k}] field 'from' is {turn.get('from')!r}; "
                                 f"expected one of {list(_ROLES)}")  # fmt: skip
            expected = "human" if k % 2 == 0 else "gpt"
            if role != expected:
                raise ValueError(f"{where}: conversations[{k}] field 'from' is {turn['from']!r} but turn {k} must be "
                                 f"{expected!r}: turns alternate human, gpt, ... starting with human")  # fmt: skip
            if role == "gpt" and IMAGE in turn["value"]:
                raise ValueError(
                    f"{where}: conversations[{k}] (gpt) value holds {IMAGE}; placeholders go in human turns"
                )
            out.append({"from": role, "value": turn["value"]})
        if out[-1]["from"] != "gpt":
            raise ValueError(
                f"{where}: conversations ends with a 'human' turn ({len(out)} turns); expected a final 'gpt' answer"
            )
        n_placeholders = sum(t["value"].count(IMAGE) for t in out)
        if images and n_placeholders == 0:  # LLaVA convention: images go before the first question
            out[0] = {"from": "human", "value": f"{IMAGE}\n" * len(images) + out[0]["value"]}
        elif n_placeholders != len(images):
            raise ValueError(
                f"{where}: {n_placeholders} {IMAGE} placeholder(s) in human turns but field 'image' "
                f"gives {len(images)} image(s) {images!r:.80}; expected one placeholder per image"
            )
        return item_id, images, out

    def _path(self, name: str, item_id: str) -> Path:
        path = self.image_root / name
        if not path.is_file():
            raise FileNotFoundError(f"image {path} of record {item_id!r} in {self.json_path} does not exist")
        return path

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item_id, names, turns = self.items[index]
        images = [_load_rgb(self._path(n, item_id), f"{self.json_path} (record {item_id!r}): ") for n in names]
        if self.image_size is not None:
            side = (self.image_size, self.image_size)
            images = [im.resize(side, Image.Resampling.BICUBIC) for im in images]
        return {"id": item_id, "images": images, "conversations": [dict(t) for t in turns],
                "answers": [turns[-1]["value"]], "task": "llava"}  # fmt: skip
