"""Real-data loaders on tiny fixtures written to tmp_path: COCO JSON and webdataset tar shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from emu_lightning.data.real.captions import CocoCaptions, WebDatasetPairs, expand_urls
from tests.helpers import write_tar


def _png(color: tuple[int, int, int] = (200, 10, 10), size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _write_coco(tmp_path: Path, images: tuple[str, ...] = ("a.png", "b.png", "c.png")) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    for k, name in enumerate(images):
        (tmp_path / "img" / name).write_bytes(_png((k * 80, 50, 50)))
    data = {
        "images": [{"id": 10 + k, "file_name": n} for k, n in enumerate(("a.png", "b.png", "c.png"))],
        "annotations": [{"image_id": 10 + k, "caption": f"caption {j} of image {k}"}
                        for k in range(3) for j in range(2)],  # fmt: skip
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    return path




def _good(key: str) -> tuple[str, dict[str, bytes]]:
    return key, {"png": _png(), "txt": f"text of {key}".encode()}


def test_coco_items(tmp_path: Path) -> None:
    ds = CocoCaptions(str(_write_coco(tmp_path)), str(tmp_path / "img"))
    assert len(ds) == 3
    item = ds[1]
    assert set(item) == {"id", "image", "captions"}
    assert item["id"] == "11" and item["captions"] == ["caption 0 of image 1", "caption 1 of image 1"]
    assert item["image"].mode == "RGB" and item["image"].getpixel((0, 0)) == (80, 50, 50)


def test_coco_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoCaptions(str(tmp_path / "nope.json"), str(tmp_path))


@pytest.mark.parametrize(
    ("section", "index", "field", "where"),
    [
        (None, None, "images", "top level"),
        (None, None, "annotations", "top level"),
        ("images", 1, "file_name", r"images\[1\]"),
        ("images", 2, "id", r"images\[2\]"),
        ("annotations", 3, "image_id", r"annotations\[3\]"),
        ("annotations", 0, "caption", r"annotations\[0\]"),
    ],
)
def test_coco_missing_field_names_file_field_and_index(tmp_path, section, index, field, where) -> None:
    path = _write_coco(tmp_path)
    data = json.loads(path.read_text())
    del (data if section is None else data[section][index])[field]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"captions\.json: {where} lacks required field '{field}'"):
        CocoCaptions(str(path), str(tmp_path / "img"))


def test_coco_image_without_caption_or_caption_without_image(tmp_path: Path) -> None:
    path = _write_coco(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 12]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"images\[2\] \(id 12, c.png\) has no caption"):
        CocoCaptions(str(path), str(tmp_path / "img"))
    data["annotations"].append({"image_id": 99, "caption": "orphan"})
    data["images"] = data["images"][:2]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown image_id, e.g. 99"):
        CocoCaptions(str(path), str(tmp_path / "img"))


def test_coco_missing_image_file(tmp_path: Path) -> None:
    path = _write_coco(tmp_path, images=("a.png", "c.png"))  # b.png never written
    with pytest.raises(FileNotFoundError, match=r"img/b\.png listed in .*captions\.json"):
        CocoCaptions(str(path), str(tmp_path / "img"))
    lazy = CocoCaptions(str(path), str(tmp_path / "img"), check_files=False)
    assert lazy[0]["id"] == "10"
    with pytest.raises(FileNotFoundError, match=r"img/b\.png listed in .*captions\.json"):
        lazy[1]


def test_expand_urls() -> None:
    assert expand_urls("d/shard-{008..011}.tar") == [f"d/shard-{k:03d}.tar" for k in range(8, 12)]
    assert expand_urls(["x-{1..2}.tar", "y.tar"]) == ["x-1.tar", "x-2.tar", "y.tar"]
    with pytest.raises(ValueError, match="range end 1 < start 3"):
        expand_urls("s-{3..1}.tar")


def test_tar_skips_and_counts_bad_samples(tmp_path: Path) -> None:
    samples = [_good(f"s{k:02d}") for k in range(8)]
    samples.insert(3, ("corrupt", {"png": b"not an image at all", "txt": b"a caption"}))
    samples.insert(6, ("notext", {"png": _png()}))
    samples.append(("jsoncap", {"jpg": _png(), "json": json.dumps({"caption": "from json"}).encode()}))
    shard = write_tar(tmp_path / "shard-000.tar", samples)
    ds = WebDatasetPairs(str(shard), max_bad_fraction=0.25)
    with pytest.warns(UserWarning) as record:
        items = list(ds)
    assert [it["id"] for it in items] == [f"s{k:02d}" for k in range(8)] + ["jsoncap"]
    assert items[0]["captions"] == ["text of s00"] and items[-1]["captions"] == ["from json"]
    assert items[0]["image"].mode == "RGB"
    assert ds.stats == {"seen": 11, "ok": 9, "skipped/bad_image": 1, "skipped/missing_text": 1}
    messages = " ".join(str(w.message) for w in record)
    assert "'corrupt' (bad_image)" in messages and "'notext' (missing_text)" in messages


def test_tar_bad_fraction_aborts_with_shard_and_counts(tmp_path: Path) -> None:
    samples = [_good(f"g{k:02d}") for k in range(15)] + [(f"b{k}", {"png": _png()}) for k in range(6)]
    shard = write_tar(tmp_path / "bad.tar", samples)
    expected = r"bad\.tar: 5 of 20 samples skipped \(25\.0% > max_bad_fraction 10\.0%\)"
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=expected):
        list(WebDatasetPairs(str(shard), max_bad_fraction=0.1))
    # The same fraction below 20 samples is tolerated, but a stream with no good sample is not.
    few = write_tar(tmp_path / "few.tar", samples[:12] + samples[15:17])  # 2 of 14 bad, under 20 seen
    with pytest.warns(UserWarning):
        assert len(list(WebDatasetPairs(str(few), max_bad_fraction=0.1))) == 12
    allbad = write_tar(tmp_path / "allbad.tar", samples[15:18])
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="all 3 samples skipped"):
        list(WebDatasetPairs(str(allbad)))


def test_tar_missing_shard(tmp_path: Path) -> None:
    write_tar(tmp_path / "s-0.tar", [_good("a")])
    with pytest.raises(FileNotFoundError, match=r"s-1\.tar"):
        WebDatasetPairs(str(tmp_path / "s-{0..1}.tar"))


def _four_shards(tmp_path: Path) -> tuple[str, set[str]]:
    keys = set()
    for s in range(4):
        ks = [f"shard{s}_{k}" for k in range(3)]
        keys.update(ks)
        write_tar(tmp_path / f"shard-{s:03d}.tar", [_good(k) for k in ks])
    return str(tmp_path / "shard-{000..003}.tar"), keys


def test_tar_workers_read_each_sample_once(tmp_path: Path) -> None:
    pattern, keys = _four_shards(tmp_path)
    loader = DataLoader(WebDatasetPairs(pattern), batch_size=None, num_workers=2)
    ids = [item["id"] for item in loader]
    assert sorted(ids) == sorted(keys)


def test_tar_ranks_read_disjoint_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pattern, keys = _four_shards(tmp_path)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    per_rank = []
    for rank in range(2):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda r=rank: r)
        per_rank.append([item["id"] for item in WebDatasetPairs(pattern)])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)
