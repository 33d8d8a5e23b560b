"""Data headroom: samples/s each training datamodule delivers vs samples/s the model trains on, in one run.

    python benchmarks/perf_data.py --rounds 3 --batches 8 --threads 2

Model rates: the bare training loop of `perf_overhead` (forward, backward, clip, step) over prepared batches
of the debug stage-1 mean-pool and stage-2 mean-pool recipes: batch size / step time. Data rates: the recipe's
datamodule at its batch size, `num_workers` and image size, timed from the arrival of the first batch (worker
start excluded) over `--batches` batches, with the main process only waiting, so the workers have the cores
(in training they share them with the model). Sources:

- stage 1 (`CaptionDataModule`): synthetic captions; COCO captions JSON + JPEG folder (`CocoCaptions`);
- stage 2 (`MultimodalDataModule`, one source per datamodule, or the recipe's synthetic mixture):
  the synthetic mixture; `CocoCaptions`; webdataset tar shards (`WebDatasetPairs`); MMC4 JSONL + JPEGs
  (`Mmc4Documents`); video frame folders (`VideoFolder`).

The real-format files are generated in a temporary folder from synthetic scenes rendered at `--real-size`
px and saved as JPEG (quality 90); they sit in the page cache, so disk reads are not measured. Headroom =
data rate / model rate, per round (sides alternate). Where the time goes is profiled once per source in one
process (num_workers 0, cProfile): generator (synthetic rendering), decode (PIL open + decode + RGB),
transform (resize, crop, normalise), tokenise, collate (layout, padding, stacking; tokenising excluded).
Run alone, the rows (with command, date, machine, wall time) merge under the run's UTC start time into
benchmarks/results/perf_data.json; inside `benchmarks/perf.py` they go to that run's results.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import pstats
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from perf_common import Row, interleaved, machine, set_threads, table
from results_io import merge_result, run_facts, run_key
from perf_overhead import ROOT, Runner, build

STAGE1 = ROOT / "recipes" / "debug" / "stage1_meanpool.yaml"
STAGE2 = ROOT / "recipes" / "debug" / "stage2_meanpool.yaml"


# --- real-format files ---------------------------------------------------------------------------------------

def _jpeg(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)


def write_real(root: Path, size: int, n_images: int = 96, n_docs: int = 16, n_videos: int = 8) -> dict[str, Path]:
    """COCO JSON + JPEGs, 4 tar shards, MMC4 JSONL + JPEGs and frame folders under `root`."""
    from emu_lightning.data.synthetic.scenes import SyntheticCaptions, SyntheticDocuments, SyntheticVideos

    caps = SyntheticCaptions(split="train", size=n_images, image_size=size)
    images, anns = [], []
    shards = [tarfile.open(root / f"shard-{k:03d}.tar", "w") for k in range(4)]
    for i in range(n_images):
        s = caps[i]
        name = f"{i:06d}.jpg"
        _jpeg(s["image"], root / "coco" / name)
        images.append({"id": i, "file_name": name})
        anns += [{"image_id": i, "caption": c} for c in s["captions"]]
        buf = io.BytesIO()
        s["image"].save(buf, format="JPEG", quality=90)
        for key, data in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.txt", s["captions"][0].encode())):
            info = tarfile.TarInfo(key)
            info.size = len(data)
            shards[i % 4].addfile(info, io.BytesIO(data))
    for t in shards:
        t.close()
    (root / "coco.json").write_text(json.dumps({"images": images, "annotations": anns}))
    docs = SyntheticDocuments(split="train", size=n_docs, image_size=size)
    lines = []
    for d in range(n_docs):
        s = docs[d]
        infos = []
        for k, im in enumerate(s["images"]):
            name = f"d{d:04d}_{k}.jpg"
            _jpeg(im, root / "mmc4" / name)
            infos.append({"image_name": name, "matched_text_index": k})
        lines.append(json.dumps({"id": f"doc{d}", "text_list": s["texts"], "image_info": infos}))
    (root / "mmc4.jsonl").write_text("\n".join(lines) + "\n")
    vids = SyntheticVideos(split="train", size=n_videos, image_size=size)
    lines = []
    for v in range(n_videos):
        s = vids[v]
        for t, frame in enumerate(s["frames"]):
            _jpeg(frame, root / "videos" / f"v{v:03d}" / f"frame_{t:03d}.jpg")
        lines.append(json.dumps({"id": f"v{v}", "frames": f"v{v:03d}", "subtitles": s["subtitles"]}))
    (root / "videos.jsonl").write_text("\n".join(lines) + "\n")
    return {"coco_json": root / "coco.json", "coco_dir": root / "coco", "shards": root / "shard-{000..003}.tar",
            "mmc4": root / "mmc4.jsonl", "mmc4_dir": root / "mmc4", "videos": root / "videos.jsonl",
            "videos_dir": root / "videos"}


# --- datamodules ---------------------------------------------------------------------------------------------

def stage1_module(dm, train, size: int):
    from emu_lightning.data.modules.captions import CaptionDataModule

    return CaptionDataModule(train=train, val={}, test={}, image_size=size, batch_size=dm.batch_size,
                             num_workers=dm.num_workers, max_length=dm.max_length, tokenizer=dm.tokenizer,
                             num_image_tokens=dm.num_image_tokens)


def stage2_module(dm, name: str, source, size: int, layout: str | None = None):
    from emu_lightning.data.modules.multimodal import MultimodalDataModule

    return MultimodalDataModule(train={name: source}, weights={name: 1.0}, layouts={name: layout} if layout else None,
                                val={}, test={}, demos={}, image_size=size, batch_size=dm.batch_size,
                                num_workers=dm.num_workers, max_length=dm.max_length, num_frames=dm.num_frames,
                                video_token=dm.video_token, tokenizer=dm.tokenizer,
                                num_image_tokens=dm.num_image_tokens)


def _image_size(dm) -> int:
    size = next(t.size for t in dm.transform.transforms if hasattr(t, "size"))   # the Resize: int or [int]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _batches(loader):
    """Endless batches: a map-style loader's epochs follow one another (its workers persist)."""
    while True:
        yield from loader


