"""VQA results in the official format, scored like the official script when annotations are given.

Results are `[{"question_id", "answer"}]`, one per question of the question file: the file the VQAv2 / VizWiz
evaluation servers take and `vqaEval.py` reads (GT-Vision-Lab/VQA, docs/evaluation.md). Scores are those of
`VQAEval.accuracy`: `overall`, `perAnswerType` and `perQuestionType`, in percent rounded to 2 decimals, under
`VQAAccuracy`'s rules (the official ones by default, `emu_lightning/metrics/vqa.py`).

The four sets differ only in where their images are (the `image_template` of `TASKS`) and in what Emu2 reports
(docs/design.md §6: VQAv2 test-dev, OKVQA val, VizWiz test-dev, TextVQA val).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from emu_lightning.data.real.vqa import VQAQuestions, read_id_map
from emu_lightning.metrics.vqa import vqa_accuracy

# task → the file name of a question's image, from its image_id (the sets' own naming; VizWiz and TextVQA as in
# their VQA-format conversions, where the id is the file name or its stem).
TASKS = {
    "vqav2": "COCO_val2014_{image_id:012d}.jpg",
    "okvqa": "COCO_val2014_{image_id:012d}.jpg",
    "vizwiz": "{image_id}",
    "textvqa": "{image_id}.jpg",
}


def read_vqa_results(path: str | Path) -> dict[Any, str]:
    """A results file `[{"question_id", "answer"}]` → question id → answer; a bad record is named."""
    return read_id_map(path, "VQA results file", "question_id", "answer", "a question already answered")


def score_vqa(data: VQAQuestions, answers: dict[Any, str], rules: str = "official",
              where: str = "results") -> dict[str, Any]:
    """The official accuracy table of `answers` (question id → answer) on every question of `data`.

    Raises unless `answers` covers exactly the questions of `data`, and unless `data` has annotations.
    """
    if data.annotations is None:
        raise ValueError(f"scoring needs the annotations of {data.questions} (--annotations)")
    qids = [item["question_id"] for item in data.items]
    missing = [q for q in qids if q not in answers]
    extra = sorted(set(answers) - set(qids), key=str)
    if missing or extra:
        raise ValueError(f"{where}: {len(missing)} of {len(qids)} questions of {data.questions} unanswered (e.g. "
                         f"{missing[:3]}) and {len(extra)} answers to unknown questions (e.g. {extra[:3]}); the "
                         f"results must answer every question exactly once")
    per_q: list[float] = []
    by_answer: dict[str, list[float]] = defaultdict(list)
    by_question: dict[str, list[float]] = defaultdict(list)
    for item in data.items:
        acc = vqa_accuracy(answers[item["question_id"]], item["answers"], rules)
        per_q.append(acc)
        if item.get("answer_type") is not None:
            by_answer[item["answer_type"]].append(acc)
        if item.get("question_type") is not None:
            by_question[item["question_type"]].append(acc)

    def pct(values: list[float]) -> float:   # as VQAEval.setAccuracy: 100 · mean, rounded to 2 decimals
        return round(100 * float(sum(values)) / len(values), 2)

    return {"overall": pct(per_q), "perAnswerType": {k: pct(v) for k, v in by_answer.items()},
            "perQuestionType": {k: pct(v) for k, v in by_question.items()}, "rules": rules, "questions": len(per_q)}
