"""Where a stage-1 captioner goes wrong: attribute accuracy of its greedy captions by scene size and object index.

`attribute_accuracy` (the in-loop metric) pools every object. This splits it: a one-object scene needs no reading
order, so its shape accuracy says whether the model reads shape from the image at all; the second and third objects
of a scene also need the order (docs/synthetic_world.md). Greedy decoding of `<s>[IMG]<image>×N[/IMG]`, as in
validation.

    python benchmarks/caption_breakdown.py --run benchmarks/out/runs/<name>/version_0 --n 128 [--split val]

Results merge into `benchmarks/results/caption_breakdown.json` under `--name` (default: the run folder's name).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import merge_result, run_facts  # noqa: E402

from emu_lightning.data.layout.collate import image_block  # noqa: E402
from emu_lightning.data.modules.captions import image_transform  # noqa: E402
from emu_lightning.data.synthetic.scenes import SyntheticCaptions  # noqa: E402
from emu_lightning.data.synthetic.text import object_hits  # noqa: E402
from emu_lightning.inference.pipelines import load_system  # noqa: E402

ATTRS = ("color", "shape", "size", "position", "all")


def breakdown(captions: list[str], scenes: list) -> dict[str, dict[str, float]]:
    """`"<objects in scene>/<index>"` → attribute → accuracy over those objects (and `n`, their count)."""
    hits: dict[str, list[dict[str, bool]]] = defaultdict(list)
    for caption, scene in zip(captions, scenes, strict=True):
        for j, h in enumerate(object_hits(caption, scene)):
            hits[f"{len(scene.objects)}/{j}"].append(h)
    return {key: {**{a: round(sum(h[a] for h in rows) / len(rows), 4) for a in ATTRS}, "n": len(rows)}
            for key, rows in sorted(hits.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a stage-1 run folder (config.yaml, checkpoints/last.ckpt)")
    p.add_argument("--ckpt", help="another checkpoint of that run; default its last.ckpt")
    p.add_argument("--n", type=int, default=128, help="scenes of the split")
    p.add_argument("--split", default="val")
    p.add_argument("--name")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    system = load_system(a.run, a.ckpt).eval()
    data = SyntheticCaptions(split=a.split, size=a.n, image_size=system.encoder.img_size)
    items = [data[i] for i in range(a.n)]
    transform = image_transform(system.encoder.img_size)
    pixels = torch.stack([transform(it["image"]) for it in items])
    prompt = torch.tensor([[system.ids.bos, *image_block(system.ids, system.num_image_tokens)]] * a.n)
    captions: list[str] = []
    with torch.no_grad():
        for i in range(0, a.n, 32):
            captions += system.caption(pixels[i:i + 32], prompt[i:i + 32])
    table = breakdown(captions, [it["scene"] for it in items])
    name = a.name or Path(a.run).resolve().parent.name
    merge_result("caption_breakdown", name, {"name": name, **run_facts(), "run": a.run, "ckpt": a.ckpt,
                                             "split": a.split, "n": a.n, "by_scene_size_and_index": table,
                                             "examples": captions[:4]})
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
