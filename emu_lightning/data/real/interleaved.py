"""Real stage-2 data from local paths: MMC4-style interleaved documents and videos as frame folders.

``Mmc4Documents`` yields ``{"id", "images", "texts", "image_text_index"}``: like
``SyntheticDocuments`` plus where each image sits (image j belongs next to
``texts[image_text_index[j]]``), since real documents do not pair one image with each sentence.
``VideoFolder`` yields ``SyntheticVideos``' ``{"id", "frames", "subtitles"}`` (one subtitle per
frame), plus ``"question"`` / ``"answers"`` when annotated. Both parse and validate every JSONL
line at construction, so a bad annotation fails before training, naming file, line, id and field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from torch.utils.data import Dataset

from emu_lightning.data.real.captions import IMAGE_EXTS, _load_rgb
from emu_lightning.data.real.images import check_image_files


def _read_jsonl(path: Path, kind: str) -> Iterator[tuple[int, dict]]:
    """``(line_no, object)`` for each non-blank line (1-based); bad JSON -> ValueError naming the line."""
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte {e.start}: {e.reason})") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(entry).__name__}")
            yield line_no, entry


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


class Mmc4Documents(Dataset):
    """MMC4-style JSONL: one document a line, ``{"text_list": [str], "image_info": [{image_name,
    matched_text_index}]}`` plus an optional ``"id"`` (default ``"<jsonl stem>:<line_no>"``).

    Images are ordered by ``matched_text_index`` (stable, so ties keep file order) and only the
    first ``max_images`` are kept (Emu1 uses 5). Unknown fields (url, matched_sim, ...) are ignored.
    """

    def __init__(
        self, jsonl: str, image_dir: str, max_images: int | None = None, check_files: bool = True
    ) -> None:
        """Args:
        jsonl: path of the MMC4-style JSONL, one document a line (blank lines skipped).
        image_dir: folder holding each ``image_name``.
        max_images: keep the first this many images of each document (by text position); None keeps all.
        check_files: stat every kept image at construction (a missing one still raises at read time).
        """
        self.jsonl, self.image_dir = Path(jsonl), Path(image_dir)
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images={max_images}; expected None or >= 1")
        self.items: list[tuple[str, list[str], list[tuple[int, str]]]] = []
        for line_no, doc in _read_jsonl(self.jsonl, "MMC4 document"):
            doc_id = str(doc.get("id", f"{self.jsonl.stem}:{line_no}"))
            where = f"{self.jsonl}:{line_no} (document {doc_id!r})"
            texts = doc.get("text_list")
            if not _is_str_list(texts) or not texts:
                raise ValueError(f"{where}: field 'text_list' is {texts!r:.80}; expected a non-empty list of str")
            infos = doc.get("image_info")
            if not isinstance(infos, list) or not infos:
                raise ValueError(f"{where}: field 'image_info' is {infos!r:.80}; expected a non-empty list")
            images = []
            for k, info in enumerate(infos):
                name = info.get("image_name") if isinstance(info, dict) else None
                if not isinstance(name, str) or not name:
                    raise ValueError(f"{where}: image_info[{k}] lacks field 'image_name' (a file name)")
                idx = info.get("matched_text_index")
                if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(texts):
                    raise ValueError(
                        f"{where}: image_info[{k}] ({name}) has matched_text_index {idx!r}; "
                        f"expected an int in [0, {len(texts)}) for its {len(texts)} texts"
                    )
                images.append((idx, name))
            images.sort(key=lambda pair: pair[0])  # stable: ties keep their order in image_info
            self.items.append((doc_id, texts, images[:max_images]))
        if check_files:   # every kept image exists (else an error); empty or undecodable ones listed up front
            check_image_files([self._path(name, doc_id) for doc_id, _, images in self.items for _, name in images],
                              str(self.jsonl))

    def _path(self, name: str, doc_id: str) -> Path:
        path = self.image_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"image {path} of document {doc_id!r} in {self.jsonl} does not exist")
        return path

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        doc_id, texts, images = self.items[index]
        return {
            "id": doc_id,
            "images": [_load_rgb(self._path(name, doc_id), f"{self.jsonl} (document {doc_id!r}): ") for _, name in images],
            "texts": list(texts),
            "image_text_index": [idx for idx, _ in images],
        }


class VideoFolder(Dataset):
    """Videos stored as folders of frames, annotated by a JSONL of ``{"id", "frames": <folder
    under root>, "subtitles": [str] (one per frame) | "caption": str, "question"?, "answers"?}``.

    Frames are the folder's image files (jpg/jpeg/png/webp) sorted by name. A ``caption`` is
    repeated for every frame; when both are given ``subtitles`` wins. No minimum frame count is
    enforced here (the datamodule does that).
    """

    def __init__(self, root: str, annotations: str, check_files: bool = True) -> None:
        """Args:
        root: folder that each annotation's ``frames`` path is relative to.
        annotations: path of the JSONL, one video a line (blank lines skipped).
        check_files: list every frame folder at construction and check subtitle counts against it
            (the same checks run at read time regardless).
        """
        self.root, self.annotations = Path(root), Path(annotations)
        self.items: list[tuple[str, dict]] = []
        for line_no, entry in _read_jsonl(self.annotations, "video annotation"):
            vid = entry.get("id")
            if not isinstance(vid, str) or not vid:
                raise ValueError(f"{self.annotations}:{line_no}: field 'id' is {vid!r}; expected a non-empty str")
            where = f"{self.annotations}:{line_no} (video {vid!r})"
            if not isinstance(entry.get("frames"), str):
                raise ValueError(f"{where}: field 'frames' is {entry.get('frames')!r}; expected a folder path")
            if "subtitles" in entry:
                if not _is_str_list(entry["subtitles"]) or not entry["subtitles"]:
                    raise ValueError(f"{where}: field 'subtitles' is not a non-empty list of str")
            elif not isinstance(entry.get("caption"), str):
                raise ValueError(f"{where}: neither field 'subtitles' (list of str) nor 'caption' (str)")
            if "question" in entry and not isinstance(entry["question"], str):
                raise ValueError(f"{where}: field 'question' is {entry['question']!r}; expected a str")
            if "answers" in entry and (not _is_str_list(entry["answers"]) or not entry["answers"]):
                raise ValueError(f"{where}: field 'answers' is {entry['answers']!r}; expected a non-empty list of str")
            self.items.append((where, entry))
        if check_files:
            for where, entry in self.items:
                self._subtitles(where, entry, len(self._frames(where, entry)))

    def _frames(self, where: str, entry: dict) -> list[Path]:
        folder = self.root / entry["frames"]
        if not folder.is_dir():
            raise FileNotFoundError(f"{where}: field 'frames' folder {folder} does not exist")
        frames = sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
        if not frames:
            raise FileNotFoundError(f"{where}: field 'frames' folder {folder} holds no {'/'.join(IMAGE_EXTS)} file")
        return frames

    def _subtitles(self, where: str, entry: dict, n_frames: int) -> list[str]:
        if "subtitles" not in entry:
            return [entry["caption"]] * n_frames
        if len(entry["subtitles"]) != n_frames:
            raise ValueError(
                f"{where}: field 'subtitles' has {len(entry['subtitles'])} entries but "
                f"{self.root / entry['frames']} holds {n_frames} frames; expected one per frame"
            )
        return list(entry["subtitles"])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        where, entry = self.items[index]
        frames = self._frames(where, entry)
        item = {"id": entry["id"], "frames": [_load_rgb(p, f"{where}: ") for p in frames],
                "subtitles": self._subtitles(where, entry, len(frames))}  # fmt: skip
        if "question" in entry:
            item["question"] = entry["question"]
        if "answers" in entry:
            item["answers"] = list(entry["answers"])
        return item
