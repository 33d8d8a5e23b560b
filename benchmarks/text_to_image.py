"""Text-to-image benchmark: caption → stage-2 model (its generation head) → visual decoder → image, judged by the
frozen scene classifier, on the first N val and N heldout captions (caption 0 of each synthetic scene).

Per arm and split: the judge's per-object `color`, `shape`, `both`, `position` and `empty` accuracies; the
free-generation cosine / MSE of the generated embeddings against the encoder's embeddings of the true image
(`gen_cos`, `gen_mse`); and seconds per image for the embeddings and for the whole chain.

`--probe N` separates the two limits of the chain with linear per-cell probes (shape, color) on N train scenes:
`probe_<attr>_true` is fit on the true embeddings of their images and reads those of each split's images (what the
space carries); `probe_<attr>_gen` is fit on the embeddings generated from their captions and reads those generated
for each split (what the LLM puts there, whatever a decoder makes of it); `probe_<attr>_transfer` is the first
probe reading the generated embeddings (how far they sit from the true ones: a decoder trained only on true
embeddings meets the same shift). Without `--decoder` only the embeddings are scored.

For a head that samples its embeddings (`flow`), `draw_var` is the per-dimension variance of 8 draws for each of
the first 32 captions, in the head's regression space (whitened when the head whitens), and `true_var` the
variance of the true images' embeddings across the split in the same space: draws that spread far less than the
data collapse toward the mean, as an ℓ2 head does.

    python benchmarks/scene_classifier.py --image-size 32                          # once: the frozen judge
    python benchmarks/text_to_image.py --arm queries-mse/s0/decoder-base \
        --stage2 <t2i run dir> --decoder <decoder_t2i run dir> [--n 256 --guidance 1.0 --steps 10]
    python benchmarks/text_to_image.py --arm queries-mse/s0/probe --stage2 <t2i run dir> --probe 2048   # no decoder
    python benchmarks/text_to_image.py --report                                      # the markdown table

Results merge into benchmarks/results/text_to_image.json (arm → split → metric, and "meta": the arm's inputs,
command, date, machine and wall time) and a grid per arm (real | generated, 12 each per split) goes to
benchmarks/results/text_to_image/<arm>.png.
"""
from __future__ import annotations

import argparse
import time

import torch

from decoder_learning import CLASSIFIER, cell_probe, object_accuracy, scenes_batch
from results_io import RESULTS, merge_result, read_results, run_facts

NAME = "text_to_image"   # benchmarks/results/text_to_image.json
COLUMNS = ("color", "shape", "both", "position", "gen_cos", "probe_shape_true", "probe_shape_gen", "sec_per_image")


