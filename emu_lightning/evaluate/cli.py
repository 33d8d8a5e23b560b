"""`python -m emu_lightning.evaluate <task> ...`: the papers' benchmark protocols on real files (docs/evaluation.md).

    caption                   --ckpt <model> --annotations dataset_coco.json --images <coco root> [--shots 0 2 4 8]
    vqav2|okvqa|vizwiz|textvqa --ckpt <model> --questions q.json [--annotations a.json] --images <dir> [--shots 0 4 8]
    geneval    --ckpt <model> --decoder <decoder> --prompts evaluation_metadata.jsonl --out <dir>
    dpg-bench  --ckpt <model> --decoder <decoder> --prompts dpg_bench/prompts --out <dir>
    coco-fid   --ckpt <model> --decoder <decoder> --captions captions_val2014.json --reference <real images>
               --inception-weights <pt_inception.pth> [--num 30000] --out <dir>

`<model>` is what `python -m emu_lightning.inference` takes: a run directory, a `.ckpt` file of a run (`--config`
names its config.yaml when it is elsewhere) or an exported folder. Text tasks write `results_k{k}.json` in the
official result format per shot count and, with annotations (`--annotations`; for captions always), score it into
`scores.json`; `--results <file>` scores an existing result file without a model. Generation tasks write
`images/` in the benchmark's layout and `samples.jsonl` (prompt and seed of every image). Every task writes
`run.json` (the command's settings) and prints its scores, or the command that scores its folder.

Why a module and not `main.py test` with evaluation recipes: these protocols read files that are no training
data (question files, prompt lists), take exported folders that have no LightningCLI config, write result files
and image folders rather than logged scalars, and score whole corpora with external scorers (pycocoevalcap's
Java tokenizer, InceptionV3); `main.py validate|test` keeps the in-loop evaluation of the synthetic world.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VQA_TASKS = ("vqav2", "okvqa", "vizwiz", "textvqa")
TASKS = ("caption", *VQA_TASKS, "geneval", "dpg-bench", "coco-fid")


def _progress(done: int, total: int) -> None:
    print(f"\r{done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def prompted_model(args: argparse.Namespace, system: Any = None):
    """The prompted model: `system` when given (a system being trained, `callbacks/protocol_eval.py`), else the one
    `--ckpt` names."""
    from emu_lightning.evaluate.model import PromptedModel
    from emu_lightning.inference.infer import load_model

    if system is None and not args.ckpt:
        raise ValueError(f"{args.task} needs --ckpt <run directory, .ckpt file or exported folder> (or --results)")
    default_tokens = 20 if args.task == "caption" else 10   # Emu-I's caption length; Emu2's answer length
    system = system if system is not None else load_model(args.ckpt, args.config, args.tokenizer)
    return PromptedModel(system, args.num_beams, args.max_new_tokens or default_tokens)


def _first(data, limit: int | None):
    """The first `limit` items of an evaluation set (all of them when None): a quick, fixed slice. Every reader keeps
    its records in `.items`, which is also what scoring reads, so the slice is scored as a whole set."""
    if limit is not None:
        data.items = data.items[:limit]
    return data


def caption_inputs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The caption set (its first `--limit` images) and, for k > 0, the demonstration pool: every file checked."""
    from emu_lightning.data.real.karpathy import caption_set

    data = _first(caption_set(args.annotations, args.images, args.split), args.limit)
    pool = None
    if not args.results and any(k > 0 for k in args.shots):
        if not (args.demo_annotations and args.demo_images):
            raise ValueError("k-shot captioning needs --demo-annotations and --demo-images (a training split)")
        pool = caption_set(args.demo_annotations, args.demo_images, args.demo_split)
    return data, pool


