"""`python -m emu_lightning.evaluate` on tiny COCO-, Karpathy- and VQA-format files with tiny random models.

The runs are untrained (`helpers.tiny_run`): the texts they generate are noise, which is all the protocol needs.
Checked: the result files are in the official formats and read back; the caption scores equal pycocoevalcap's own
pipeline (`COCO.loadRes` + `COCOEvalCap`'s tokenization and scorers) on the same result file; VQA scores equal
`vqa_accuracy` averaged by hand; every kind of bad file stops with the file, the record and the field named.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from emu_lightning.evaluate import cli
from emu_lightning.metrics.vqa import vqa_accuracy
from tests.helpers import tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--num-beams", "1", "--max-new-tokens", "3", "--batch-size", "4"]
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200), (90, 90, 90)]
CAPTIONS = [["A red square.", "A red box on a table."], ["A green field.", "Grass, green and wide!"],
            ["The blue sky.", "A blue picture."], ["A yellow sun."], ["A cyan sea."], ["A pink flower."], ["Grey."]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {kind: tiny_run(root / kind, kind) for kind in ("stage1", "stage2", "chat")}


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """7 images in val2014/ (COCO names); the first 3 are Karpathy's test split, the rest train. Written as a
    Karpathy split file and as a COCO-captions JSON of the test images."""
    root = tmp_path_factory.mktemp("coco")
    (root / "val2014").mkdir()
    images, karpathy, anns = [], [], []
    for i, (color, caps) in enumerate(zip(COLORS, CAPTIONS)):
        cocoid = 1000 + i
        name = f"COCO_val2014_{cocoid:012d}.jpg"
        Image.new("RGB", (40, 30), color).save(root / "val2014" / name)
        split = "test" if i < 3 else "train"
        karpathy.append({"filepath": "val2014", "filename": name, "split": split, "cocoid": cocoid, "imgid": i,
                         "sentences": [{"raw": c, "tokens": c.lower().split()} for c in caps]})
        if split == "test":
            images.append({"id": cocoid, "file_name": name})
            anns += [{"image_id": cocoid, "id": 10 * cocoid + j, "caption": c} for j, c in enumerate(caps)]
    (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy, "dataset": "coco"}))
    (root / "captions_test.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                         "info": {}, "licenses": [], "type": "captions"}))
    return root


def vqa_files(root: Path, n: int, first_qid: int, answers: list[list[str]] | None = None) -> tuple[Path, Path]:
    """n questions on COCO-named images, VQAv2-format question and annotation files."""
    (root / "images").mkdir(exist_ok=True)
    qs, anns = [], []
    for i in range(n):
        image_id = 42 + i
        Image.new("RGB", (24, 24), COLORS[i % len(COLORS)]).save(root / "images" / f"COCO_val2014_{image_id:012d}.jpg")
        qid = first_qid + i
        qs.append({"question_id": qid, "image_id": image_id, "question": f"what color is picture {i}?"})
        given = answers[i] if answers else ["red"] * 6 + ["two"] * 4
        anns.append({"question_id": qid, "image_id": image_id, "question_type": "what color",
                     "answer_type": "other" if i % 2 else "number", "multiple_choice_answer": given[0],
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                 for j, a in enumerate(given)]})
    q, a = root / f"questions_{first_qid}.json", root / f"annotations_{first_qid}.json"
    q.write_text(json.dumps({"questions": qs, "task_type": "Open-Ended", "data_type": "mscoco"}))
    a.write_text(json.dumps({"annotations": anns}))
    return q, a


def evaluate(argv: list[str], out: Path, capsys) -> tuple[int, str]:
    code = cli.main([*argv, "--out", str(out)])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------ captioning


def pycocoevalcap_reference(annotations: Path, results: Path, java: bool) -> dict[str, float]:
    """COCOEvalCap.evaluate's own steps on a result file (BLEU and CIDEr: METEOR's Java start takes ~10 s and
    SPICE needs a download); without `java`, with the tokenizer `score_captions` falls back to."""
    coco_mod = pytest.importorskip("pycocotools.coco", reason="pycocotools comes with pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from emu_lightning.metrics.cider import tokenize

    coco = coco_mod.COCO(str(annotations))
    res = coco.loadRes(str(results))
    ids = coco.getImgIds()
    if java:
        tok = PTBTokenizer()
        gts = tok.tokenize({i: coco.imgToAnns[i] for i in ids})
        out = tok.tokenize({i: res.imgToAnns[i] for i in ids})
    else:
        gts = {i: [tokenize(a["caption"]) for a in coco.imgToAnns[i]] for i in ids}
        out = {i: [tokenize(a["caption"]) for a in res.imgToAnns[i]] for i in ids}
    bleu, _ = Bleu(4).compute_score(gts, out)
    cider, _ = Cider().compute_score(gts, out)
    return {**{f"Bleu_{n + 1}": b for n, b in enumerate(bleu)}, "CIDEr": cider}


@pytest.fixture
def no_java(tmp_path, monkeypatch):
    """A PATH without java: pycocoevalcap's Java steps are skipped (and said so), scoring takes milliseconds."""
    empty = tmp_path / "no_java_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def check_equal_to_pycocoevalcap(runs: dict, coco: Path, out: Path, capsys, java: bool) -> None:
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap is the [eval] extra")
    ann = coco / "captions_test.json"
    code, err = evaluate(["caption", "--ckpt", str(runs["stage2"]), "--annotations", str(ann), "--images",
                          str(coco / "val2014"), "--metrics", "bleu,cider", *FAST], out, capsys)
    assert code == 0, err
    results = json.loads((out / "results_k0.json").read_text())
    assert sorted(r["image_id"] for r in results) == [1000, 1001, 1002]       # COCO result format, every image
    assert all(isinstance(r["caption"], str) for r in results)
    scores = json.loads((out / "scores.json").read_text())["k0"]
    reference = pycocoevalcap_reference(ann, out / "results_k0.json", java)
    assert {m: scores[m] for m in reference} == pytest.approx(reference, abs=1e-12)


