"""Instruction-tuning benchmark: chat answer accuracy vs the base stage-2 model, and Gen box placement.

    # chat: tune from the stage-2 benchmark run, then score both on held-out conversations
    python main.py fit --config recipes/debug/chat.yaml --config benchmarks/configs/chat_bench.overlay.yaml
    python benchmarks/instruct_learning.py chat --base benchmarks/out/runs/stage2_meanpool/version_0 \
        --tuned benchmarks/out/runs/chat_bench/version_0
    # gen: tune, then generate from grounded instructions through the decoder and locate the shapes
    python main.py fit --config recipes/debug/gen.yaml --config benchmarks/configs/gen_bench.overlay.yaml
    python benchmarks/instruct_learning.py gen --base benchmarks/out/runs/stage2_meanpool/version_0 \
        --tuned benchmarks/out/runs/gen_bench/version_0 --decoder benchmarks/out/runs/decoder_grid_v/version_0

Chat: `SyntheticChat` test conversations (scenes disjoint from training) and held-out ones (color-shape pairs never
trained), kinds vqa / count / compare / video; the last question is asked and the answer scored with VQA accuracy
against 10 annotators. The base model is asked two ways: in the chat template (as the tuned one) and with Emu2's
zero-shot VQA prompt (`{images} based on the picture, answer in one word or phrase. {q} short answer:`, its
best shot at a question; only the last question, no earlier turns). `contains` is a lenient reading: the
majority answer appears as a word anywhere in the generation.

Gen: `SyntheticGen` test items with every object grounded (`<p>a large red circle</p><coor>…</coor>`, no position
words): the model regresses the image's embeddings, the decoder samples it, and the frozen scene classifier reads
each grid cell. An object counts as placed when the classifier sees its color (and, separately, its shape) in
the cell of its requested box. Rows: the tuned model with boxes; the same phrases without boxes (placement must
then fall to what the phrases alone give); the base stage-2 model with boxes (never saw a `<loc>` token); the
base model on a caption with position words; the decoder's reconstruction of the true image (the ceiling); and
chance (the classifier's reading of the true image scored against another item's boxes).
Merges the result (with command, date, machine, wall time) under "<mode><tag>" into
benchmarks/results/instruct_learning.json.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from results_io import OUT, merge_result, run_facts

CLASSIFIER = OUT / "scene_classifier_32px.safetensors"


def _prepare(system, s: dict) -> dict:
    from emu_lightning.data.modules.captions import image_transform

    t = image_transform(system.encoder.img_size)
    out = dict(s)
    out["images"] = [t(im) for im in s.get("images", [])]
    if "video" in s:
        frames = s["video"]
        keep = torch.linspace(0, len(frames) - 1, 4).round().long().tolist()   # the recipe's num_frames: 4
        out["video"] = [t(frames[i]) for i in keep]
    return out


def _vqa_prompt(s: dict) -> list:
    from emu_lightning.data.layout.sequence import vqa_text

    question = [t["value"] for t in s["conversations"] if t["from"] == "human"][-1]
    question = question.replace("<image>", "").replace("<video>", "").strip()
    visual = [("video", s["video"])] if "video" in s else [("image", x) for x in s["images"]]
    return [*visual, ("text", vqa_text(question, zero_shot=True))]


@torch.no_grad()
def chat(a: argparse.Namespace) -> dict:
    from emu_lightning.data.layout.chat import PRESETS
    from emu_lightning.data.layout.fewshot import first_answer, majority_answer
    from emu_lightning.data.synthetic.instruct import SyntheticChat
    from emu_lightning.metrics.vqa import VQAAccuracy
    from emu_lightning.inference.pipelines import load_system
    from emu_lightning.systems.instruct import chat_prompt

    base, tuned = load_system(a.base).eval(), load_system(a.tuned).eval()
    res: dict = {"base": a.base, "tuned": a.tuned, "n": a.n}
    for split in ("test", "heldout"):
        data = SyntheticChat(split, size=a.n, image_size=64, kinds=["vqa", "count", "compare", "video"])
        samples = [_prepare(tuned, data[i]) for i in range(a.n)]
        arms = {"tuned (chat template)": (tuned, [chat_prompt(s, tuned.template) for s in samples]),
                "base (chat template)": (base, [chat_prompt(s, PRESETS["plain"]) for s in samples]),
                "base (zero-shot VQA prompt)": (base, [_vqa_prompt(s) for s in samples])}
        for arm, (system, prompts) in arms.items():
            t0 = time.time()
            preds = []
            for i in range(0, a.n, 32):
                preds += system.generate_text(prompts[i:i + 32], 6, 1)
            # Lenient rules, as the chat system's own answer_acc: the chat's answers are written freely.
            per_task = defaultdict(lambda: VQAAccuracy(rules="lenient"))
            overall = VQAAccuracy(rules="lenient")
            for s, p in zip(samples, preds):
                overall.update([first_answer(p)], [s["answers"]])
                per_task[s["task"]].update([first_answer(p)], [s["answers"]])
            # Lenient reading: the majority answer appears as a word anywhere in the generation (a base model
            # continues with a caption that may still name the right color).
            contains = sum(f" {majority_answer(s['answers'])} " in f" {p.lower().strip('.')} "
                           for s, p in zip(samples, preds)) / len(samples)
            res[f"{split}/{arm}"] = {"all": float(overall.compute()), "contains": contains,
                                     "sec": round(time.time() - t0, 1),
                                     **{k: float(m.compute()) for k, m in sorted(per_task.items())},
                                     "examples": [(s["conversations"][-2]["value"], p, s["answers"][0])
                                                  for s, p in list(zip(samples, preds))[:6]]}
            print(f"{split:8s} {arm:30s} " + " ".join(f"{k} {v:.3f}" for k, v in res[f"{split}/{arm}"].items()
                                                       if isinstance(v, float)), flush=True)
    return res


def _cell(box: tuple[float, float, float, float]) -> int:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(2, int(cy * 3)) * 3 + min(2, int(cx * 3))


def placement(pred_shape: torch.Tensor, pred_color: torch.Tensor, items: list[dict]) -> dict[str, float]:
    """Fraction of requested objects whose color / shape / both the classifier reads in the requested box's cell."""
    from emu_lightning.data.synthetic.scenes import COLORS, SHAPES

    hits = defaultdict(list)
    for b, it in enumerate(items):
        for o, (_, box) in zip(it["scene"].objects, it["boxes"]):
            c = _cell(box)
            color_ok = int(pred_color[b, c]) == list(COLORS).index(o.color)
            shape_ok = int(pred_shape[b, c]) == SHAPES.index(o.shape)
            hits["color"].append(color_ok)
            hits["shape"].append(shape_ok)
            hits["both"].append(color_ok and shape_ok)
    return {k: sum(v) / len(v) for k, v in hits.items()}