def vqa_inputs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The questions (the first `--limit`) and, for k > 0, the demonstration pool: every file checked."""
    from emu_lightning.data.real.vqa import VQAQuestions
    from emu_lightning.evaluate.vqa import TASKS as TEMPLATES

    template = args.image_template or TEMPLATES[args.task]
    data = _first(VQAQuestions(args.questions, args.images, args.annotations, template, args.num_answers),
                  args.limit)
    pool = None
    if not args.results and any(k > 0 for k in args.shots):
        if not (args.demo_questions and args.demo_annotations and args.demo_images):
            raise ValueError("k-shot VQA needs --demo-questions, --demo-annotations and --demo-images (a training "
                             "split: the demonstrations show their majority answer)")
        pool = VQAQuestions(args.demo_questions, args.demo_images, args.demo_annotations,
                            args.demo_image_template or template, args.num_answers)
    return data, pool


def run_caption(args: argparse.Namespace, out: Path, system: Any = None, inputs: tuple | None = None,
                progress=_progress) -> dict:
    """Caption, write `results_k{k}.json` and score each k. `system`: a loaded system instead of `--ckpt`;
    `inputs`: `caption_inputs(args)`, when already read."""
    from emu_lightning.evaluate.captioning import read_caption_results, score_captions
    from emu_lightning.evaluate.runs import generate_all

    data, pool = inputs or caption_inputs(args)
    refs = {item["image_id"]: item["captions"] for item in data.items}
    metrics = tuple(m for m in args.metrics.split(",") if m)
    if args.results:
        return {"results": score_captions(refs, read_caption_results(args.results), metrics, args.results)}
    model = prompted_model(args, system)
    scores = {}
    for k in args.shots:
        texts = generate_all(model, "caption", data, k, args.selection, pool, args.batch_size, max(args.shots),
                             args.seed, progress)
        results = [{"image_id": item["image_id"], "caption": t} for item, t in zip(data.items, texts)]
        _write_json(out / f"results_k{k}.json", results)
        scores[f"k{k}"] = score_captions(refs, {r["image_id"]: r["caption"] for r in results}, metrics,
                                         str(out / f"results_k{k}.json"))
    return scores


def run_vqa(args: argparse.Namespace, out: Path, system: Any = None, inputs: tuple | None = None,
            progress=_progress) -> dict:
    """Answer, write `results_k{k}.json` and, with annotations, score each k (arguments as `run_caption`)."""
    from emu_lightning.evaluate.runs import generate_all
    from emu_lightning.evaluate.vqa import read_vqa_results, score_vqa

    data, pool = inputs or vqa_inputs(args)
    if args.results:
        return {"results": score_vqa(data, read_vqa_results(args.results), args.rules, args.results)}
    model = prompted_model(args, system)
    scores = {}
    for k in args.shots:
        texts = generate_all(model, "vqa", data, k, args.selection, pool, args.batch_size, max(args.shots),
                             args.seed, progress)
        results = [{"question_id": item["question_id"], "answer": t} for item, t in zip(data.items, texts)]
        _write_json(out / f"results_k{k}.json", results)
        if data.annotations is not None:
            scores[f"k{k}"] = score_vqa(data, {r["question_id"]: r["answer"] for r in results}, args.rules,
                                        str(out / f"results_k{k}.json"))
    return scores


def generation_inputs(args: argparse.Namespace) -> list:
    """The prompts of a generation task (the first `--limit`), read and checked before any model is loaded."""
    from emu_lightning.evaluate import generation as gen

    if args.task == "geneval":
        prompts = gen.read_geneval_prompts(args.prompts)
    elif args.task == "dpg-bench":
        prompts = gen.read_dpg_prompts(args.prompts)
    else:
        prompts = gen.read_coco_captions(args.captions, args.num, args.seed)
        if args.reference and not Path(args.reference).is_dir():
            raise FileNotFoundError(f"reference image folder not found: {args.reference}")
    return prompts[:args.limit]


def run_generation(args: argparse.Namespace, out: Path, pipeline: Any = None, prompts: list | None = None) -> dict:
    """Write the task's image folder. `pipeline`: an `EmuImagePipeline` instead of `--ckpt` + `--decoder`;
    `prompts`: `generation_inputs(args)`, when already read."""
    from emu_lightning.evaluate import generation as gen

    prompts = prompts if prompts is not None else generation_inputs(args)
    pipeline = pipeline if pipeline is not None else image_pipeline(args)

    def sample(prompt: str, seeds):
        return pipeline.text_to_images(prompt, seeds, args.guidance, args.steps)

    if args.task == "geneval":
        gen.write_geneval(out, prompts, sample, args.per_prompt, args.seed)
        return {"score_with": f"python evaluation/evaluate_images.py {out / 'images'} --outfile "
                              f"{out / 'results.jsonl'} --model-path <OBJECT_DETECTOR_FOLDER> (GenEval's environment)"}
    if args.task == "dpg-bench":
        gen.write_dpg(out, prompts, sample, args.seed)
        side = pipeline.decoder.image_size
        return {"score_with": f"bash dpg_bench/dist_eval.sh {out / 'images'} {side} (DPG-Bench's environment; "
                              f"{side} = the side of one image of each 2x2 grid)"}
    gen.write_coco(out, prompts, sample, args.seed)
    return {"fid": _fid(args, out)}


def _fid(args: argparse.Namespace, out: Path) -> dict:
    import importlib.util

    from emu_lightning.evaluate.generation import folder_fid

    if not args.reference:
        return {"skipped": "no --reference folder of real images"}
    if importlib.util.find_spec("torch_fidelity") is None:
        return {"skipped": "torch-fidelity is not installed (pip install 'emu-lightning[fid]')"}
    if not args.inception_weights:
        return {"skipped": "no --inception-weights: InceptionV3 is read from a local file, never downloaded "
                           "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)"}
    return folder_fid(out / "images", args.reference, args.inception_weights, args.fid_size)


def image_pipeline(args: argparse.Namespace, system: Any = None):
    """Generator + decoder. `system` (a system being trained) takes the place of the one it is: a decoder stands
    for `--decoder`, a stage-2 model for `--ckpt`; the other is loaded, on the system's device."""
    from emu_lightning.inference.infer import load_decoder, load_model
    from emu_lightning.inference.pipelines import EmuImagePipeline
    from emu_lightning.systems.decoder import DecoderSystem
    from emu_lightning.systems.stage2 import Stage2System

    decoder = system if isinstance(system, DecoderSystem) else None
    generator = system if system is not None and decoder is None else None
    if (generator is None and not args.ckpt) or (decoder is None and not args.decoder):
        raise ValueError(f"{args.task} needs --ckpt <stage-2 model> and --decoder <decoder run or export>")
    device = system.device if system is not None else None
    if generator is None:
        generator = load_model(args.ckpt, args.config, args.tokenizer).to(device)
    if not isinstance(generator, Stage2System):
        raise ValueError(f"{type(generator).__name__} has no regression head: {args.task} needs a stage-2, gen- or "
                         f"chat-tuned model")
    if decoder is None:
        decoder = load_decoder(args.decoder, args.decoder_config).to(device)
    return EmuImagePipeline(decoder, generator)


