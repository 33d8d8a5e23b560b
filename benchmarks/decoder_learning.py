"""Visual-decoder learning benchmark: train a debug decoder on CPU from a stage-1/2 checkpoint's frozen encoder,
then score reconstructions and text-to-image samples with the frozen scene classifier (shape, color, both),
PSNR / SSIM, FID on the scene classifier's features, and sampling seconds per image; beside them a linear
probe on the frozen conditions (what the encoder + adapter carry at all) and the classifier on the real
targets (the ceiling of the semantic check).

    python benchmarks/scene_classifier.py --image-size 32            # once: the frozen judge
    python benchmarks/decoder_learning.py --steps 3000 --name decoder_xattn \
        --init-from benchmarks/out/runs/stage1_meanpool/version_0/checkpoints/last.ckpt
    python benchmarks/decoder_learning.py --eval-only --run benchmarks/out/runs/decoder_xattn/version_0 \
        --stage2 benchmarks/out/runs/stage2_meanpool/version_0      # re-score a finished run (+ text-to-image)
    python benchmarks/decoder_learning.py --report

Each run merges its entry (command, date, machine, steps, wall time, steps/s, eval) under its name into
benchmarks/results/decoder_learning.json (a re-score or sampler sweep updates the run's entry); its overlay,
sample grids and TensorBoard logs (checkpoints) go to benchmarks/out/.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from results_io import OUT, merge_result, read_results, run_facts

NAME = "decoder_learning"   # benchmarks/results/decoder_learning.json
CLASSIFIER = OUT / "scene_classifier_32px.safetensors"


def overlay(name: str, steps: int, val_every: int) -> Path:
    cfg = {"trainer": {"max_steps": steps, "val_check_interval": val_every, "enable_progress_bar": False,
                       "limit_val_batches": 1,
                       "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": str(OUT / "runs"), "name": name}}},
           "model": {"init_args": {"semantic_classifier": str(CLASSIFIER), "fid_feature": "scene"}}}
    path = OUT / f"{name}.overlay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(a: argparse.Namespace, extra: list[str]) -> Path:
    from emu_lightning.cli import cli_main

    init = ["--model.init_args.init_from", a.init_from] if a.init_from else []
    cli = cli_main(["fit", "--config", a.recipe, "--config", str(overlay(a.name, a.steps, a.val_every or a.steps)),
                    *init, *extra])
    return Path(cli.trainer.log_dir)


def scenes_batch(split: str, n: int, offset: int = 0):
    """n synthetic scenes of `split`: CLIP-normalised 64-px encoder inputs, [0,1] images, scenes, captions."""
    from emu_lightning.data.modules.captions import image_transform
    from emu_lightning.data.synthetic.scenes import SyntheticCaptions

    ds, tf = SyntheticCaptions(split=split, size=offset + n, image_size=64), image_transform(64)
    items = [ds[i] for i in range(offset, offset + n)]
    return torch.stack([tf(s["image"]) for s in items]), [s["scene"] for s in items], [s["captions"][0] for s in items]


def cell_probe(x: torch.Tensor, y: torch.Tensor, kind: str = "linear", steps: int = 400):
    """Fit a probe from flattened features x (n,F) to per-cell labels y (n,9) of 7 classes (6 = empty), on
    features standardised with x's own statistics; returns predict(x') → (m,9) labels, standardising x' the
    same way. `kind`: `linear` or `mlp` (one hidden layer of 512)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(0)
    head = (torch.nn.Linear(x.shape[1], 9 * 7) if kind == "linear" else
            torch.nn.Sequential(torch.nn.Linear(x.shape[1], 512), torch.nn.GELU(), torch.nn.Linear(512, 9 * 7)))
    with torch.enable_grad():
        opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
        xs = (x - mu) / sd
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(head(xs).view(-1, 7), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()

    @torch.no_grad()
    def predict(x_new: torch.Tensor) -> torch.Tensor:
        return head((x_new - mu) / sd).view(-1, 9, 7).argmax(-1)

    return predict


def object_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Share of the cells holding an object whose label `pred` gets right."""
    from emu_lightning.metrics.semantic import EMPTY

    obj = y != EMPTY
    return float((pred == y)[obj].float().mean())


@torch.no_grad()
def probe(system, n_train: int = 4096, n_test: int = 512, steps: int = 400,
          kinds: tuple[str, ...] = ("linear", "mlp")) -> dict[str, float]:
    """Probes of the frozen conditions (flattened, standardised) → per-cell shape and color (7 classes, 6 = empty):
    a linear one and a one-hidden-layer MLP (the decoder is non-linear), trained on train renders, scored on val.
    `kinds` picks which (the MLP on 64×192 features costs ~20× the linear probe's time)."""
    from emu_lightning.metrics.semantic import scene_targets

    def feats(split, n):
        x, scenes, _ = scenes_batch(split, n)
        cond = torch.cat([system.condition(x[i:i + 256]) for i in range(0, n, 256)])
        return cond.flatten(1), scene_targets(scenes)

    (xtr, (s_tr, c_tr)), (xte, (s_te, c_te)) = feats("train", n_train), feats("val", n_test)
    out = {}
    for kind in kinds:
        for name, ytr, yte in (("shape", s_tr, s_te), ("color", c_tr, c_te)):
            acc = object_accuracy(cell_probe(xtr, ytr, kind, steps)(xte), yte)
            out[f"probe_{name}" if kind == "linear" else f"probe_mlp_{name}"] = acc
    return out


@torch.no_grad()
def evaluate(run_dir: Path, ckpt: str | None, n: int, guidance: list[float], stage2: str | None,
             steps: int | None, with_probe: bool = True) -> dict:
    from emu_lightning.metrics.semantic import SemanticAccuracy, load_scene_classifier, resize
    from emu_lightning.inference.pipelines import EmuImagePipeline, load_system

    ckpt = ckpt or str(run_dir / "checkpoints" / "last.ckpt")
    system = load_system(str(run_dir), ckpt).eval()
    classifier = load_scene_classifier(CLASSIFIER).eval()
    res: dict = {"ckpt": ckpt, "n": n, "steps": steps or system.sample_steps, "sampler": system.sampler}
    if with_probe:
        res.update(probe(system))
    generator = None
    if stage2:
        generator = load_system(stage2, str(Path(stage2) / "checkpoints" / "last.ckpt")).eval()
    pipe = EmuImagePipeline(system, generator)
    for split in ("val", "heldout"):
        x, scenes, captions = scenes_batch(split, n)
        real = resize((system.target_images(x) + 1) / 2, system.image_size)
        sem = SemanticAccuracy(classifier)
        sem.update(real, scenes)
        res[f"{split}/real"] = {k: float(v) for k, v in sem.compute().items()}
        for g in guidance:
            t0 = time.time()
            recon = torch.cat([pipe.reconstruct(x[i:i + 64], guidance=g, steps=steps, seed=i)
                               for i in range(0, n, 64)])
            sec = (time.time() - t0) / n
            res[f"{split}/recon_g{g}"] = _scores(recon, real, scenes, classifier, sec)
            rows = [real[:12], recon[:12]]
            if generator is not None:
                t0 = time.time()
                t2i = torch.cat([pipe.text_to_image(captions[i:i + 64], guidance=g, steps=steps, seed=i)
                                 for i in range(0, n, 64)])
                res[f"{split}/t2i_g{g}"] = _scores(t2i, real, scenes, classifier, (time.time() - t0) / n)
                rows.append(t2i[:12])
            log_grid(run_dir, f"benchmark/{split}_g{g}", rows)
    return res


@torch.no_grad()
def sampler_sweep(run_dir: Path, ckpt: str | None, n: int, settings: list[str]) -> dict:
    """Reconstruction scores on `n` val images per `sampler:steps:guidance` setting (one trained decoder)."""
    from emu_lightning.metrics.semantic import SemanticAccuracy, load_scene_classifier
    from emu_lightning.inference.pipelines import EmuImagePipeline, load_system

    system = load_system(str(run_dir), ckpt or str(run_dir / "checkpoints" / "last.ckpt")).eval()
    classifier, pipe = load_scene_classifier(CLASSIFIER).eval(), EmuImagePipeline(system)
    x, scenes, _ = scenes_batch("val", n)
    out = {}
    for setting in settings:
        sampler, steps, g = setting.split(":")
        t0 = time.time()
        images = pipe.reconstruct(x, guidance=float(g), steps=int(steps), sampler=sampler, seed=0)
        sem = SemanticAccuracy(classifier)
        sem.update(images, scenes)
        out[setting] = {**{k: round(float(v), 3) for k, v in sem.compute().items()},
                        "sec_per_image": round((time.time() - t0) / n, 4)}
        print(setting, out[setting], flush=True)
    return out


def log_grid(run_dir: Path, tag: str, rows: list) -> None:
    """input | reconstruction | text-to-image rows into the run's TensorBoard (and a PNG beside the JSON)."""
    from torch.utils.tensorboard import SummaryWriter
    from torchvision.utils import make_grid, save_image

    grid = make_grid(torch.cat(rows).clamp(0, 1), nrow=len(rows[0]), padding=1)
    with SummaryWriter(str(run_dir)) as writer:
        writer.add_image(tag, grid, 0)
    save_image(grid, OUT / f"{run_dir.parent.name}_{tag.replace('/', '_')}.png")


def _scores(images, real, scenes, classifier, sec_per_image: float) -> dict[str, float]:
    from emu_lightning.metrics.image_quality import make_fid, reconstruction_metrics
    from emu_lightning.metrics.semantic import SemanticAccuracy

    sem = SemanticAccuracy(classifier)
    sem.update(images, scenes)
    rec = reconstruction_metrics()
    rec.update(images, real)
    fid = make_fid("scene", classifier)
    fid.update(real, real=True)
    fid.update(images, real=False)
    out = {k: float(v) for k, v in sem.compute().items()}
    out.update({k: float(v) for k, v in rec.compute().items()})
    out["fid_scene"] = float(fid.compute())
    out["sec_per_image"] = round(sec_per_image, 4)
    return out


def report() -> str:
    rows = [{"name": k, **r} for k, r in sorted(read_results(NAME).items())]
    cols = ["color", "shape", "both", "empty", "psnr", "ssim", "fid_scene", "sec_per_image"]
    out = ["| run | steps | steps/s | probe shape (lin / mlp) | probe color (lin / mlp) | split | images | "
           + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 7)]
    for r in rows:
        ev = r.get("eval", {})
        for key, m in ev.items():
            if not isinstance(m, dict):
                continue
            split, kind = key.split("/")
            out.append(f"| {r['name']} | {r.get('steps', '–')} | {r.get('steps_per_s', '–')} | "
                       f"{_fmt(ev.get('probe_shape'))} / {_fmt(ev.get('probe_mlp_shape'))} | "
                       f"{_fmt(ev.get('probe_color'))} / {_fmt(ev.get('probe_mlp_color'))} | {split} | {kind} | "
                       + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    return "\n".join(out)


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/debug/decoder.yaml")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--val-every", type=int, default=0, help="validation interval in steps (0: at the end only)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init-from", help="stage-1/2 checkpoint whose encoder + adapter condition the decoder")
    p.add_argument("--name", default="decoder")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--run", help="run dir (config.yaml + checkpoints/) to evaluate; default: the run just trained")
    p.add_argument("--ckpt")
    p.add_argument("--stage2", help="stage-2 run dir: also score text-to-image from its regressed embeddings")
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    p.add_argument("--sample-steps", type=int)
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe on the frozen conditions")
    p.add_argument("--sampler-sweep", nargs="+", metavar="SAMPLER:STEPS:GUIDANCE",
                   help="only score reconstructions of --eval-size val images per sampler setting")
    p.add_argument("--report", action="store_true")
    a, extra = p.parse_known_args()  # anything else is a CLI override
    torch.set_num_threads(a.threads)
    if not a.report:
        OUT.mkdir(parents=True, exist_ok=True)
        result = read_results(NAME).get(a.name, {"name": a.name})
        if not a.eval_only:
            start = time.time()
            run_dir = train(a, extra)
            wall = time.time() - start
            result.update({**run_facts(), "recipe": a.recipe, "init_from": a.init_from, "steps": a.steps,
                           "overrides": extra, "wall_s": round(wall, 1), "steps_per_s": round(a.steps / wall, 3),
                           "threads": a.threads, "run": str(run_dir)})
        if not (a.run or "run" in result):
            raise ValueError(f"--eval-only: run {a.name!r} has no entry in benchmarks/results/{NAME}.json; give --run")
        run_dir = Path(a.run or result["run"])
        if a.sampler_sweep:
            result.setdefault("sampler_sweep", {}).update(sampler_sweep(run_dir, a.ckpt, a.eval_size, a.sampler_sweep))
            merge_result(NAME, a.name, result)
            return
        result.update({"eval": evaluate(run_dir, a.ckpt, a.eval_size, a.guidance, a.stage2, a.sample_steps,
                                        not a.no_probe)})
        if a.eval_only:   # the command and date of this evaluation, beside those of the training run
            result["evaluated"] = run_facts()
        merge_result(NAME, a.name, result)
        print(json.dumps(result["eval"], indent=1))
    print(report())


if __name__ == "__main__":
    main()
