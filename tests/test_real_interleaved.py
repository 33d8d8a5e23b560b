"""Real stage-2 loaders on tiny fixtures written to tmp_path: MMC4 JSONL documents and frame folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from emu_lightning.data.real.interleaved import Mmc4Documents, VideoFolder


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (value, 50, 50)).save(path)


def _jsonl(path: Path, entries: list) -> Path:
    lines = [e if isinstance(e, str) else json.dumps(e) for e in entries]
    path.write_text("\n".join(lines) + "\n")
    return path


def _doc(**overrides) -> dict:
    doc = {
        "text_list": ["first", "second", "third"],
        "image_info": [
            {"image_name": "c.png", "matched_text_index": 2, "matched_sim": 0.3},
            {"image_name": "a.png", "matched_text_index": 0, "url": "http://x"},
            {"image_name": "b.png", "matched_text_index": 2},
        ],
    }
    return doc | overrides


@pytest.fixture
def img_dir(tmp_path: Path) -> Path:
    for k, name in enumerate(("a.png", "b.png", "c.png")):
        _png(tmp_path / "img" / name, 10 + 80 * k)
    return tmp_path / "img"


def test_mmc4_items_ordered_by_text_index(tmp_path: Path, img_dir: Path) -> None:
    path = _jsonl(tmp_path / "docs.jsonl", [_doc(id="d0"), "", _doc()])
    ds = Mmc4Documents(str(path), str(img_dir))
    assert len(ds) == 2
    item = ds[0]
    assert set(item) == {"id", "images", "texts", "image_text_index"}
    assert item["id"] == "d0" and item["texts"] == ["first", "second", "third"]
    assert item["image_text_index"] == [0, 2, 2]  # a.png, then c.png before b.png (stable tie)
    assert [im.getpixel((0, 0))[0] for im in item["images"]] == [10, 170, 90]
    assert all(im.mode == "RGB" and im.size == (16, 16) for im in item["images"])
    assert ds[1]["id"] == "docs:3"  # default id: file stem and line number (blank line 2 skipped)


def test_mmc4_max_images_keeps_first_by_text_order(tmp_path: Path, img_dir: Path) -> None:
    ds = Mmc4Documents(str(_jsonl(tmp_path / "docs.jsonl", [_doc(id="d0")])), str(img_dir), max_images=2)
    item = ds[0]
    assert item["image_text_index"] == [0, 2] and len(item["images"]) == 2
    assert [im.getpixel((0, 0))[0] for im in item["images"]] == [10, 170]
    with pytest.raises(ValueError, match="max_images=0"):
        Mmc4Documents(str(tmp_path / "docs.jsonl"), str(img_dir), max_images=0)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("{not json", r"docs\.jsonl:2: invalid JSON"),
        ("[1, 2]", r"docs\.jsonl:2: expected a JSON object, got list"),
        (_doc(id="bad", text_list=[]), r"docs\.jsonl:2 \(document 'bad'\): field 'text_list' .*non-empty list"),
        ({"id": "bad", "image_info": []}, r"docs\.jsonl:2 \(document 'bad'\): field 'text_list' is None"),
        (_doc(id="bad", image_info=[]), r"docs\.jsonl:2 \(document 'bad'\): field 'image_info' is \[\]"),
        (_doc(image_info=[{"matched_text_index": 0}]),
         r"\(document 'docs:2'\): image_info\[0\] lacks field 'image_name'"),
        (_doc(id="bad", image_info=[{"image_name": "a.png", "matched_text_index": 3}]),
         r"docs\.jsonl:2 \(document 'bad'\): image_info\[0\] \(a\.png\) has matched_text_index 3; "
         r"expected an int in \[0, 3\)"),
        (_doc(id="bad", image_info=[{"image_name": "a.png", "matched_text_index": "1"}]),
         r"\(document 'bad'\): image_info\[0\] \(a\.png\) has matched_text_index '1'"),
        (_doc(id="bad", image_info=[{"image_name": "a.png"}]), r"\(document 'bad'\).*matched_text_index None"),
    ],
)  # fmt: skip
def test_mmc4_bad_document_names_line_and_id(tmp_path: Path, img_dir: Path, entry, expected: str) -> None:
    path = _jsonl(tmp_path / "docs.jsonl", [_doc(id="ok"), entry])
    with pytest.raises(ValueError, match=expected):
        Mmc4Documents(str(path), str(img_dir))


def test_mmc4_missing_image(tmp_path: Path, img_dir: Path) -> None:
    path = _jsonl(tmp_path / "docs.jsonl", [_doc(id="d0")])
    (img_dir / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"img/b\.png of document 'd0' in .*docs\.jsonl"):
        Mmc4Documents(str(path), str(img_dir))
    assert len(Mmc4Documents(str(path), str(img_dir), max_images=2)) == 1  # b.png is not kept
    ds = Mmc4Documents(str(path), str(img_dir), check_files=False)
    with pytest.raises(FileNotFoundError, match=r"b\.png of document 'd0'"):
        ds[0]
    with pytest.raises(FileNotFoundError, match=r"MMC4 document file not found: .*nope\.jsonl"):
        Mmc4Documents(str(tmp_path / "nope.jsonl"), str(img_dir))


def _videos(tmp_path: Path, entries: list, frames: dict[str, int] | None = None) -> Path:
    for folder, n in (frames or {"v0": 3, "v1": 2}).items():
        for t in range(n):
            _png(tmp_path / "videos" / folder / f"frame_{t:03d}.png", 30 * t)
    (tmp_path / "videos" / "v0" / "notes.txt").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "videos" / "v0" / "notes.txt").write_text("not a frame")
    return _jsonl(tmp_path / "videos.jsonl", entries)


def test_video_items(tmp_path: Path) -> None:
    entries = [
        {"id": "a", "frames": "v0", "subtitles": ["s0", "s1", "s2"]},
        {"id": "b", "frames": "v1", "caption": "a red ball", "question": "what colour?", "answers": ["red"]},
    ]
    ds = VideoFolder(str(tmp_path / "videos"), str(_videos(tmp_path, entries)))
    assert len(ds) == 2
    a, b = ds[0], ds[1]
    assert set(a) == {"id", "frames", "subtitles"} and a["id"] == "a"
    assert a["subtitles"] == ["s0", "s1", "s2"]
    assert [f.getpixel((0, 0))[0] for f in a["frames"]] == [0, 30, 60]  # sorted by name, .txt ignored
    assert all(f.mode == "RGB" for f in a["frames"])
    assert set(b) == {"id", "frames", "subtitles", "question", "answers"}
    assert len(b["frames"]) == 2 and b["subtitles"] == ["a red ball"] * 2
    assert b["question"] == "what colour?" and b["answers"] == ["red"]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"frames": "v0", "caption": "c"}, r"videos\.jsonl:2: field 'id' is None"),
        ({"id": "x", "caption": "c"}, r"videos\.jsonl:2 \(video 'x'\): field 'frames'"),
        ({"id": "x", "frames": "v0"}, r"videos\.jsonl:2 \(video 'x'\): neither field 'subtitles'.*nor 'caption'"),
        ({"id": "x", "frames": "v0", "subtitles": "s"}, r"\(video 'x'\): field 'subtitles' is not a non-empty list"),
        ({"id": "x", "frames": "v0", "caption": "c", "answers": []},
         r"videos\.jsonl:2 \(video 'x'\): field 'answers' is \[\]; expected a non-empty list"),
        ({"id": "x", "frames": "v0", "caption": "c", "answers": "yes"}, r"\(video 'x'\): field 'answers' is 'yes'"),
        ({"id": "x", "frames": "v0", "caption": "c", "question": 3}, r"\(video 'x'\): field 'question' is 3"),
        ({"id": "x", "frames": "v0", "subtitles": ["s0", "s1"]},
         r"videos\.jsonl:2 \(video 'x'\): field 'subtitles' has 2 entries but .*v0 holds 3 frames"),
    ],
)  # fmt: skip
def test_video_bad_annotation_names_line_id_and_field(tmp_path: Path, entry: dict, expected: str) -> None:
    path = _videos(tmp_path, [{"id": "ok", "frames": "v1", "caption": "c"}, entry])
    with pytest.raises(ValueError, match=expected):
        VideoFolder(str(tmp_path / "videos"), str(path))


def test_video_missing_or_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "videos" / "empty").mkdir(parents=True)
    for folder, expected in [("gone", r"field 'frames' folder .*gone does not exist"),
                             ("empty", r"field 'frames' folder .*empty holds no jpg/jpeg/png/webp file")]:  # fmt: skip
        path = _videos(tmp_path, [{"id": "x", "frames": folder, "caption": "c"}])
        with pytest.raises(FileNotFoundError, match=r"videos\.jsonl:1 \(video 'x'\): " + expected):
            VideoFolder(str(tmp_path / "videos"), str(path))
        ds = VideoFolder(str(tmp_path / "videos"), str(path), check_files=False)
        with pytest.raises(FileNotFoundError, match=expected):
            ds[0]


def test_video_subtitle_count_checked_at_read_time(tmp_path: Path) -> None:
    path = _videos(tmp_path, [{"id": "x", "frames": "v0", "subtitles": ["s0", "s1", "s2"]}])
    ds = VideoFolder(str(tmp_path / "videos"), str(path), check_files=False)
    _png(tmp_path / "videos" / "v0" / "frame_999.jpg", 0)  # a frame added after construction
    with pytest.raises(ValueError, match=r"\(video 'x'\): field 'subtitles' has 3 entries but .* holds 4 frames"):
        ds[0]