def _at_least_one(text: str) -> int:
    """`--limit`'s type: a whole number of items, at least 1 (the parser names the flag and the value)."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 item, got {n}")
    return n


def parser() -> argparse.ArgumentParser:
    from emu_lightning.evaluate.runs import SELECTIONS
    from emu_lightning.metrics.vqa import RULES

    p = argparse.ArgumentParser(prog="python -m emu_lightning.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("task", choices=TASKS)
    p.add_argument("--ckpt", help="run directory, .ckpt file or exported folder of the model")
    p.add_argument("--config", help="config.yaml of the run, when --ckpt is a .ckpt outside <run>/checkpoints/")
    p.add_argument("--tokenizer", help="tokenizer folder, overriding the run's (must match the checkpoint)")
    p.add_argument("--out", help="output folder (default eval_out/<task>)")
    p.add_argument("--results", help="score this result file instead of generating (no --ckpt needed)")
    p.add_argument("--seed", type=int, default=0, help="demonstration draws; generation seeds start here")
    p.add_argument("--limit", type=_at_least_one, help="only the first N questions / images / prompts (a quick slice)")
    text = p.add_argument_group("captioning and VQA")
    text.add_argument("--images", help="image folder (captions: the root holding Karpathy's filepath/filename)")
    text.add_argument("--annotations", help="captions: Karpathy split file or COCO-captions JSON; VQA: annotations")
    text.add_argument("--split", default="test", help="captions: Karpathy split (default test)")
    text.add_argument("--questions", help="VQA: question file")
    text.add_argument("--image-template", help="VQA: image file name from {image_id} (default: the task's)")
    text.add_argument("--num-answers", type=int, default=10, help="VQA: human answers per question (default 10)")
    text.add_argument("--rules", default="official", choices=RULES, help="VQA: the accuracy's rules (metrics/vqa.py)")
    text.add_argument("--shots", type=int, nargs="+", default=[0], help="demonstrations per query, e.g. 0 2 4 8")
    text.add_argument("--selection", default="random", choices=SELECTIONS, help="demonstrations (default random)")
    text.add_argument("--demo-annotations", help="demonstration pool: captions file, or VQA annotations")
    text.add_argument("--demo-questions", help="demonstration pool: VQA question file")
    text.add_argument("--demo-images", help="demonstration pool: image folder")
    text.add_argument("--demo-split", default="train", help="demonstration pool: Karpathy split (default train)")
    text.add_argument("--demo-image-template", help="demonstration pool: VQA image template (default: the task's)")
    text.add_argument("--metrics", default="bleu,meteor,rouge,cider,spice", help="captions: pycocoevalcap metrics")
    text.add_argument("--batch-size", type=int, default=8)
    text.add_argument("--num-beams", type=int, default=5, help="beam search width (the papers: 5)")
    text.add_argument("--max-new-tokens", type=int, help="default 20 for captions, 10 for answers")
    image = p.add_argument_group("generation")
    image.add_argument("--decoder", help="visual decoder run directory, .ckpt or export folder")
    image.add_argument("--decoder-config", help="config.yaml of the decoder run, for a .ckpt outside its run")
    image.add_argument("--prompts", help="geneval: evaluation_metadata.jsonl; dpg-bench: the prompts folder")
    image.add_argument("--per-prompt", type=int, default=4, help="geneval: images per prompt (default 4)")
    image.add_argument("--captions", help="coco-fid: COCO-captions JSON (captions_val2014.json)")
    image.add_argument("--num", type=int, default=30000, help="coco-fid: captions drawn (default 30000)")
    image.add_argument("--reference", help="coco-fid: folder of real images")
    image.add_argument("--inception-weights", help="coco-fid: local torch-fidelity InceptionV3 weights")
    image.add_argument("--fid-size", type=int, default=256, help="coco-fid: both sides resized to this (default 256)")
    image.add_argument("--guidance", type=float, help="classifier-free guidance (default: the decoder's)")
    image.add_argument("--steps", type=int, help="sampling steps (default: the decoder's)")
    return p


def run(args: argparse.Namespace) -> dict:
    """Execute one task; returns (and writes to `<out>/scores.json` when non-empty) its scores."""
    out = Path(args.out or Path("eval_out") / args.task)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if v is not None}
    if args.task == "caption":
        scores = run_caption(args, out)
    elif args.task in VQA_TASKS:
        scores = run_vqa(args, out)
    else:
        scores = run_generation(args, out)
    _write_json(out / "run.json", settings)
    if scores:
        _write_json(out / "scores.json", scores)
    return scores


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        scores = run(args)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(scores, indent=1))
    return 0
