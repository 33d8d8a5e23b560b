"""Skip accounting in stage 1 (map-style and stream sources) and stage 2 (the source mixture: interleaved documents,
chat records, tar streams): a sample that cannot be read is skipped and counted by kind, logged as
`train/skipped_total` / `train/skipped/<kind>`, kept in the checkpoint's counters, and bounded by the data's
`max_bad_fraction`; one mechanism (`PartsSystem.count_skips`) for every stage."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from emu_lightning.cli import cli_main, main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def _coco(tmp: Path, n_good: int, n_bad: int) -> dict:
    names = [f"g{i}.png" for i in range(n_good)] + [f"b{i}.png" for i in range(n_bad)]
    for name in names:
        (tmp / name).write_bytes(_png("red") if name.startswith("g") else b"not a png")
    (tmp / "captions.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
        "annotations": [{"image_id": i, "caption": "a red square."} for i in range(len(names))]}))
    return {"class_path": "emu_lightning.data.real.captions.CocoCaptions",
            "init_args": {"annotations": str(tmp / "captions.json"), "image_dir": str(tmp)}}


def _fit(tmp: Path, train: dict, steps: int, **data) -> tuple:
    overlay = tmp / "o.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"max_steps": steps, "val_check_interval": steps, "limit_val_batches": 0,
                    "log_every_n_steps": 1, "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp / "runs"), "name": "s", "version": 0}}},
        "data": {"init_args": {"train": train, "batch_size": 4, "num_workers": 0, **data}}}))
    cli = cli_main(["fit", "--config", str(ROOT / "recipes" / "debug" / "stage1_meanpool.yaml"),
                    "--config", str(overlay)])
    return cli, tmp / "runs" / "s" / "version_0"


def test_map_source_skips_are_counted_logged_and_checkpointed(tmp_path):
    with pytest.warns(UserWarning, match="bad image file"):
        cli, run = _fit(tmp_path, _coco(tmp_path, 6, 2), steps=4, max_bad_fraction=0.5)
    counters = cli.model.counters
    assert counters["skipped/bad_image"] == counters["skipped"] > 0      # every epoch reads both bad files
    assert counters["seen"] == 4 * 4 + counters["skipped"]               # batches keep their size
    assert cli.trainer.callback_metrics["train/skipped_total"] == counters["skipped"]
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["emu_state"]["counters"]
    assert saved["skipped/bad_image"] == counters["skipped/bad_image"]


def test_max_bad_fraction_stops_the_run_naming_the_counts(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=r"max_bad_fraction=0\.01.*bad_image"):
        _fit(tmp_path, _coco(tmp_path, 2, 6), steps=80, max_bad_fraction=0.01)


def test_stream_skips_reach_the_training_process(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for key, files in [("a", {"png": _png("red"), "txt": b"a red square."}), ("b", {"png": b"bad", "txt": b"x"}),
                           ("c", {"png": _png("blue"), "txt": b"   "}), ("d", {"png": _png("blue"), "txt": b"blue."})] * 4:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    train = {"class_path": "emu_lightning.data.real.captions.WebDatasetPairs",
             "init_args": {"urls": str(shard), "max_bad_fraction": 0.9}}
    with pytest.warns(UserWarning):
        cli, _ = _fit(tmp_path, train, steps=1, max_bad_fraction=0.9)
    assert cli.model.counters["skipped/bad_image"] >= 1 and cli.model.counters["skipped/missing_text"] >= 1


# --- stage 2: the source mixture ---------------------------------------------------------------------------------

def _mmc4(tmp: Path, n_good: int, n_bad: int) -> dict:
    lines = []
    for i in range(n_good + n_bad):
        name = f"doc{i}.png" if i < n_good else f"doc_bad{i}.png"
        (tmp / name).write_bytes(_png("green") if i < n_good else b"not a png")
        lines.append(json.dumps({"text_list": ["a green square.", "it stays."],
                                 "image_info": [{"image_name": name, "matched_text_index": 0}]}))
    (tmp / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return {"class_path": "emu_lightning.data.real.interleaved.Mmc4Documents",
            "init_args": {"jsonl": str(tmp / "docs.jsonl"), "image_dir": str(tmp)}}


def _llava(tmp: Path, n_good: int, n_bad: int) -> dict:
    records = []
    for i in range(n_good + n_bad):
        name = f"chat{i}.png" if i < n_good else f"chat_bad{i}.png"
        (tmp / name).write_bytes(_png("blue") if i < n_good else b"not a png")
        records.append({"id": f"c{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nwhat color is it?"}, {"from": "gpt", "value": "blue."}]})
    (tmp / "chat.json").write_text(json.dumps(records))
    return {"class_path": "emu_lightning.data.real.chat.LlavaConversations",
            "init_args": {"json_path": str(tmp / "chat.json"), "image_root": str(tmp)}}


def _fit2(tmp: Path, train: dict, steps: int, **data) -> tuple:
    overlay = tmp / "o2.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"max_steps": steps, "val_check_interval": steps, "limit_val_batches": 0,
                    "log_every_n_steps": 1, "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp / "runs"), "name": "s2", "version": 0}}},
        "model": {"init_args": {"whiten_batches": 1}},
        "data": {"init_args": {"train": train, "weights": {name: 1.0 for name in train}, "val": {}, "test": {},
                               "demos": {}, "template": "plain", "layouts": data.pop("layouts", {}),
                               "num_workers": 0, "max_length": 96, **data}}}))
    return ["fit", "--config", str(ROOT / "recipes" / "debug" / "stage2_meanpool.yaml"), "--config", str(overlay)]


def test_stage2_skips_of_documents_chat_records_and_streams_are_counted_by_kind(tmp_path):
    """A bad image in an interleaved document and in a chat record (`bad_image`), and a tar stream's own skips
    (`missing_text`, riding on its next sample), all reach the one account: counters by kind, logged, checkpointed."""
    shard = tmp_path / "pairs.tar"
    with tarfile.open(shard, "w") as tar:
        pairs = [("a", {"png": _png("red"), "txt": b"a red square."}), ("c", {"png": _png("red"), "txt": b" "})]
        for key, files in pairs * 8:
            for ext, blob in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    train = {"docs": _mmc4(tmp_path, 3, 1), "chat": _llava(tmp_path, 3, 1),
             "pairs": {"class_path": "emu_lightning.data.real.captions.WebDatasetPairs",
                       "init_args": {"urls": str(shard), "max_bad_fraction": 0.9}}}
    with pytest.warns(UserWarning, match="bad image file"):
        cli = cli_main(_fit2(tmp_path, train, steps=3, batch_size=6, layouts={"pairs": "pair"}, max_bad_fraction=0.9))
    counters = cli.model.counters
    assert counters["skipped/bad_image"] >= 2 and counters["skipped/missing_text"] >= 1, counters
    assert counters["skipped"] == counters["skipped/bad_image"] + counters["skipped/missing_text"]
    assert counters["seen"] == 3 * 6 + counters["skipped"]                 # every step keeps its 6 documents
    metrics = cli.trainer.callback_metrics
    assert metrics["train/skipped_total"] == counters["skipped"]
    assert metrics["train/skipped/missing_text"] == counters["skipped/missing_text"]
    saved = torch.load(tmp_path / "runs" / "s2" / "version_0" / "checkpoints" / "last.ckpt",
                       weights_only=True)["emu_state"]["counters"]
    assert saved["skipped/bad_image"] == counters["skipped/bad_image"]


def test_stage2_max_bad_fraction_stops_the_run_naming_the_bound(tmp_path, capsys):
    train = {"docs": _mmc4(tmp_path, 1, 9)}
    with pytest.warns(UserWarning):
        assert main(_fit2(tmp_path, train, steps=60, batch_size=4, max_bad_fraction=0.5)) == 1
    block = capsys.readouterr().err.strip().splitlines()
    assert len(block) <= 4, block
    assert all(n in block[0] for n in ("max_bad_fraction=0.5", "bad_image", "data.init_args.max_bad_fraction")), block
