"""Scene-classifier benchmark: train the `SceneClassifier` behind SemanticAccuracy and the scene FID on CPU,
save it, then score it on real rendered val and held-out images (clean, and with decoder-like corruption).

    python benchmarks/scene_classifier.py --image-size 32 --steps 1500
    python benchmarks/scene_classifier.py --image-size 64 --steps 600

Writes the weights to benchmarks/out/scene_classifier_<size>px.safetensors (the file
`load_or_train_scene_classifier` loads) and merges the printed numbers (with command, date, machine) under
"<size>px" (another `--out`: its file stem) into benchmarks/results/scene_classifier.json. Held-out images hold
color-shape pairs the classifier never saw; `pair *` columns score only those objects.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from emu_lightning.data.synthetic.scenes import HELDOUT_PAIRS, POSITIONS
from emu_lightning.metrics.image_quality import make_fid
from emu_lightning.metrics.semantic import (
    EMPTY, SemanticAccuracy, augment, predict_cells, render_batch, save_scene_classifier, scene_targets,
    train_scene_classifier,
)  # fmt: skip
from results_io import OUT, merge_result, run_facts

COLUMNS = ("color", "shape", "both", "empty", "shape small", "shape large", "pair color", "pair shape")


def score(model, images: torch.Tensor, scenes: list) -> dict[str, float]:
    """SemanticAccuracy plus shape accuracy by object size and accuracy on held-out color-shape pairs."""
    metric = SemanticAccuracy(model)
    metric.update(images, scenes)
    out = {k: v.item() for k, v in metric.compute().items()}
    pred_shape, pred_color = predict_cells(model, images)  # (B,9) each
    shape, color = scene_targets(scenes)
    small, pair = torch.zeros_like(shape, dtype=torch.bool), torch.zeros_like(shape, dtype=torch.bool)
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            small[b, POSITIONS.index(o.position)] = o.size == "small"
            pair[b, POSITIONS.index(o.position)] = (o.color, o.shape) in HELDOUT_PAIRS
    obj = shape != EMPTY
    mean = lambda hits, mask: hits[mask].float().mean().item() if mask.any() else None  # noqa: E731
    out |= {"shape small": mean(pred_shape == shape, obj & small),
            "shape large": mean(pred_shape == shape, obj & ~small),
            "pair color": mean(pred_color == color, pair), "pair shape": mean(pred_shape == shape, pair)}
    return out


def fid_scale(model, images: torch.Tensor) -> dict[str, float]:
    """Reference points of the scene FID: half of val vs the other half, vs itself corrupted, vs brighter."""
    half = images.shape[0] // 2
    gen = torch.Generator().manual_seed(1)
    fakes = {"other half": images[half:], "corrupted": augment(images[:half], gen),
             "+0.3 brightness": (images[:half] + 0.3).clamp(0, 1)}
    out = {}
    for name, fake in fakes.items():
        fid = make_fid(classifier=model)
        fid.update(images[:half], real=True)
        fid.update(fake, real=False)
        out[name] = fid.compute().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-size", type=int, default=512)
    p.add_argument("--out", default=None, help="default: benchmarks/out/scene_classifier_<size>px.safetensors")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out or OUT / f"scene_classifier_{a.image_size}px.safetensors")

    start = time.time()
    model = train_scene_classifier(a.image_size, a.steps, a.batch_size, a.seed, a.lr)
    wall = time.time() - start
    save_scene_classifier(model, out)

    rows = {}
    for split in ("val", "heldout"):
        images, scenes = render_batch(split, range(a.eval_size), a.image_size)
        rows[split] = score(model, images, scenes)
        corrupted = augment(images, torch.Generator().manual_seed(0))
        rows[f"{split} + noise/blur"] = score(model, corrupted, scenes)
    val_images, _ = render_batch("val", range(a.eval_size), a.image_size)
    fids = fid_scale(model, val_images)

    params = sum(t.numel() for t in model.parameters())
    facts = run_facts()
    print(f"\nscene classifier {a.image_size}px: {params / 1e3:.0f}k params, {a.steps} steps x batch {a.batch_size}, "
          f"lr {a.lr}, train {wall:.0f} s ({facts['machine']['cores']} cores, {a.threads} threads); "
          f"eval {a.eval_size} images per split; saved {out}")
    print("| split | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 1))
    for split, r in rows.items():
        print(f"| {split} | " + " | ".join("–" if r[c] is None else f"{r[c]:.4f}" for c in COLUMNS) + " |")
    print("scene FID vs first half of val: " + ", ".join(f"{k} {v:.3f}" for k, v in fids.items()))
    result = {**facts, "image_size": a.image_size, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
              "seed": a.seed, "params": params, "train_s": round(wall, 1), "steps_per_s": round(a.steps / wall, 2),
              "eval_size": a.eval_size, "weights": str(out), "accuracy": rows, "fid": fids}
    key = f"{a.image_size}px" if a.out is None else out.stem   # another --out: a run of its own
    print(f"wrote {merge_result('scene_classifier', key, result)} [{key!r}]")


if __name__ == "__main__":
    main()