@torch.no_grad()
def evaluate(stage2: str, decoder: str | None, n: int, guidance: float, steps: int, batch: int = 64,
             probe_train: int = 0, seed: int = 0, flow: dict | None = None) -> dict:
    from emu_lightning.inference.infer import load_decoder, load_model
    from emu_lightning.metrics.embedding import EmbeddingSimilarity
    from emu_lightning.metrics.semantic import SemanticAccuracy, load_scene_classifier, resize, scene_targets
    from emu_lightning.systems.decoder import check_pairing

    generator = load_model(stage2)
    sampler = generator.regression_head.flow
    if flow and sampler is None:
        raise ValueError(f"--flow-temperature / --flow-steps given, but {stage2}'s "
                         f"{type(generator.regression_head).__name__} has no flow sampler")
    for k, v in (flow or {}).items():
        setattr(sampler, k, v)
    torch.manual_seed(seed)   # a sampling head (flow) draws from the global generator
    dec = load_decoder(decoder) if decoder else None
    if dec is not None:
        check_pairing(generator, dec.unet, dec.condition_kind)
        judge = load_scene_classifier(CLASSIFIER).eval()   # only decoded images are judged

    def true_embeddings(x):   # the space the head regresses, of the true images
        out = []
        for i in range(0, len(x), batch):
            feats = generator.encoder(x[i:i + batch])
            out.append(generator.visual_targets(feats, generator.adapter(feats)))
        return torch.cat(out)

    def generated(captions):
        return torch.cat([generator.generate_image_embeddings([[("text", c)] for c in captions[i:i + batch]])
                          for i in range(0, len(captions), batch)])

    probes = {}   # (attr, fit on) → predict
    if probe_train:
        x, scenes, captions = scenes_batch("train", probe_train)
        targets = dict(zip(("shape", "color"), scene_targets(scenes)))
        feats = {"true": true_embeddings(x).flatten(1), "gen": generated(captions).flatten(1)}
        probes = {(attr, on): cell_probe(feats[on], y) for attr, y in targets.items() for on in ("true", "gen")}
    # The CFG null: the empty prompt's regressed embeddings (docs/design.md §4).
    null = generator.generate_image_embeddings([[("text", "")]])
    out: dict = {"meta": {"stage2": stage2, "decoder": decoder, "n": n, "guidance": guidance, "steps": steps,
                          "head": type(generator.regression_head).__name__, "objective": generator.objective,
                          "probe_train": probe_train, "seed": seed,
                          "flow": {k: getattr(sampler, k) for k in ("steps", "temperature")} if sampler else None,
                          **run_facts()}}
    grids = []
    for split in ("val", "heldout"):
        x, scenes, captions = scenes_batch(split, n)
        sim = EmbeddingSimilarity()
        t_embed = t_all = 0.0
        images, conds, trues = [], [], []
        for i in range(0, n, batch):
            t0 = time.time()
            cond = generator.generate_image_embeddings([[("text", c)] for c in captions[i:i + batch]])
            t_embed += time.time() - t0
            if dec is not None:
                images.append(dec.decode(cond, guidance=guidance, steps=steps, null=null,
                                         generator=torch.Generator().manual_seed(i)))
            t_all += time.time() - t0
            true = true_embeddings(x[i:i + batch])   # the true image's embeddings (gen_cos): not timed
            sim.update(cond, true)
            conds.append(cond)
            trues.append(true)
        res = {f"gen_{k}": round(float(v), 4) for k, v in sim.compute().items()}
        res["sec_per_embedding"] = round(t_embed / n, 4)
        if sampler is not None:   # how far a sampling head's draws spread, against the spread of the true tokens
            head, few = generator.regression_head, captions[:min(n, 32)]
            draws = torch.stack([head.normalize(generated(few)) for _ in range(8)])     # (8,b,N,D) regression space
            res["draw_var"] = round(float(draws.var(0).mean()), 4)
            res["true_var"] = round(float(head.normalize(torch.cat(trues)).var(0).mean()), 4)
        if dec is not None:
            images = torch.cat(images)
            sem = SemanticAccuracy(judge)
            sem.update(images, scenes)
            res = {**{k: round(float(v), 4) for k, v in sem.compute().items()}, **res,
                   "sec_per_image": round(t_all / n, 4)}
        labels = dict(zip(("shape", "color"), scene_targets(scenes)))
        read = {"true": torch.cat(trues).flatten(1), "gen": torch.cat(conds).flatten(1)}
        for (attr, on), predict in probes.items():
            res[f"probe_{attr}_{on}"] = round(object_accuracy(predict(read[on]), labels[attr]), 4)
            if on == "true":
                res[f"probe_{attr}_transfer"] = round(object_accuracy(predict(read["gen"]), labels[attr]), 4)
        out[split] = res
        if dec is not None:
            real = resize((dec.target_images(x[:12]) + 1) / 2, dec.image_size) if hasattr(dec, "target_images") else None
            grids += ([real] if real is not None else []) + [images[:12]]
        print(split, out[split], flush=True)
    return out, grids


def report() -> str:
    rows = read_results(NAME)
    head = "| arm | split | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for arm, res in rows.items():
        for split in ("val", "heldout"):
            vals = [res.get(split, {}).get(c) for c in COLUMNS]
            lines.append(f"| {arm} | {split} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", help="name of the arm in the results (e.g. queries-mse/s0/decoder-base)")
    p.add_argument("--stage2", help="stage-2 / Gen run directory, checkpoint or export folder")
    p.add_argument("--decoder", help="decoder run directory, checkpoint or export folder")
    p.add_argument("--n", type=int, default=256, help="captions per split")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--probe", type=int, default=0, metavar="N",
                   help="linear shape/color probes on N train scenes, fit on the true and on the generated "
                        "embeddings (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seeds the draws of a sampling (flow) head")
    p.add_argument("--flow-temperature", type=float, default=None, help="override the flow sampler's temperature")
    p.add_argument("--flow-steps", type=int, default=None, help="override the flow sampler's Euler steps")
    p.add_argument("--report", action="store_true")
    a = p.parse_args()
    if a.report:
        print(report())
        return
    if not (a.arm and a.stage2 and (a.decoder or a.probe)):
        p.error("--arm, --stage2 and --decoder (or --probe without a decoder) are required (or --report)")
    from components.heads.flow import FlowSampler

    flow = {k: v for k, v in (("steps", a.flow_steps), ("temperature", a.flow_temperature)) if v is not None}
    for key, value in flow.items():
        try:   # the sampler's own ranges: evaluate() sets these attributes after construction
            FlowSampler.check_sampling(**{key: value})
        except ValueError as e:
            p.error(f"--flow-{key} {value}: {e}")
    torch.set_num_threads(a.threads)
    start = time.time()
    res, grids = evaluate(a.stage2, a.decoder, a.n, a.guidance, a.steps, probe_train=a.probe, seed=a.seed, flow=flow)
    res["meta"]["wall_s"] = round(time.time() - start, 1)
    merge_result(NAME, a.arm, res)   # arms evaluated in parallel merge one at a time
    if not grids:
        print(report())
        return
    from torchvision.utils import make_grid, save_image

    png = RESULTS / "text_to_image" / f"{a.arm.replace('/', '_')}.png"
    png.parent.mkdir(exist_ok=True)
    save_image(make_grid(torch.cat(grids).clamp(0, 1), nrow=12, padding=1), png)
    print(report())


if __name__ == "__main__":
    main()