@torch.no_grad()
def gen(a: argparse.Namespace) -> dict:
    from emu_lightning.data.layout.grounding import strip_grounding
    from emu_lightning.data.synthetic.scenes import describe_scene
    from emu_lightning.data.synthetic.instruct import SyntheticGen
    from emu_lightning.metrics.semantic import load_scene_classifier, predict_cells
    from emu_lightning.inference.pipelines import EmuImagePipeline, load_system

    base, tuned = load_system(a.base).eval(), load_system(a.tuned).eval()
    decoder = load_system(a.decoder).eval()
    classifier = load_scene_classifier(CLASSIFIER).eval()
    res: dict = {"base": a.base, "tuned": a.tuned, "decoder": a.decoder, "n": a.n, "guidance": a.guidance}
    for split in ("test", "heldout"):
        data = SyntheticGen(split, size=a.n, image_size=64, grounded_p=1.0, subject_p=0.0)
        items = [data[i] for i in range(a.n)]
        arms = {"tuned, grounded (boxes, no position words)": (tuned, [it["instruction"] for it in items]),
                "tuned, phrases only (boxes stripped)": (tuned, [strip_grounding(it["instruction"]) for it in items]),
                "base, grounded": (base, [it["instruction"] for it in items]),
                "base, caption with position words": (base, [describe_scene(it["scene"]) for it in items])}
        for arm, (system, prompts) in arms.items():
            pipe = EmuImagePipeline(decoder, system)
            t0 = time.time()
            images = torch.cat([pipe.text_to_image(prompts[i:i + 64], guidance=a.guidance, seed=i)
                                for i in range(0, a.n, 64)])
            shape, color = predict_cells(classifier, images)
            res[f"{split}/{arm}"] = {**placement(shape, color, items), "sec": round(time.time() - t0, 1)}
            print(f"{split:8s} {arm:45s} {res[f'{split}/{arm}']}", flush=True)
        # Diagnostic: the tuned model's regression with the true image's tokens as its previous inputs (teacher
        # forcing), decoded the same way: what free generation loses to its own fed-back errors.
        tf = [_teacher_forced(tuned, items[i:i + 32]) for i in range(0, a.n, 32)]
        cond = torch.cat(tf)
        null = tuned.generate_image_embeddings([[("text", "")]])
        images = torch.cat([decoder.decode(cond[i:i + 64], a.guidance, None, None, torch.Generator().manual_seed(i),
                                           null) for i in range(0, a.n, 64)])
        shape, color = predict_cells(classifier, images)
        res[f"{split}/tuned, grounded, teacher-forced (diagnostic)"] = placement(shape, color, items)
        print(f"{split:8s} {'tuned, grounded, teacher-forced':45s} {res[f'{split}/tuned, grounded, teacher-forced (diagnostic)']}",
              flush=True)
        pipe = EmuImagePipeline(decoder, None)
        recon = torch.cat([pipe.reconstruct([it["image"] for it in items[i:i + 64]], guidance=a.guidance, seed=i)
                           for i in range(0, a.n, 64)])
        shape, color = predict_cells(classifier, recon)
        res[f"{split}/decoder reconstruction of the true image"] = placement(shape, color, items)
        from emu_lightning.metrics.semantic import resize

        real = torch.stack([torch.from_numpy(__import__("numpy").asarray(it["image"])).permute(2, 0, 1)
                            for it in items]).float() / 255
        shape, color = predict_cells(classifier, resize(real, classifier.image_size))
        res[f"{split}/true image"] = placement(shape, color, items)
        res[f"{split}/chance (true image vs another item's boxes)"] = placement(shape, color, items[1:] + items[:1])
        for k in (f"{split}/decoder reconstruction of the true image", f"{split}/true image",
                  f"{split}/chance (true image vs another item's boxes)"):
            print(f"{k:54s} {res[k]}", flush=True)
    return res


