"""In-context edit benchmark: source image + edit instruction → Gen model → decoder → image, judged as an edit.

Emu2's in-context generation (arXiv:2312.13286, §"in-context generation") at debug scale: for each edit kind of
the synthetic world (`recolor`, `reshape`, `move`, `resize`, `add`, `remove`; `data/synthetic/edits.py`) the first N
`SyntheticGen` edit items of `val` (targets in val scenes) and of `heldout` (targets holding a color-shape pair never
trained; for recolor / reshape / add the edit itself makes the pair) go through `EmuImagePipeline.in_context`, the
source image at the instruction's `<image>`, e.g. `[<source>, " the same shape in blue."]`. The frozen scene judge
scores each image with `EditAccuracy` (`metrics/edit.py`, the metric Gen validation logs as `<set>/edit_*`): the
edited object's `color`, `shape`, `both`, `position`, `removed` for removals, and `kept` (what the edit leaves alone).
A resize is judged on `kept` only: the judge reads no size.

    python benchmarks/scene_classifier.py --image-size 32                         # once: the frozen judge
    python benchmarks/in_context_edit.py --gen <gen run> --decoder <decoder run> [--n 256 --guidance 10 --steps 10]
    python benchmarks/in_context_edit.py --report                                  # the markdown table

Writes benchmarks/results/in_context_edit.json (kind → split → metric, plus "meta": inputs, command, date,
machine, wall time; one evaluation per file, replaced atomically by the next) and a grid beside it
(in_context_edit.png: per kind and split, a row of sources, of true targets and of generated images).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from results_io import OUT, RESULTS, run_facts, write_json

JSON = RESULTS / "in_context_edit.json"
JUDGE = OUT / "scene_classifier_32px.safetensors"
SPLITS = ("val", "heldout")
COLUMNS = ("color", "shape", "both", "position", "removed", "kept", "sec_per_image")
GUIDANCE = 10.0   # docs/design.md §5: in-context generation samples with CFG 10 (`pipelines.IN_CONTEXT_GUIDANCE`)


def edit_prompt(item: dict) -> list:
    """A `SyntheticGen` edit item → the `in_context` prompt: its instruction with the source image at `<image>`."""
    from emu_lightning.data.layout.sequence import fill_placeholders

    segs = fill_placeholders(item["instruction"], item["references"], f"item {item['id']!r}: the instruction",
                             "reference images")
    return [value for _, value in segs]


def _pixels(images: list) -> torch.Tensor:
    """PIL images → (B,3,H,W) in [0,1]."""
    from torchvision.transforms.functional import pil_to_tensor

    return torch.stack([pil_to_tensor(im) for im in images]).float() / 255


@torch.no_grad()
def evaluate(gen: str, decoder: str, judge: str, n: int, guidance: float, steps: int | None,
             batch: int = 32) -> tuple[dict, list[torch.Tensor]]:
    """{"meta", kind: {split: metrics}} and the grid rows (sources | targets | generated, 8 each per kind and split)."""
    from emu_lightning.data.synthetic.instruct import EDIT_KINDS, SyntheticGen
    from emu_lightning.inference.infer import load_decoder, load_model
    from emu_lightning.inference.pipelines import EmuImagePipeline
    from emu_lightning.metrics.edit import EditAccuracy
    from emu_lightning.metrics.semantic import load_scene_classifier, resize

    generator, dec = load_model(gen), load_decoder(decoder)
    pipe = EmuImagePipeline(dec, generator)          # refuses a generator whose embeddings the decoder cannot take
    classifier = load_scene_classifier(judge)
    out: dict = {"meta": {"gen": str(gen), "decoder": str(decoder), "judge": str(judge), "n": n,
                          "guidance": guidance, "steps": steps, "head": type(generator.regression_head).__name__,
                          **run_facts()}}
    rows = []
    for kind in EDIT_KINDS:
        out[kind] = {}
        for split in SPLITS:
            data = SyntheticGen(split, n, image_size=64, edit_p=1.0, edits=[kind])
            items = [data[i] for i in range(n)]
            metric, images, start = EditAccuracy(classifier), [], time.time()
            for i in range(0, n, batch):
                chunk = items[i:i + batch]
                images.append(pipe.in_context([edit_prompt(it) for it in chunk], guidance=guidance, steps=steps,
                                              seed=i).cpu())                                   # (b,3,S,S) [0,1]
                metric.update(images[-1], [it["scene"] for it in chunk], [it["source_scene"] for it in chunk])
            seconds = time.time() - start
            out[kind][split] = {**{k: round(float(v), 4) for k, v in metric.compute().items()},
                                "sec_per_image": round(seconds / n, 4)}
            side = images[0].shape[-1]
            rows += [resize(_pixels([it["references"][0] for it in items[:8]]), side),
                     resize(_pixels([it["image"] for it in items[:8]]), side), torch.cat(images)[:8]]
            print(kind, split, out[kind][split], flush=True)
    return out, rows


def report(path: Path = JSON) -> str:
    """The markdown table of a results file: one row per kind and split."""
    res = json.loads(path.read_text()) if path.is_file() else {}
    lines = ["| edit | split | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for kind, splits in res.items():
        if kind == "meta":
            continue
        for split in SPLITS:
            vals = [splits.get(split, {}).get(c) for c in COLUMNS]
            lines.append(f"| {kind} | {split} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gen", help="Gen (or stage-2) run directory, checkpoint or export folder")
    p.add_argument("--decoder", help="decoder run directory, checkpoint or export folder")
    p.add_argument("--judge", default=str(JUDGE), help="frozen scene classifier (benchmarks/scene_classifier.py)")
    p.add_argument("--n", type=int, default=256, help="edit items per kind and split")
    p.add_argument("--guidance", type=float, default=GUIDANCE)
    p.add_argument("--steps", type=int, default=10, help="sampler steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(JSON), help="results file; the grid is written beside it (.png)")
    p.add_argument("--report", action="store_true", help="print the table of --out and stop")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.report:
        print(report(out))
        return None
    if not (a.gen and a.decoder):
        p.error("--gen and --decoder are required (or --report)")
    if a.n < 1:
        p.error(f"--n {a.n}: expected at least 1 item per kind and split")
    torch.set_num_threads(a.threads)
    start = time.time()
    res, rows = evaluate(a.gen, a.decoder, a.judge, a.n, a.guidance, a.steps, a.batch)
    res["meta"]["wall_s"] = round(time.time() - start, 1)
    write_json(out, res)
    from torchvision.utils import make_grid, save_image

    n = min(len(r) for r in rows)
    save_image(make_grid(torch.cat([r[:n] for r in rows]).clamp(0, 1), nrow=n, padding=1), out.with_suffix(".png"))
    print(report(out))
    return res


if __name__ == "__main__":
    main()
