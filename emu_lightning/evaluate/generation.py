"""Text-to-image samples written in the folder layouts of GenEval, DPG-Bench and zero-shot COCO FID.

Every writer takes `sample(prompt, seeds) -> (len(seeds),3,S,S)` images in [0,1], one per seed (for a trained
model: `EmuImagePipeline.text_to_images`), and writes under `<out>`:
- `images/`: the folder handed to the benchmark's own scorer, in its layout;
- `samples.jsonl`: one line per image, `{"index", "sample", "prompt", "seed", "path"}` (+ the benchmark's ids),
  so any image can be drawn again alone. Image j of prompt i is drawn with seed `seed + i * per_prompt + j`.

Layouts, from each benchmark's documentation:
- GenEval (djghosh13/geneval, README "Image generation"): `images/<i:05d>/metadata.jsonl` holding the i-th line of
  `evaluation_metadata.jsonl` as it is, `images/<i:05d>/samples/<j:04d>.png` for its 4 images, and the optional
  `grid.png`. Each prompt line needs the fields its `evaluation/evaluate_images.py` reads: `prompt`, `tag`,
  `include`.
- DPG-Bench (TencentQQGYLab/ELLA, README "DPG-Bench"): for each `dpg_bench/prompts/<name>.txt`, one 2×2 grid of 4
  images `images/<name>.png` (same file name as the prompt's); its `compute_dpg_bench.py` crops tile j at
  ((j % 2)·R, (j // 2)·R) with R the `--resolution` given to `dist_eval.sh`: the side of one image.
- COCO FID (Emu, docs/design.md §6: 30k random MS-COCO val2014 captions): one image per caption,
  `images/<k:05d>.png`; the FID against a local folder of real images is InceptionV3's (torch-fidelity's network
  from a local weights file, `metrics/image_quality.make_fid`).
A prompt file with a missing or empty field stops with the file, the line and the field named, before any image
is drawn.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from emu_lightning.data.real.vqa import field, read_json

Sampler = Callable[[str, Sequence[int]], Tensor]
GENEVAL_FIELDS = {"prompt": str, "tag": str, "include": list}   # what GenEval's evaluate_images.py reads


def _save(image: Tensor, path: Path) -> None:
    """A (3,H,W) image in [0,1] as an 8-bit PNG (rounded as `inference.pipelines.to_pil`)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path)


def _seeds(seed: int, index: int, per_prompt: int) -> list[int]:
    return [seed + index * per_prompt + j for j in range(per_prompt)]


