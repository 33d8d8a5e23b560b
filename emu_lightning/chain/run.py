"""A chain of recipes trained in order, each stage handed the checkpoint of the stage it names, then samples.

    python -m emu_lightning.chain recipes/chains/tiny_emu.yaml --out runs/tiny_emu [--print] [-- --trainer.max_steps 20]

A chain file lists stages and what to sample at the end (`recipes/chains/tiny_emu.yaml`):

    stages:
      - {name: stage1, recipe: ../debug/stage1_meanpool.yaml}
      - {name: stage2, recipe: ../debug/stage2_meanpool.yaml, init_from: stage1}   # hand-off from stage1
    samples: {images: 4, caption: stage1, answer: chat, generate: gen, decoder: decoder, prompts: [...]}

Each stage is `main.py fit --config <recipe> --config <overlay>` in a subprocess, run exactly as a sweep runs
one configuration (`emu_lightning/sweeps/runner.py`): folder `<out>/<stage>/` with `config.yaml`, `overlay.yaml`,
`checkpoints/last.ckpt`, TensorBoard events, `run.log` and `status.json`. The overlay sets
`model.init_args.init_from` to `<out>/<parent>/checkpoints/last.ckpt`. Running the same command again skips
finished stages and continues an interrupted one from its `last.ckpt`; a stage that fails stops the chain
(the stages after it need its checkpoint) and is retried on the next invocation. Anything after `--` goes to
every stage. Samples go to `<out>/samples/`: `captions.jsonl`, `answers.jsonl`, `generate.jsonl`, the input
scenes and generated images under `images/`, and `index.md` that shows them side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from emu_lightning.sweeps.runner import execute
from emu_lightning.sweeps.spec import Run, Sweep, exit_on_sigterm, read_status, split_passthrough

STAGE_KEYS = {"name", "recipe", "init_from", "overrides"}
SAMPLE_KEYS = {"images", "caption", "answer", "generate", "decoder", "prompts", "max_new_tokens"}


@dataclass
class Stage:
    name: str
    recipe: Path                   # absolute
    init_from: str | None          # the name of an earlier stage
    overrides: dict[str, Any]


@dataclass
class Chain:
    path: Path
    stages: list[Stage]
    samples: dict[str, Any]


def load_chain(path: str | Path) -> Chain:
    """Parse and check a chain file; every error names the file and the entry."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"chain file not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty `stages` list")
    unknown = set(spec) - {"stages", "samples"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected stages, samples")
    stages: list[Stage] = []
    for i, entry in enumerate(spec["stages"]):
        where = f"{path}: stages[{i}]"
        if not isinstance(entry, dict) or "name" not in entry or "recipe" not in entry:
            raise ValueError(f"{where}: expected a mapping with `name` and `recipe`, got {entry!r}")
        bad = set(entry) - STAGE_KEYS
        if bad:
            raise ValueError(f"{where}: unknown keys {sorted(bad)}; expected {sorted(STAGE_KEYS)}")
        recipe = (path.parent / entry["recipe"]).resolve()
        if not recipe.is_file():
            raise FileNotFoundError(f"{where}: recipe {entry['recipe']!r} not found (looked at {recipe})")
        names = [s.name for s in stages]
        if entry["name"] in names:
            raise ValueError(f"{where}: stage name {entry['name']!r} is used twice")
        parent = entry.get("init_from")
        if parent is not None and parent not in names:
            raise ValueError(f"{where}: init_from {parent!r} is not an earlier stage (earlier: {names})")
        stages.append(Stage(entry["name"], recipe, parent, dict(entry.get("overrides") or {})))
    samples = spec.get("samples") or {}
    bad = set(samples) - SAMPLE_KEYS
    if bad:
        raise ValueError(f"{path}: samples: unknown keys {sorted(bad)}; expected {sorted(SAMPLE_KEYS)}")
    names = {s.name for s in stages}
    for key in ("caption", "answer", "generate", "decoder"):
        if samples.get(key) is not None and samples[key] not in names:
            raise ValueError(f"{path}: samples.{key} names {samples[key]!r}, which is not a stage ({sorted(names)})")
    if bool(samples.get("generate")) != bool(samples.get("decoder")):
        raise ValueError(f"{path}: samples.generate and samples.decoder go together (a generator needs a decoder)")
    return Chain(path, stages, samples)


def _last(out: Path, stage: str) -> Path:
    return out / stage / "checkpoints" / "last.ckpt"


def commands(chain: Chain, out: Path) -> list[str]:
    """The `main.py fit` command of each stage, as a user would type it (what `--print` shows)."""
    lines = []
    for s in chain.stages:
        cmd = ["python", "main.py", "fit", "--config", os.path.relpath(s.recipe)]
        if s.init_from:
            cmd += ["--model.init_args.init_from", os.path.relpath(_last(out, s.init_from))]
        cmd += ["--trainer.logger.init_args.save_dir", os.path.relpath(out), "--trainer.logger.init_args.name", s.name,
                "--trainer.logger.init_args.version", ""]
        for key, value in s.overrides.items():
            cmd += [f"--{key}", str(value)]
        lines.append(shlex.join(cmd))
    return lines


def run_chain(chain: Chain, out: Path, extra: list[str], threads: int) -> list[dict]:
    """Train what is left of the chain, in order; returns each stage's status. Stops at the first failure."""
    out.mkdir(parents=True, exist_ok=True)
    statuses = []
    for s in chain.stages:
        status = read_status(out / s.name)
        if status is not None and status.get("state") == "done":
            print(f"[chain] {s.name}: done, skipped", flush=True)
            statuses.append(status)
            continue
        overrides = dict(s.overrides)
        if s.init_from:
            parent = _last(out, s.init_from)
            if not parent.is_file():
                raise FileNotFoundError(f"stage {s.name}: its hand-off {parent} does not exist")
            overrides["model.init_args.init_from"] = str(parent)
        print(f"[chain] {s.name}: training {os.path.relpath(s.recipe)} (log: {out / s.name / 'run.log'})", flush=True)
        sweep = Sweep(path=chain.path, base=s.recipe)
        status = execute(Run(name=s.name, config=s.name, labels={}, overrides=overrides), sweep, out, extra, threads)
        statuses.append(status)
        print(f"[chain] {s.name}: {status['state']} in {status.get('wall_s')} s", flush=True)
        if status["state"] != "done":
            raise RuntimeError(f"stage {s.name} {status['state']}: {status.get('error', '')} "
                               f"(log: {out / s.name / 'run.log'}); run the same command again to continue")
    return statuses


def write_samples(chain: Chain, out: Path) -> Path:
    """Captions, answers and generated images from the trained stages, with `index.md` showing them."""
    import torch

    from emu_lightning.data.synthetic.scenes import SyntheticVQA
    from emu_lightning.inference import infer

    cfg = chain.samples
    folder = out / "samples"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    n, max_new = int(cfg.get("images", 4)), int(cfg.get("max_new_tokens", 24))
    items = [SyntheticVQA(split="val", size=n, image_size=64)[i] for i in range(n)]
    inputs = []
    for i, item in enumerate(items):
        p = folder / "images" / f"input_{i:02d}.png"
        item["image"].save(p)
        inputs.append(p)
    md = [f"# Samples of {out.name}", ""]
    torch.manual_seed(0)
    if cfg.get("caption"):
        system = infer.load_model(out / cfg["caption"])
        caps = infer.caption(system, [it["image"] for it in items], max_new, num_beams=1)
        rows = [{"image": f"images/{p.name}", "caption": c} for p, c in zip(inputs, caps)]
        _jsonl(folder / "captions.jsonl", rows)
        md += [f"## Captions ({cfg['caption']})", "", "| image | caption |", "|---|---|"]
        md += [f"| ![]({r['image']}) | {r['caption']} |" for r in rows] + [""]
    if cfg.get("answer"):
        system = infer.load_model(out / cfg["answer"])
        rows = [{"image": f"images/{p.name}", "question": it["question"],
                 "answer": infer.answer(system, it["image"], it["question"], max_new, num_beams=1),
                 "references": sorted(set(it["answers"]))} for p, it in zip(inputs, items)]
        _jsonl(folder / "answers.jsonl", rows)
        md += [f"## Answers ({cfg['answer']})", "", "| image | question | answer | annotators said |",
               "|---|---|---|---|"]
        md += [f"| ![]({r['image']}) | {r['question']} | {r['answer']} | {', '.join(r['references'])} |" for r in rows]
        md += [""]
    if cfg.get("generate"):
        from emu_lightning.inference.pipelines import EmuImagePipeline

        pipe = EmuImagePipeline(infer.load_decoder(out / cfg["decoder"]), infer.load_model(out / cfg["generate"]))
        prompts = list(cfg.get("prompts") or ["a large red circle."])
        rows = []
        for i, prompt in enumerate(prompts):
            image = pipe.in_context([[prompt]], seed=i)
            (path,) = infer._save_images(image, folder / "images", f"generated_{i:02d}")
            rows.append({"prompt": prompt, "image": f"images/{Path(path).name}"})
        _jsonl(folder / "generate.jsonl", rows)
        md += [f"## Generated ({cfg['generate']} → {cfg['decoder']})", "", "| prompt | image |", "|---|---|"]
        md += [f"| {r['prompt']} | ![]({r['image']}) |" for r in rows] + [""]
    (folder / "index.md").write_text("\n".join(md))
    return folder


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_passthrough(argv)
    p = argparse.ArgumentParser(prog="python -m emu_lightning.chain", description=__doc__.split("\n")[0])
    p.add_argument("chain", help="a chain YAML (recipes/chains/*.yaml)")
    p.add_argument("--out", default=None, help="the chain's folder (default: runs/<chain file name>)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per stage (default: all cores)")
    p.add_argument("--print", action="store_true", help="print the equivalent main.py commands and exit")
    p.add_argument("--no-samples", action="store_true", help="train only; write no samples")
    args = p.parse_args(argv)
    try:
        chain = load_chain(args.chain)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / chain.path.stem).resolve()
    if args.print:
        print("\n".join(commands(chain, out)))
        return 0
    try:
        with exit_on_sigterm():   # stop the running stage (it saves last.ckpt), then exit
            run_chain(chain, out, extra, args.threads or os.cpu_count() or 1)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not args.no_samples and chain.samples:
        print(f"[chain] samples: {write_samples(chain, out) / 'index.md'}", flush=True)
    return 0