@torch.no_grad()
def _teacher_forced(system, items: list[dict]) -> torch.Tensor:
    """(B,N,D) regression-head outputs for each item's image with the true image tokens as the previous inputs."""
    from emu_lightning.data.modules.captions import image_transform
    from emu_lightning.data.layout.sequence import Layout, SequenceCollator

    t = image_transform(system.encoder.img_size)
    layout, collate = Layout("gen", train=False), SequenceCollator(system.tokenizer, system.num_image_tokens, 512)
    docs = []
    for it in items:
        segs = layout({**it, "image": t(it["image"]), "references": [t(r) for r in it.get("references", [])]})
        docs.append({"id": it["id"], "source": "gen", "segments": segs, "regress": segs.regress})
    _, (_, _, _, pred, _) = system._forward(collate(docs))
    return pred.view(len(items), system.num_image_tokens, -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["chat", "gen"])
    p.add_argument("--base", required=True, help="stage-2 run directory")
    p.add_argument("--tuned", required=True, help="chat- or gen-tuned run directory")
    p.add_argument("--decoder", help="gen: decoder run directory")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the run's key in the results: <mode><tag>")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    start = time.time()
    res = chat(a) if a.mode == "chat" else gen(a)
    res = {**run_facts(), "threads": a.threads, "wall_s": round(time.time() - start, 1), **res}
    print(f"wrote {merge_result('instruct_learning', a.mode + a.tag, res)} [{a.mode + a.tag!r}]")


if __name__ == "__main__":
    main()