def test_caption_scores_equal_pycocoevalcap_on_the_same_results(runs, coco, tmp_path, capsys, no_java):
    check_equal_to_pycocoevalcap(runs, coco, tmp_path, capsys, java=False)


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer runs Java")
def test_caption_scores_equal_pycocoevalcap_with_its_java_tokenizer(runs, coco, tmp_path, capsys):
    check_equal_to_pycocoevalcap(runs, coco, tmp_path, capsys, java=True)


def test_k_shot_captions_and_the_karpathy_file(runs, coco, tmp_path, capsys, no_java):
    """2-shot prompts from the Karpathy train split; the same result file scored alone (no model) through the
    Karpathy file and through the COCO file gives the same numbers."""
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap is the [eval] extra")
    code, err = evaluate(["caption", "--ckpt", str(runs["stage2"]), "--annotations", str(coco / "dataset_coco.json"),
                          "--images", str(coco), "--metrics", "bleu,cider", "--shots", "0", "2",
                          "--demo-annotations", str(coco / "dataset_coco.json"), "--demo-images", str(coco), *FAST],
                         tmp_path, capsys)
    assert code == 0, err
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores) == {"k0", "k2"} and "no java on the PATH" in scores["k2"]["notes"][0]
    for source, images in (("dataset_coco.json", coco), ("captions_test.json", coco / "val2014")):
        code, err = evaluate(["caption", "--results", str(tmp_path / "results_k2.json"), "--annotations",
                              str(coco / source), "--images", str(images), "--metrics", "bleu,cider"],
                             tmp_path / source, capsys)
        assert code == 0, err
        again = json.loads((tmp_path / source / "scores.json").read_text())["results"]
        assert {m: again[m] for m in ("Bleu_4", "CIDEr")} == {m: scores["k2"][m] for m in ("Bleu_4", "CIDEr")}


def test_caption_without_java_says_so(no_java):
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap is the [eval] extra")
    from emu_lightning.evaluate.captioning import score_captions

    refs = {1: ["a red square", "a red box"], 2: ["a green field"]}
    scores = score_captions(refs, {1: "a red square", 2: "a field"})
    assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(scores) and "METEOR" not in scores and "SPICE" not in scores
    notes = "\n".join(scores["notes"])
    assert "METEOR skipped: it runs Java" in notes and "SPICE skipped: it runs Java" in notes
    assert "emu_lightning.metrics.cider.tokenize" in notes