def loader_seconds(dm, batches: int) -> float:
    """Seconds for `batches` batches after the first one has arrived (worker start-up excluded)."""
    it = _batches(dm.train_dataloader())
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    it.close()
    return dt


# --- where the time goes -------------------------------------------------------------------------------------

BUCKETS = {  # bucket → (file suffix, function name) entries whose cumulative times add up (none nests in another)
    "generator": [("synthetic.py", "__getitem__")],
    "tar read": [("real.py", "_groups")],
    "decode": [("real.py", "_load_rgb"), ("real.py", "_decode")],
    "transform": [("_container.py", "forward")],          # torchvision v2 Compose: resize, to float, normalise
    "tokenise": [("tokenization_utils_base.py", "__call__")],
    "layout+collate": [("sequence.py", "__call__"), ("collate.py", "__call__")],
}


def profile_shares(dm, batches: int) -> dict[str, float]:
    """Shares of one process's time (num_workers 0) per bucket, over `batches` batches."""
    workers, dm.num_workers = dm.num_workers, 0
    it = _batches(dm.train_dataloader())
    next(it)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(batches):
        next(it)
    prof.disable()
    it.close()
    dm.num_workers = workers
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values())   # tottime over every function = profiled wall
    cum = {}
    for bucket, keys in BUCKETS.items():
        cum[bucket] = sum(v[3] for (file, _, fn), v in stats.items() if any(file.endswith(f) and fn == n for f, n in keys))
    cum["layout+collate"] -= cum["tokenise"]   # tokenising runs inside the collators
    cum["other"] = max(0.0, total - sum(cum.values()))
    return {k: v / total for k, v in cum.items()}


def _shares_text(shares: dict[str, float]) -> str:
    top = sorted(((v, k) for k, v in shares.items() if v >= 0.005), reverse=True)
    return ", ".join(f"{k} {v:.0%}" for v, k in top)


