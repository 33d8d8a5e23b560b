"""VQA-format question and annotation files, read and checked before anything is generated or scored.

The format is the one the official evaluation reads (GT-Vision-Lab/VQA, README and `vqaTools/vqa.py`), used as is
by VQAv2 and OKVQA and, converted, by VizWiz and TextVQA (docs/evaluation.md):

    questions:   {"questions":   [{"question_id": 1, "image_id": 42, "question": "what is ...?"}, ...]}
    annotations: {"annotations": [{"question_id": 1, "answers": [{"answer": "red", ...} × 10],
                                   "answer_type": "other", "question_type": "what color"}, ...]}

Items are `{"id", "question_id", "image_id", "image" (PIL RGB), "question"}` plus, with annotations, `"answers"`
(the human answers as written), `"answer_type"` and `"question_type"` (None when absent), in question order: what
`fewshot.py`'s prompts and `VQAAccuracy` read.

Nothing is scored on a silently shortened set: a missing field, a question whose image file does not exist, an
answer list of the wrong length, a question without an annotation (or the reverse) or a repeated question_id
stops with the file, the record (list index and question_id) and the field named.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from emu_lightning.data.real.images import open_rgb


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file, or an error naming it: missing, not UTF-8, or invalid (with the line and column)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def field(path: Path, record: Any, name: str, where: str, kind: type | tuple[type, ...]) -> Any:
    """`record[name]`, checked to be of `kind`; else an error naming the file, `where` (the record) and the field."""
    if not isinstance(record, dict) or name not in record:
        raise ValueError(f"{path}: {where} lacks required field {name!r}")
    value = record[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{path}: {where} field {name!r} is {value!r:.60} ({type(value).__name__}); "
                         f"expected {expected}")
    return value


def read_id_map(path: str | Path, what: str, key: str, value: str, repeated: str) -> dict[Any, str]:
    """A results file, a JSON list of `{key: id, value: text}` records (VQA answers, COCO captions) → id → text;
    a bad record, or a second record for one id (`repeated` says what it repeats), is named with its index."""
    path = Path(path)
    rows = read_json(path, what)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of {{{key!r}, {value!r}}} records, got {type(rows).__name__}")
    out: dict[Any, str] = {}
    for i, r in enumerate(rows):
        rid = field(path, r, key, f"[{i}]", (int, str))
        if rid in out:
            raise ValueError(f"{path}: [{i}] ({key} {rid!r}) repeats {repeated}")
        out[rid] = field(path, r, value, f"[{i}] ({key} {rid!r})", str)
    return out


class VQAQuestions(Dataset):
    """The questions of a VQA-format file with their images and, when given, their human answers.

    Args:
        questions: the questions JSON.
        image_dir: folder holding the images.
        annotations: the annotations JSON; None = questions only (a test split: results are written, not scored).
        image_template: file name of a question's image, formatted with its `image_id`: VQAv2 / OKVQA val
            `COCO_val2014_{image_id:012d}.jpg`, VizWiz `{image_id}` (the id is the file name), TextVQA
            `{image_id}.jpg`.
        num_answers: human answers every annotation must have (10 for all four sets); None = any number > 0.
    """

    def __init__(self, questions: str, image_dir: str, annotations: str | None = None,
                 image_template: str = "{image_id}", num_answers: int | None = 10) -> None:
        self.questions, self.image_dir = Path(questions), Path(image_dir)
        self.annotations = Path(annotations) if annotations else None
        data = read_json(self.questions, "VQA question file")
        rows = field(self.questions, data, "questions", "top level", list)
        if not rows:
            raise ValueError(f"{self.questions}: 'questions' is empty")
        self.items: list[dict] = []
        seen: dict[Any, int] = {}
        for i, q in enumerate(rows):
            qid = field(self.questions, q, "question_id", f"questions[{i}]", (int, str))
            where = f"questions[{i}] (question_id {qid})"
            if qid in seen:
                raise ValueError(f"{self.questions}: {where} repeats the question_id of questions[{seen[qid]}]")
            seen[qid] = i
            image_id = field(self.questions, q, "image_id", where, (int, str))
            question = field(self.questions, q, "question", where, str)
            if not question.strip():
                raise ValueError(f"{self.questions}: {where} field 'question' is empty")
            try:
                name = image_template.format(image_id=image_id)
            except (ValueError, KeyError, IndexError) as err:
                raise ValueError(f"{self.questions}: {where} field 'image_id' = {image_id!r} does not fit "
                                 f"--image-template {image_template!r} ({err})") from None
            path = self.image_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{self.questions}: {where} field 'image_id' = {image_id!r}: its image {path} "
                                        f"does not exist (image template {image_template!r})")
            self.items.append({"id": str(qid), "question_id": qid, "image_id": image_id, "question": question,
                               "image_file": str(path)})
        if self.annotations is not None:
            self._attach_answers(seen, num_answers)

    def _attach_answers(self, index: dict[Any, int], num_answers: int | None) -> None:
        path = self.annotations
        rows = field(path, read_json(path, "VQA annotation file"), "annotations", "top level", list)
        found: set = set()
        for j, ann in enumerate(rows):
            qid = field(path, ann, "question_id", f"annotations[{j}]", (int, str))
            where = f"annotations[{j}] (question_id {qid})"
            if qid not in index:
                raise ValueError(f"{path}: {where} has no question in {self.questions}")
            if qid in found:
                raise ValueError(f"{path}: {where} is the second annotation of that question")
            found.add(qid)
            answers = field(path, ann, "answers", where, list)
            if not answers or (num_answers is not None and len(answers) != num_answers):
                expected = f"{num_answers}" if num_answers is not None else "at least 1"
                raise ValueError(f"{path}: {where} field 'answers' has {len(answers)} entries; expected {expected} "
                                 f"(the official accuracy averages over leave-one-out subsets of all of them)")
            texts = [field(path, a, "answer", f"{where} answers[{k}]", str) for k, a in enumerate(answers)]
            item = self.items[index[qid]]
            item["answers"] = texts
            item["answer_type"] = ann.get("answer_type")
            item["question_type"] = ann.get("question_type")
        missing = [qid for qid in index if qid not in found]
        if missing:
            raise ValueError(f"{path}: {len(missing)} of {len(index)} questions in {self.questions} have no "
                             f"annotation, e.g. question_id {missing[0]!r}; scoring needs every one")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.items[index])
        item["image"] = open_rgb(item["image_file"])
        return item