def _write_manifest(out: Path, rows: list[dict]) -> None:
    with (out / "samples.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------ GenEval


def read_geneval_prompts(path: str | Path) -> list[tuple[str, dict]]:
    """`evaluation_metadata.jsonl` → [(the line as written, its parsed record)], every record checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval prompt file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} is not JSON ({e.msg} at column {e.colno})") from None
        for name, kind in GENEVAL_FIELDS.items():
            value = field(path, record, name, f"line {n}", kind)
            if not value:
                raise ValueError(f"{path}: line {n} field {name!r} is empty")
        out.append((line, record))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def write_geneval(out: str | Path, prompts: list[tuple[str, dict]], sample: Sampler, per_prompt: int = 4,
                  seed: int = 0) -> list[dict]:
    """GenEval's folder under `<out>/images` (module docstring); returns the manifest rows."""
    from torchvision.utils import make_grid

    out = Path(out)
    rows = []
    for i, (line, record) in enumerate(prompts):
        folder = out / "images" / f"{i:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(line.rstrip("\n") + "\n", encoding="utf-8")
        seeds = _seeds(seed, i, per_prompt)
        images = sample(record["prompt"], seeds)                                  # (per_prompt,3,S,S)
        for j, s in enumerate(seeds):
            path = folder / "samples" / f"{j:04d}.png"
            _save(images[j], path)
            rows.append({"index": i, "sample": j, "prompt": record["prompt"], "tag": record["tag"], "seed": s,
                         "path": str(path.relative_to(out))})
        _save(make_grid(images, nrow=2, padding=0), folder / "grid.png")
    _write_manifest(out, rows)
    return rows


# ------------------------------------------------------------------ DPG-Bench


def read_dpg_prompts(folder: str | Path) -> list[tuple[str, str]]:
    """`dpg_bench/prompts/` → [(file stem, prompt)], sorted by name; an empty prompt file is named."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DPG-Bench prompt folder not found: {folder}")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ValueError(f"{folder}: no <name>.txt prompt files")
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"{f}: empty prompt")
        out.append((f.stem, text))
    return out


def write_dpg(out: str | Path, prompts: list[tuple[str, str]], sample: Sampler, seed: int = 0) -> list[dict]:
    """DPG-Bench's folder under `<out>/images`: one 2×2 grid per prompt (module docstring); the manifest rows."""
    out = Path(out)
    rows = []
    for i, (name, prompt) in enumerate(prompts):
        seeds = _seeds(seed, i, 4)
        images = sample(prompt, seeds)                                            # (4,3,R,R)
        r = images.shape[-1]
        grid = images.new_zeros(3, 2 * r, 2 * r)                                  # (3,2R,2R)
        for j in range(4):   # tile j at column j % 2, row j // 2: compute_dpg_bench.py's crop order
            grid[:, (j // 2) * r:(j // 2 + 1) * r, (j % 2) * r:(j % 2 + 1) * r] = images[j]
            rows.append({"index": i, "sample": j, "name": name, "prompt": prompt, "seed": seeds[j],
                         "path": f"images/{name}.png", "tile": [(j % 2) * r, (j // 2) * r, r]})
        _save(grid, out / "images" / f"{name}.png")
    _write_manifest(out, rows)
    return rows


# ------------------------------------------------------------------ COCO captions → images, FID


def read_coco_captions(path: str | Path, num: int, seed: int = 0) -> list[dict]:
    """`num` captions drawn at random (seeded, without replacement) from a COCO-captions JSON's `annotations`
    (Emu: 30k of val2014's), as `{"id", "image_id", "caption"}`; every record checked first."""
    path = Path(path)
    rows = field(path, read_json(path, "COCO caption file"), "annotations", "top level", list)
    anns = []
    for i, a in enumerate(rows):
        caption = field(path, a, "caption", f"annotations[{i}]", str).strip()
        if not caption:
            raise ValueError(f"{path}: annotations[{i}] field 'caption' is empty")
        anns.append({"id": a.get("id", i), "image_id": field(path, a, "image_id", f"annotations[{i}]", (int, str)),
                     "caption": caption})
    if num > len(anns):
        raise ValueError(f"{path}: {num} captions requested but the file has {len(anns)}")
    return [anns[k] for k in random.Random(seed).sample(range(len(anns)), num)]


def write_coco(out: str | Path, captions: list[dict], sample: Sampler, seed: int = 0) -> list[dict]:
    """One image per caption, `<out>/images/<k:05d>.png`; the manifest rows."""
    out = Path(out)
    rows = []
    for k, cap in enumerate(captions):
        image = sample(cap["caption"], [seed + k])[0]
        path = out / "images" / f"{k:05d}.png"
        _save(image, path)
        rows.append({"index": k, "sample": 0, "prompt": cap["caption"], "seed": seed + k, "path": f"images/{k:05d}.png",
                     "caption_id": cap["id"], "image_id": cap["image_id"]})
    _write_manifest(out, rows)
    return rows


def load_folder(folder: str | Path, size: int) -> list[Tensor]:
    """Every image file of `folder` (sorted), center-cropped to a square and resized (bicubic) to `size`: (3,size,size)
    floats in [0,1]."""
    import numpy as np
    from PIL import Image

    from emu_lightning.data.real.images import open_rgb

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise ValueError(f"{folder}: no .png / .jpg / .jpeg / .webp images")
    out = []
    for p in files:
        im = open_rgb(p)
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size),
                                                                                           Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255)    # (3,size,size)
    return out


def folder_fid(generated: str | Path, reference: str | Path, weights: str | Path, size: int,
               batch_size: int = 32) -> dict[str, Any]:
    """InceptionV3 FID between two image folders, both at `size`² (`make_fid`, torch-fidelity's network)."""
    from emu_lightning.metrics.image_quality import make_fid

    fid = make_fid("inception", weights_path=weights)
    counts = {}
    for real, folder in ((True, reference), (False, generated)):
        images = load_folder(folder, size)
        counts["reference" if real else "generated"] = len(images)
        for i in range(0, len(images), batch_size):
            fid.update(torch.stack(images[i:i + batch_size]), real=real)
    if min(counts.values()) < 2:
        raise ValueError(f"FID needs at least 2 images per side; got {counts}")
    return {"FID": float(fid.compute()), **{f"{k}_images": v for k, v in counts.items()}, "size": size}