# --- the benchmark -------------------------------------------------------------------------------------------

def run(rounds: int = 3, batches: int = 8, steps: int = 6, threads: int = 2, real_size: int = 256) -> list[Row]:
    set_threads(threads)
    from emu_lightning.data.real.captions import CocoCaptions, WebDatasetPairs
    from emu_lightning.data.real.interleaved import Mmc4Documents, VideoFolder

    models, sources = {}, {}
    for stage, recipe in (("stage 1", STAGE1), ("stage 2", STAGE2)):
        model, prepared, trainer, dm = build(recipe, steps)
        models[stage] = (Runner(model, prepared, float(trainer.gradient_clip_val or 0) or None, 10), dm)
    tmp = tempfile.TemporaryDirectory()
    real = write_real(Path(tmp.name), real_size)
    dm1, dm2 = models["stage 1"][1], models["stage 2"][1]
    s1, s2 = _image_size(dm1), _image_size(dm2)
    sources["stage 1"] = {
        "synthetic captions": dm1,
        "COCO JSON + JPEG": stage1_module(dm1, CocoCaptions(str(real["coco_json"]), str(real["coco_dir"])), s1),
    }
    sources["stage 2"] = {
        "synthetic mixture (recipe)": dm2,
        "COCO JSON + JPEG": stage2_module(dm2, "coco", CocoCaptions(str(real["coco_json"]), str(real["coco_dir"])), s2),
        "webdataset tar shards": stage2_module(dm2, "laion", WebDatasetPairs(str(real["shards"])), s2, layout="pair"),
        "MMC4 JSONL + JPEG": stage2_module(dm2, "mmc4", Mmc4Documents(str(real["mmc4"]), str(real["mmc4_dir"])), s2),
        "video frame folders": stage2_module(dm2, "videos", VideoFolder(str(real["videos_dir"]), str(real["videos"])), s2),
    }
    sides = {}
    for stage, (runner, dm) in models.items():
        sides[f"{stage}|model"] = runner.bare
        for name, sdm in sources[stage].items():
            sides[f"{stage}|{name}"] = (lambda sdm=sdm: loader_seconds(sdm, batches))
    times = interleaved(sides, rounds=rounds, warmup=1)
    rows = []
    for stage, (runner, dm) in models.items():
        B = dm.batch_size
        model_rates = [B * len(runner.batches) / t for t in times[f"{stage}|model"]]
        for name, sdm in sources[stage].items():
            data_rates = [B * batches / t for t in times[f"{stage}|{name}"]]
            per_round = [d / m for d, m in zip(data_rates, model_rates)]
            ratio = statistics.median(data_rates) / statistics.median(model_rates)
            shares = profile_shares(sdm, max(2, batches // 2))
            rows.append(Row("data headroom", f"{stage}: {name}", ratio, "≥ 5×",
                            f"model {statistics.median(model_rates):.1f} samples/s",
                            f"data {statistics.median(data_rates):.1f} samples/s",
                            f"{min(per_round):.2f}–{max(per_round):.2f}", rounds,
                            f"batch {B}, {sdm.num_workers} worker(s), {_image_size(sdm)} px; one-process time: "
                            f"{_shares_text(shares)}", ratio_min=max(data_rates) / max(model_rates)))
    tmp.cleanup()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=8, help="timed batches per data measurement")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per model measurement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--real-size", type=int, default=256, help="side of the generated JPEGs")
    a = p.parse_args()
    key, start = run_key(), time.perf_counter()
    rows = run(a.rounds, a.batches, a.steps, a.threads, a.real_size)
    print(machine())
    print(table(rows))
    entry = {**run_facts(), "wall_s": round(time.perf_counter() - start, 1),
             "rows": [dataclasses.asdict(r) for r in rows]}
    print(f"wrote {merge_result('perf_data', key, entry)} [{key!r}]")


if __name__ == "__main__":
    main()