def test_a_captioner_and_a_chat_model_caption_zero_shot_only(runs, coco, tmp_path, capsys, no_java):
    common = ["--annotations", str(coco / "dataset_coco.json"), "--images", str(coco), "--metrics", "cider", *FAST]
    for kind in ("stage1", "chat"):
        code, err = evaluate(["caption", "--ckpt", str(runs[kind]), *common], tmp_path / kind, capsys)
        assert code == 0, err
        assert len(json.loads((tmp_path / kind / "results_k0.json").read_text())) == 3
    code, err = evaluate(["caption", "--ckpt", str(runs["stage1"]), "--shots", "2", "--demo-annotations",
                          str(coco / "dataset_coco.json"), "--demo-images", str(coco), *common],
                         tmp_path / "k2", capsys)
    assert code == 2 and "2-shot prompts need a pretrained stage-2 model" in err


# ------------------------------------------------------------------ VQA


def test_vqa_result_json_is_official_and_scored_like_the_official_script(runs, tmp_path, capsys):
    answers = [["red"] * 10, ["2"] * 4 + ["two"] * 6, ["blue"] * 3 + ["green"] * 7, ["yes"] * 10]
    q, a = vqa_files(tmp_path, 4, 500, answers)
    dq, da = vqa_files(tmp_path, 5, 900)
    code, err = evaluate(["vqav2", "--ckpt", str(runs["stage2"]), "--questions", str(q), "--annotations", str(a),
                          "--images", str(tmp_path / "images"), "--shots", "0", "2", "--selection", "rices",
                          "--demo-questions", str(dq), "--demo-annotations", str(da), "--demo-images",
                          str(tmp_path / "images"), *FAST], tmp_path / "out", capsys)
    assert code == 0, err
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    for k in ("k0", "k2"):
        results = json.loads((tmp_path / "out" / f"results_{k}.json").read_text())
        assert [sorted(r) for r in results] == [["answer", "question_id"]] * 4
        assert [r["question_id"] for r in results] == [500, 501, 502, 503]
        by_hand = [vqa_accuracy(r["answer"], ans) for r, ans in zip(results, answers)]
        assert scores[k]["overall"] == round(100 * sum(by_hand) / 4, 2)
        assert scores[k]["perAnswerType"] == {"number": round(100 * (by_hand[0] + by_hand[2]) / 2, 2),
                                             "other": round(100 * (by_hand[1] + by_hand[3]) / 2, 2)}
    # A result file read back and scored without a model: the official rules, number words on either side.
    (tmp_path / "mine.json").write_text(json.dumps([{"question_id": 500, "answer": "Red."},
                                                    {"question_id": 501, "answer": "two"},
                                                    {"question_id": 502, "answer": "blue"},
                                                    {"question_id": 503, "answer": "no"}]))
    code, err = evaluate(["vqav2", "--results", str(tmp_path / "mine.json"), "--questions", str(q),
                          "--annotations", str(a), "--images", str(tmp_path / "images")], tmp_path / "mine", capsys)
    assert code == 0, err
    mine = json.loads((tmp_path / "mine" / "scores.json").read_text())["results"]
    # "Red." = 1; "two" -> "2": 4 of 10 match = 1 (the six human "two"s are never normalised); "blue": 3 = 0.9.
    assert mine["overall"] == round(100 * (1 + 1 + 0.9 + 0) / 4, 2) and mine["rules"] == "official"


def test_vqa_without_annotations_writes_results_only(runs, tmp_path, capsys):
    q, _ = vqa_files(tmp_path, 2, 7)
    code, err = evaluate(["textvqa", "--ckpt", str(runs["chat"]), "--questions", str(q), "--images",
                          str(tmp_path / "images"), "--image-template", "COCO_val2014_{image_id:012d}.jpg", *FAST],
                         tmp_path / "out", capsys)
    assert code == 0, err
    assert [r["question_id"] for r in json.loads((tmp_path / "out" / "results_k0.json").read_text())] == [7, 8]
    assert not (tmp_path / "out" / "scores.json").exists()


