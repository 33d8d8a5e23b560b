"""The debug models' scores through the benchmark protocols, on the synthetic world written in the benchmarks'
own file formats (docs/evaluation.md), so every number can be checked by hand against readable files.

    python benchmarks/eval_formats.py --caption-run benchmarks/out/runs/stage1_meanpool/version_0 \
        --vqa-run benchmarks/out/runs/stage2_icl/version_0 --n 128

Writes, under `benchmarks/out/eval_formats/`:
- `coco/`: `--n` synthetic val scenes as PNG files and a Karpathy split file `dataset_coco.json` (split `test`,
  each scene's reference captions as its sentences) plus `--n` train scenes (split `train`, the k-shot pool);
- `vqa/`: `--n` synthetic val VQA items as VQAv2-format `questions.json` / `annotations.json` (the item's ten
  answers, `answer_type` yes/no or other) with images `images/<image_id>.png`;
then runs `python -m emu_lightning.evaluate caption` and `vqav2` on them exactly as on the real files (result
files and `scores.json` in `benchmarks/out/eval_formats/<task>_<run>/`). The scores merge into
`benchmarks/results/eval_formats.json` (key `<task>/<run name>`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # `python benchmarks/eval_formats.py` from the root

from results_io import OUT, merge_result, run_facts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_coco(root: Path, n: int) -> Path:
    """Karpathy split file over n val scenes (test) and n train scenes (train, the demonstration pool)."""
    from emu_lightning.data.synthetic.scenes import SyntheticCaptions

    entries = []
    for split, karpathy_split, offset in (("val", "test", 0), ("train", "train", 10**6)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        data = SyntheticCaptions(split=split, size=n, image_size=64)
        for i in range(n):
            item = data[i]
            name = f"{i:06d}.png"
            item["image"].save(folder / name)
            entries.append({"filepath": split, "filename": name, "split": karpathy_split, "cocoid": offset + i,
                            "imgid": offset + i, "sentences": [{"raw": c} for c in item["captions"]]})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "synthetic"}))
    return path


def write_vqa(root: Path, n: int) -> tuple[Path, Path]:
    """VQAv2-format question and annotation files over n synthetic val VQA items."""
    from emu_lightning.data.synthetic.scenes import SyntheticVQA

    (root / "images").mkdir(parents=True, exist_ok=True)
    data = SyntheticVQA(split="val", size=n, image_size=64)
    questions, annotations = [], []
    for i in range(n):
        item = data[i]
        item["image"].save(root / "images" / f"{i}.png")
        answers = item["answers"]
        kind = "yes/no" if answers[0] in ("yes", "no") else "other"
        questions.append({"question_id": i, "image_id": i, "question": item["question"]})
        annotations.append({"question_id": i, "image_id": i, "question_type": item["question"].split()[0],
                            "answer_type": kind, "multiple_choice_answer": answers[0],
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                        for j, a in enumerate(answers)]})
    q, a = root / "questions.json", root / "annotations.json"
    q.write_text(json.dumps({"questions": questions, "task_type": "Open-Ended", "data_type": "synthetic"}))
    a.write_text(json.dumps({"annotations": annotations}))
    return q, a


def evaluate(argv: list[str], out: Path) -> dict:
    from emu_lightning.evaluate.cli import main as evaluate_main

    code = evaluate_main([*argv, "--out", str(out)])
    if code != 0:
        raise SystemExit(f"python -m emu_lightning.evaluate {' '.join(argv)} exited {code}")
    return json.loads((out / "scores.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caption-run", type=Path, help="a stage-1 / stage-2 / chat run for captioning")
    p.add_argument("--caption-shots", type=int, nargs="+", default=[0])
    p.add_argument("--vqa-run", type=Path, help="a stage-2 / chat run for VQA")
    p.add_argument("--vqa-shots", type=int, nargs="+", default=[0])
    p.add_argument("--n", type=int, default=128, help="val items per task (and train scenes for the k-shot pool)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    base = OUT / "eval_formats"
    if a.caption_run:
        start = time.perf_counter()
        karpathy = write_coco(base / "coco", a.n)
        argv = ["caption", "--ckpt", str(a.caption_run), "--annotations", str(karpathy), "--images",
                str(base / "coco"), "--split", "test", "--metrics", "bleu,rouge,cider", "--num-beams", "1",
                "--shots", *map(str, a.caption_shots)]
        if any(a.caption_shots):
            argv += ["--demo-annotations", str(karpathy), "--demo-images", str(base / "coco")]
        scores = evaluate(argv, base / f"caption_{a.caption_run.parent.name}")
        key = f"caption/{a.caption_run.parent.name}"
        print(key, json.dumps(scores, indent=1))
        print(merge_result("eval_formats", key, {**run_facts(), "n": a.n, "protocol": argv,
                                                 "wall_s": round(time.perf_counter() - start, 1), "scores": scores}))
    if a.vqa_run:
        start = time.perf_counter()
        q, ann = write_vqa(base / "vqa", a.n)
        argv = ["vqav2", "--ckpt", str(a.vqa_run), "--questions", str(q), "--annotations", str(ann), "--images",
                str(base / "vqa" / "images"), "--image-template", "{image_id}.png", "--num-beams", "1",
                "--shots", *map(str, a.vqa_shots)]
        scores = evaluate(argv, base / f"vqav2_{a.vqa_run.parent.name}")
        key = f"vqav2/{a.vqa_run.parent.name}"
        print(key, json.dumps(scores, indent=1))
        print(merge_result("eval_formats", key, {**run_facts(), "n": a.n, "protocol": argv,
                                                 "wall_s": round(time.perf_counter() - start, 1), "scores": scores}))


if __name__ == "__main__":
    main()
