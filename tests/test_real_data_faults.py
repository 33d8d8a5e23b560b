"""Fuzzed real-format data: every fault ends in an error of ours naming the file / record / field, or in a counted,
logged skip; never a raw exception from deep inside json, PIL or tarfile.

Loaders covered: `CocoCaptions`, `WebDatasetPairs` (real.py), `Mmc4Documents`, `VideoFolder` (real_interleaved.py),
and the stage-2 mixture reading them. (Conversation JSON and grounding boxes: no loader exists yet.)"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest
from PIL import Image

from emu_lightning.data.modules.mixture import ResumableLoader, SourceMixture
from emu_lightning.data.real.captions import BadImage, CocoCaptions, WebDatasetPairs
from emu_lightning.data.real.interleaved import Mmc4Documents, VideoFolder
from emu_lightning.data.layout.sequence import Layout
from tests.helpers import write_tar


def _png_bytes(value: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value, 50, 50)).save(buf, format="PNG")
    return buf.getvalue()


GOOD, TRUNCATED, GARBAGE = _png_bytes(), _png_bytes()[:40], b"not an image at all"
HUGE = "word " * 200_000


def _ours(err: BaseException, *names: str) -> None:
    """An error of ours: a ValueError / FileNotFoundError (or a BadImage skip) whose message names `names`."""
    assert type(err) in (ValueError, FileNotFoundError, BadImage), f"raw {type(err).__name__}: {err}"
    for name in names:
        assert name in str(err), (name, str(err))


# --- COCO captions JSON ------------------------------------------------------------------------------------

def _coco(tmp: Path, data, images: dict[str, bytes] = {"a.png": GOOD}) -> tuple[Path, Path]:  # noqa: B006
    (tmp / "img").mkdir(exist_ok=True)
    for name, blob in images.items():
        (tmp / "img" / name).write_bytes(blob)
    path = tmp / "captions.json"
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return path, tmp / "img"


def _coco_doc(**over) -> dict:
    return {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "caption": "a cat."}]} | over


COCO_ERRORS = {
    "truncated json": (b'{"images": [{"id": 1, "file_na', ["captions.json", "invalid JSON", "line 1"]),
    "not utf-8": (b'{"images": "\xff\xfe"}', ["captions.json", "not UTF-8"]),
    "images not a list": (_coco_doc(images={"id": 1}), ["'images' is", "expected list"]),
    "id missing": (_coco_doc(images=[{"file_name": "a.png"}]), ["images[0]", "'id'"]),
    "file_name wrong type": (_coco_doc(images=[{"id": 1, "file_name": 7}]), ["images[0]", "'file_name'", "expected str"]),
    "caption wrong type": (_coco_doc(annotations=[{"image_id": 1, "caption": ["x"]}]), ["annotations[0]", "'caption'"]),
    "empty caption": (_coco_doc(annotations=[{"image_id": 1, "caption": "  "}]), ["annotations[0]", "empty 'caption'"]),
    "image without caption": (_coco_doc(annotations=[]), ["images[0]", "no caption"]),
    "orphan caption": (_coco_doc(annotations=[{"image_id": 1, "caption": "x"}, {"image_id": 9, "caption": "y"}]),
                       ["unknown image_id", "9"]),
    "missing image file": (_coco_doc(images=[{"id": 1, "file_name": "gone.png"}]), ["gone.png", "captions.json"]),
}


@pytest.mark.parametrize("case", COCO_ERRORS, ids=str)
def test_coco_faults_are_named(case, tmp_path):
    data, names = COCO_ERRORS[case]
    path, img = _coco(tmp_path, data)
    with pytest.raises(Exception) as err:
        CocoCaptions(str(path), str(img))
    _ours(err.value, *names)


@pytest.mark.parametrize("blob", [TRUNCATED, GARBAGE], ids=["truncated png", "garbage bytes"])
def test_coco_corrupt_image_is_a_named_skip(blob, tmp_path):
    path, img = _coco(tmp_path, _coco_doc(), {"a.png": blob})
    ds = CocoCaptions(str(path), str(img))
    with pytest.raises(BadImage) as err:
        ds[0]
    _ours(err.value, "a.png", "captions.json", "image id 1", "does not decode")
    long = CocoCaptions(*map(str, _coco(tmp_path, _coco_doc(annotations=[{"image_id": 1, "caption": HUGE}]),
                                        {"a.png": GOOD})))
    assert len(long[0]["captions"][0]) > 900_000  # huge text loads; the collator cuts it at max_length and counts


# --- webdataset shards ---------------------------------------------------------------------------------------

def test_webdataset_faults_are_counted_skips(tmp_path, recwarn):
    good = lambda k: (k, {"png": GOOD, "txt": b"a cat."})  # noqa: E731
    shard = str(write_tar(tmp_path / "s.tar", [
        good("ok0"), ("trunc", {"png": TRUNCATED, "txt": b"x"}), ("garbage", {"jpg": GARBAGE, "txt": b"x"}),
        ("noimage", {"txt": b"x"}), ("empty", {"png": GOOD, "txt": b"   "}), ("latin1", {"png": GOOD, "txt": b"\xff"}),
        ("jsonint", {"png": GOOD, "json": b'{"caption": 5}'}), ("badjson", {"png": GOOD, "json": b"{"}),
        ("huge", {"png": GOOD, "txt": HUGE.encode()}), good("ok1")]))
    ds = WebDatasetPairs(shard, max_bad_fraction=0.9)
    ids = [s["id"] for s in ds]
    assert ids == ["ok0", "huge", "ok1"]
    assert ds.stats == {"seen": 10, "ok": 3, "skipped/bad_image": 2, "skipped/missing_image": 1,
                        "skipped/missing_text": 1, "skipped/bad_text": 3}
    warned = " ".join(str(w.message) for w in recwarn)
    assert all(f"skipped sample {k!r}" in warned for k in ("trunc", "garbage", "noimage", "jsonint"))


def test_webdataset_truncated_shard_keeps_what_it_read_and_counts(tmp_path, recwarn):
    whole = write_tar(tmp_path / "w.tar", [(f"k{i}", {"png": GOOD, "txt": b"a cat."}) for i in range(6)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:5000])    # inside sample k2's files (a cut exactly at a member boundary
    ds = WebDatasetPairs([str(cut), str(whole)])  # reads as a shorter tar: tar has no index to tell)
    assert [s["id"] for s in ds] == ["k0", "k1"] + [f"k{i}" for i in range(6)]
    assert ds.stats["skipped/bad_shard"] == 1
    assert any("cut.tar: unreadable tar" in str(w.message) for w in recwarn)
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        WebDatasetPairs(str(tmp_path / "missing.tar"))


# --- MMC4 documents and video folders ------------------------------------------------------------------------

def _jsonl(path: Path, lines: list) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines) + b"\n")
    return path


DOC = {"text_list": ["one", "two"], "image_info": [{"image_name": "a.png", "matched_text_index": 1}]}
MMC4_ERRORS = {
    "truncated line": ([DOC, b'{"text_list": ["on'], ["docs.jsonl:2", "invalid JSON"]),
    "not utf-8": ([b'{"text_list": ["\xff"]}'], ["docs.jsonl:1", "not UTF-8"]),
    "not an object": ([[1, 2]], ["docs.jsonl:1", "expected a JSON object"]),
    "text_list wrong type": ([DOC | {"text_list": "one"}], ["docs.jsonl:1", "'text_list'"]),
    "empty text_list": ([DOC | {"text_list": []}], ["docs.jsonl:1", "'text_list'"]),
    "image_info wrong type": ([DOC | {"image_info": {"image_name": "a.png"}}], ["docs.jsonl:1", "'image_info'"]),
    "image index out of range": ([DOC | {"image_info": [{"image_name": "a.png", "matched_text_index": 2}]}],
                                 ["docs.jsonl:1", "matched_text_index 2", "[0, 2)"]),
    "image index a bool": ([DOC | {"image_info": [{"image_name": "a.png", "matched_text_index": True}]}],
                           ["docs.jsonl:1", "matched_text_index True"]),
    "missing image file": ([DOC | {"image_info": [{"image_name": "gone.png", "matched_text_index": 0}]}],
                           ["gone.png", "docs.jsonl"]),
}


@pytest.mark.parametrize("case", MMC4_ERRORS, ids=str)
def test_mmc4_faults_are_named(case, tmp_path):
    lines, names = MMC4_ERRORS[case]
    (tmp_path / "a.png").write_bytes(GOOD)
    with pytest.raises(Exception) as err:
        Mmc4Documents(str(_jsonl(tmp_path / "docs.jsonl", lines)), str(tmp_path))
    _ours(err.value, *names)


VIDEO = {"id": "v1", "frames": "v1", "subtitles": ["a", "b"]}
VIDEO_ERRORS = {
    "id missing": ([{"frames": "v1", "caption": "x"}], ["videos.jsonl:1", "'id'"]),
    "no text": ([{"id": "v1", "frames": "v1"}], ["videos.jsonl:1", "'subtitles'", "'caption'"]),
    "subtitles wrong count": ([VIDEO | {"subtitles": ["a", "b", "c"]}], ["video 'v1'", "3 entries", "2 frames"]),
    "answers wrong type": ([VIDEO | {"answers": "yes"}], ["video 'v1'", "'answers'"]),
    "missing folder": ([VIDEO | {"frames": "gone"}], ["video 'v1'", "gone", "does not exist"]),
}


@pytest.mark.parametrize("case", VIDEO_ERRORS, ids=str)
def test_video_faults_are_named(case, tmp_path):
    lines, names = VIDEO_ERRORS[case]
    for i in range(2):
        (tmp_path / "v1").mkdir(exist_ok=True)
        (tmp_path / "v1" / f"{i}.png").write_bytes(GOOD)
    with pytest.raises(Exception) as err:
        VideoFolder(str(tmp_path), str(_jsonl(tmp_path / "videos.jsonl", lines)))
    _ours(err.value, *names)


def test_corrupt_images_in_the_stage2_mixture_are_skipped_counted_and_logged(tmp_path, recwarn):
    """Documents and videos whose image files exist but do not decode: the mixture skips each one, counts it on
    the step by kind (the collator's `skipped`, logged as `train/skipped/bad_image`) and warns naming the file."""
    warnings.simplefilter("always")     # recwarn's "default" shows a repeated message once: count every skip
    for name, blob in {"a.png": GOOD, "bad.png": TRUNCATED}.items():
        (tmp_path / name).write_bytes(blob)
    docs = Mmc4Documents(str(_jsonl(tmp_path / "docs.jsonl", [
        DOC, DOC | {"image_info": [{"image_name": "bad.png", "matched_text_index": 0}]}, DOC])), str(tmp_path))
    for folder, blob in (("v1", GOOD), ("v2", GARBAGE)):
        (tmp_path / folder).mkdir()
        for i in range(2):
            (tmp_path / folder / f"{i}.png").write_bytes(blob)
    videos = VideoFolder(str(tmp_path), str(_jsonl(tmp_path / "videos.jsonl", [
        VIDEO, VIDEO | {"id": "v2", "frames": "v2"}])))
    stream = SourceMixture({"docs": docs, "videos": videos}, {"docs": 2, "videos": 1},
                           {"docs": Layout("interleaved"), "videos": Layout("video", num_frames=2)}, prepare=lambda x: x)
    steps = [s for _, s in zip(range(3), stream)]     # range first: zip must not draw (and warn for) a 4th step
    got = [d["id"] for s in steps for d in s]
    assert "docs:2" not in got and "v2" not in got
    assert {k for s in steps for d in s for k in d["skipped"]} == {"bad_image"}
    skipped = sum(n for s in steps for d in s for n in d["skipped"].values())
    skips = [str(w.message) for w in recwarn if "sample skipped and counted" in str(w.message)]
    # Seed 0's order reads the bad document and the bad video 3 times each in these 3 steps; every read is one count.
    assert skipped == len(skips) == 6, (skipped, skips)
    assert sum("(document 'docs:2')" in m for m in skips) == 3 and sum("(video 'v2')" in m for m in skips) == 3
    warned = " ".join(str(w.message) for w in recwarn)
    assert "bad.png does not decode" in warned and "v2" in warned and "sample skipped and counted" in warned


def test_webdataset_source_in_the_mixture_resumes_exactly_with_two_workers(tmp_path):
    """Tar shards as a stage-2 source, 2 DataLoader workers, stopped after an odd step: after the resume worker 0
    plays the other reader (the mixture rotates roles), so the shards it reads must follow that role, not its
    worker id. The resumed steps are the uninterrupted run's, sample for sample."""
    shards = [str(write_tar(tmp_path / f"{s}.tar", [(f"{s}{i}", {"png": GOOD, "txt": b"a cat."}) for i in range(10)]))
              for s in "AB"]

    def loader() -> ResumableLoader:
        ds = SourceMixture({"pairs": WebDatasetPairs(shards)}, {"pairs": 2}, {"pairs": Layout("pair")},
                           prepare=lambda x: 0)
        return ResumableLoader(ds, num_workers=2, collate_fn=lambda step: step)

    total, cut = 8, 3    # odd: the next step is the second worker's
    ids = lambda steps: [[d["id"] for d in s] for s in steps]  # noqa: E731
    reference = ids(s for s, _ in zip(loader(), range(total)))
    first = loader()
    for step, _ in zip(first, range(cut)):
        first.consumed(step.state)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert ids(s for s, _ in zip(resumed, range(total - cut))) == reference[cut:]
    assert {i[0] for s in reference[cut:] for i in s} == {"A", "B"}   # both shards, i.e. both readers, take part