# ------------------------------------------------------------------ bad files


def _edit(path: Path, change) -> Path:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(("change", "which", "expected"), [
    (lambda d: d["questions"][1].pop("image_id"), "questions", "questions[1] (question_id 11) lacks required field "
                                                               "'image_id'"),
    (lambda d: d["questions"][2].update(image_id=77), "questions", "questions[2] (question_id 12) field 'image_id' = "
                                                                    "77: its image"),
    (lambda d: d["questions"][0].update(question_id=12), "questions", "questions[2] (question_id 12) repeats the "
                                                                       "question_id of questions[0]"),
    (lambda d: d["annotations"][1]["answers"].pop(), "annotations", "annotations[1] (question_id 11) field 'answers' "
                                                                    "has 9 entries; expected 10"),
    (lambda d: d["annotations"][2]["answers"][4].pop("answer"), "annotations", "annotations[2] (question_id 12) "
                                                                               "answers[4] lacks required field"),
    (lambda d: d["annotations"].pop(0), "annotations", "1 of 3 questions in"),
])
def test_bad_vqa_files_name_file_record_and_field(tmp_path, capsys, change, which, expected):
    q, a = vqa_files(tmp_path, 3, 10)
    _edit(q if which == "questions" else a, change)
    code, err = evaluate(["vqav2", "--results", str(tmp_path / "none.json"), "--questions", str(q), "--annotations",
                          str(a), "--images", str(tmp_path / "images")], tmp_path / "out", capsys)
    assert code == 2
    assert str(q if which == "questions" else a) in err and expected in err, err


def test_a_shortened_result_file_is_not_scored(tmp_path, capsys):
    q, a = vqa_files(tmp_path, 3, 10)
    (tmp_path / "short.json").write_text(json.dumps([{"question_id": 10, "answer": "red"},
                                                     {"question_id": 11, "answer": "red"}]))
    code, err = evaluate(["vqav2", "--results", str(tmp_path / "short.json"), "--questions", str(q), "--annotations",
                          str(a), "--images", str(tmp_path / "images")], tmp_path / "out", capsys)
    assert code == 2 and "1 of 3 questions" in err and "unanswered (e.g. [12])" in err
    (tmp_path / "bad.json").write_text(json.dumps([{"question_id": 10}]))
    code, err = evaluate(["vqav2", "--results", str(tmp_path / "bad.json"), "--questions", str(q), "--annotations",
                          str(a), "--images", str(tmp_path / "images")], tmp_path / "out", capsys)
    assert code == 2 and "bad.json: [0] (question_id 10) lacks required field 'answer'" in err


def test_bad_caption_files_name_file_record_and_field(coco, tmp_path, capsys, no_java):
    karpathy = tmp_path / "dataset_coco.json"
    shutil.copy(coco / "dataset_coco.json", karpathy)
    _edit(karpathy, lambda d: d["images"][1]["sentences"][0].pop("raw"))
    code, err = evaluate(["caption", "--results", str(tmp_path / "r.json"), "--annotations", str(karpathy),
                          "--images", str(coco)], tmp_path / "out", capsys)
    assert code == 2 and f"{karpathy}: images[1] (image id 1001) sentences[0] lacks required field 'raw'" in err
    shutil.copy(coco / "dataset_coco.json", karpathy)
    _edit(karpathy, lambda d: d["images"][2].update(filename="missing.jpg"))
    code, err = evaluate(["caption", "--results", str(tmp_path / "r.json"), "--annotations", str(karpathy),
                          "--images", str(coco)], tmp_path / "out", capsys)
    assert code == 2 and "images[2] (image id 1002) field 'filename': its image" in err and "missing.jpg" in err
    (tmp_path / "r.json").write_text(json.dumps([{"image_id": 1000, "caption": "red"}]))
    code, err = evaluate(["caption", "--results", str(tmp_path / "r.json"), "--annotations",
                          str(coco / "dataset_coco.json"), "--images", str(coco), "--metrics", "cider"],
                         tmp_path / "out", capsys)
    assert code == 2 and "2 reference image(s) without a caption (e.g. [1001, 1002])" in err
