"""The lmms-eval plug-in (`emu_lightning/evaluate/lmms.py`) on tiny random runs.

Without lmms-eval: lmms-eval's requests as it builds them (`Instance.args` tuples, `task_dict`), answered by the
plug-in and compared with `PromptedModel` called directly (the same prompts, the same texts); `loglikelihood`
compared with a forward pass of each sequence alone. With lmms-eval (the `[lmms]` extra): `lmms-eval --model
emu_lightning` on a 4-question local VQA task and a 4-question multiple-choice task, offline, end to end.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from emu_lightning.evaluate.lmms import EmuLightning, cut_at
from tests.helpers import tiny_adapter, tiny_encoder, tiny_run, tiny_stage1, tiny_stage2

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}
NO_LMMS_EVAL = ("lmms-eval is not installed: it is the [lmms] extra (pip install -e '.[lmms]'), not part of [dev] "
                "(docs/evaluation.md, 'lmms-eval')")


def spread(system):
    """`system` in eval mode, its token embeddings and LM head rows spread by N(0, 0.5²) noise: an untrained
    system's rows added by the vocabulary resize are all equal (`LlamaLM.resize_vocab`), so every word would score
    alike and decode to nothing; spread, answers and scores differ from one another."""
    g = torch.Generator().manual_seed(0)
    llm = system.llm.model
    with torch.no_grad():
        for w in {id(w): w for w in (llm.get_input_embeddings().weight, llm.lm_head.weight)}.values():
            w += 0.5 * torch.randn(w.shape, generator=g)
    return system.eval()


def tiny_chat():
    from components.llm.llama import LlamaLM
    from components.llm.regression_head import RegressionHead
    from emu_lightning.systems.instruct import ChatSystem
    from emu_lightning.systems.policy import StagePolicy

    llm = LlamaLM(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vocab_size=128)
    return ChatSystem(tiny_encoder(), tiny_adapter("meanpool"), llm, regression_head=RegressionHead(64, 64),
                      target_space="pooled", template="emu1", policy=StagePolicy(trainable=["llm"], lr={"llm": 1e-3}))


@pytest.fixture(scope="module")
def models() -> dict:
    """A captioner, a pretrained and a chat-tuned tiny model (`spread`), built in memory (loading a run is
    `load_model`'s, which the end-to-end test goes through)."""
    from emu_lightning.evaluate.model import PromptedModel

    return {"stage1": PromptedModel(spread(tiny_stage1())), "stage2": PromptedModel(spread(tiny_stage2())),
            "chat": PromptedModel(spread(tiny_chat()))}


def plugin(model, **kwargs) -> EmuLightning:
    lm = EmuLightning(model=model, **kwargs)
    images = {name: Image.new("RGB", (24, 24), rgb) for name, rgb in COLORS.items()}
    docs = [{"image": images[c], "question": f"what color is picture {i}?", "answer": c, "choices": list(COLORS)}
            for i, c in enumerate(COLORS)]
    docs.append({"image": [images["red"], images["blue"]], "question": "two pictures?", "answer": "red"})
    docs.append({"image": "clip.mp4", "question": "a video?", "answer": "no"})
    lm.task_dict = {"toy": {"test": docs}}
    return lm


def visual(doc: dict):
    return doc["image"]


def gen(doc_id: int, context: str, **gen_kwargs) -> SimpleNamespace:
    """An lmms-eval `generate_until` request: (context, generation_kwargs, doc_to_visual, doc_id, task, split)."""
    return SimpleNamespace(args=(context, gen_kwargs, visual, doc_id, "toy", "test"))


def test_cut_at_the_earliest_stop_string():
    assert cut_at("a cat. on a mat\nmore", ["\n", "."]) == "a cat"
    assert cut_at("a cat", ["\n", ""]) == "a cat" and cut_at("a cat", []) == "a cat"


def test_generate_until_answers_as_the_prompted_model(models):
    """Each request's text is `PromptedModel.complete` of its prompt (images, then the task's text; a chat model's
    in its template), cut at `until`, with the request's max_new_tokens; the order of the requests is kept."""
    for kind in ("stage2", "chat"):
        model = models[kind]
        lm = plugin(model, max_new_tokens=5)
        requests = [gen(0, "Q0", max_new_tokens=3, until=["\n"]), gen(1, "Q1"), gen(4, "Two?", max_new_tokens=2,
                                                                                  num_beams=2)]
        images = [[d["image"]] if i < 4 else d["image"] for i, d in enumerate(lm.task_dict["toy"]["test"][:5])]
        out = lm.generate_until(requests)
        assert any(out)   # texts, not empty strings (`varied_run`)
        for req, got, (n, beams) in zip(requests, out, [(3, 1), (5, 1), (2, 2)]):
            content = [*(("image", im) for im in images[req.args[3]]), ("text", req.args[0])]
            prompt = model.system.template.segments([("user", content)], prompt=True) if kind == "chat" else content
            assert got == cut_at(model.complete([prompt], n, beams)[0], req.args[1].get("until", ())).strip()
        # prompt=vqa: the papers' prompt (docs/evaluation.md), the task's text as the question, answer cut as there.
        lm = plugin(model, prompt="vqa", max_new_tokens=4)
        queries = [{"image": d["image"], "question": d["question"]} for d in lm.task_dict["toy"]["test"][:2]]
        model.max_new_tokens = 4
        assert lm.generate_until([gen(i, q["question"]) for i, q in enumerate(queries)]) == \
            model.generate("vqa", queries)


def test_loglikelihood_scores_the_continuation_tokens(models):
    """log p(continuation | prompt) equals a forward pass of that one sequence summed over the continuation's
    tokens, the same alone or batched with padding; `greedy` says whether every such token is the argmax; a
    multiple-choice request's continuation is a string, a `loglikelihood` task's is `doc_to_target(doc)`."""
    from emu_lightning.data.layout.collate import IGNORE

    model = models["chat"]
    s = model.system
    requests = [SimpleNamespace(args=("what color?", f" {c}", visual, i % 4, "toy", "test"))
                for i, c in enumerate(["red", "blue and green", "yellow", "a much longer continuation here"])]
    requests.append(SimpleNamespace(args=("Q", lambda doc: doc["answer"], visual, 1, "toy", "test")))
    requests.append(SimpleNamespace(args=("", " red")))   # unconditional (acc_mutual_info): no document
    one = plugin(model, batch_size=1).loglikelihood(requests)
    batched = plugin(model, batch_size=4).loglikelihood(requests)
    assert [g for _, g in one] == [g for _, g in batched]
    assert [lp for lp, _ in batched] == pytest.approx([lp for lp, _ in one], abs=1e-4)
    lm = plugin(model)
    for req, (lp, greedy) in zip(requests[:5], one):
        context, target, _, doc_id = req.args[:4]
        doc = lm.task_dict["toy"]["test"][doc_id]
        continuation = target if isinstance(target, str) else target(doc)
        prompt = s.template.segments([("user", [("image", doc["image"]), ("text", context)])], prompt=True)
        segs = [(k, model.pixels(v)) if k == "image" else (k, v) for k, v in prompt]
        ids, labels, images, _ = s.collator().encode([*segs, ("answer", continuation)], close=False, limit=10**9)
        assert s.tokenizer.decode([t for t, y in zip(ids, labels) if y != IGNORE]).strip() == continuation.strip()
        with torch.no_grad():
            x = torch.tensor([ids])
            hidden, _ = s.llm(s.embed_multimodal(x, s.encode_images(torch.stack(images))), torch.ones_like(x))
            logp = s.llm.logits(hidden)[0].log_softmax(-1)                    # (T,V)
        at = [t for t in range(1, len(ids)) if labels[t] != IGNORE]
        assert lp == pytest.approx(sum(float(logp[t - 1, ids[t]]) for t in at), abs=1e-4) and lp < 0
        assert greedy == all(int(logp[t - 1].argmax()) == ids[t] for t in at)


def test_captioner_and_bad_requests(models):
    """A captioner captions its image (prompt=caption, the task's text ignored) and scores captions; what the
    plug-in cannot do stops with the document or the argument named."""
    lm = plugin(models["stage1"], max_new_tokens=3)
    assert lm.prompt == "caption"
    out = lm.generate_until([gen(0, "ignored"), gen(1, "ignored")])
    models["stage1"].max_new_tokens = 3
    assert out == models["stage1"].generate("caption", [{"image": d["image"]} for d in lm.task_dict["toy"]["test"][:2]])
    (lp, _), = lm.loglikelihood([SimpleNamespace(args=("", "a red square", visual, 0, "toy", "test"))])
    assert lp < 0
    with pytest.raises(ValueError, match="captioner reads only its image"):
        EmuLightning(model=models["stage1"], prompt="task")
    with pytest.raises(ValueError, match=r"unknown model_args \['pretrained'\]"):
        EmuLightning(model=models["stage2"], pretrained="x")
    with pytest.raises(ValueError, match="prompt='chat'"):
        EmuLightning(model=models["stage2"], prompt="chat")
    with pytest.raises(ValueError, match="needs model_args ckpt="):
        EmuLightning()
    lm = plugin(models["stage2"])
    with pytest.raises(ValueError, match=r"document 5 of toy/test gave a str \('clip.mp4'\).*video and audio"):
        lm.generate_until([gen(5, "a video?")])
    with pytest.raises(ValueError, match="prompt=vqa reads one image per document; document 4 of toy/test has 2"):
        plugin(models["stage2"], prompt="vqa").generate_until([gen(4, "two?")])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])
    with pytest.warns(UserWarning, match="asks for sampling"):
        lm.generate_until([gen(0, "Q", max_new_tokens=1, do_sample=True, temperature=0.7)])


def test_the_entry_point_is_declared():
    """pyproject.toml names the plug-in in lmms-eval's entry-point group and pins lmms-eval in the [lmms] extra;
    with lmms-eval installed, its registry resolves `emu_lightning` to the plug-in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["lmms_eval.models"] == {"emu_lightning": "emu_lightning.evaluate.lmms:manifest"}
    assert any(r.startswith("lmms-eval==") for r in project["optional-dependencies"]["lmms"])
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.skip(NO_LMMS_EVAL)
    from importlib.metadata import entry_points

    if not any(ep.value == "emu_lightning.evaluate.lmms:manifest" for ep in entry_points(group="lmms_eval.models")):
        pytest.skip("this environment's emu-lightning metadata predates the entry point: pip install -e . again")
    from lmms_eval.models import get_model

    assert get_model("emu_lightning") is EmuLightning


# ------------------------------------------------------------------ lmms-eval, end to end

TASK_UTILS = '''
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent


def doc_to_visual(doc):
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
'''


def write_tasks(root: Path) -> Path:
    """A 4-question VQA task (generate_until) and the same questions as multiple choice (loglikelihood), local
    json records and images in the lmms-eval task layout: YAML + utils.py, `dataset_path: json`."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        Image.new("RGB", (32, 32), rgb).save(root / f"{name}.png")
        records.append({"question_id": i, "image": f"{name}.png", "question": "What color is the picture?",
                        "answer": name, "choices": list(COLORS), "label": i})
    (root / "questions.json").write_text(json.dumps(records))
    (root / "utils.py").write_text(TASK_UTILS)
    data = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'questions.json'}\n"
            "test_split: test\n")
    (root / "emu_tiny_vqa.yaml").write_text(
        f"task: emu_tiny_vqa\n{data}output_type: generate_until\ndoc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\ndoc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 4\n  until: [\"\\n\"]\n  do_sample: false\n"
        "process_results: !function utils.process_results\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (root / "emu_tiny_choice.yaml").write_text(
        f"task: emu_tiny_choice\n{data}output_type: multiple_choice\ndoc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: \"{{question}} Answer:\"\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return root


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason=NO_LMMS_EVAL)
def test_lmms_eval_runs_the_plugin_on_a_local_task(tmp_path):
    """`python -m lmms_eval --model emu_lightning --model_args ckpt=<run> --include_path <tasks> --tasks ...`,
    offline, on a tiny chat run: every question answered (generate_until) and every choice scored (loglikelihood),
    with the texts and log-probabilities the plug-in gives in-process for the same documents; the metrics written."""
    from emu_lightning.evaluate.model import PromptedModel
    from emu_lightning.inference.infer import load_model

    run = tiny_run(tmp_path / "run", "chat")
    model = PromptedModel(spread(load_model(run)))
    torch.save({"state_dict": model.system.state_dict()}, run / "checkpoints" / "last.ckpt")
    tasks = write_tasks(tmp_path / "tasks")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "emu_lightning", "--model_args",
           f"ckpt={run},max_new_tokens=4", "--include_path", str(tasks), "--tasks",
           "emu_tiny_vqa,emu_tiny_choice", "--device", "cpu", "--batch_size", "2", "--output_path",
           str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout[-3000:] + proc.stderr[-6000:]
    results = sorted((tmp_path / "out").rglob("*_results.json"))
    assert proc.returncode == 0 and results, log    # lmms-eval exits 0 after an error too: the results file says
    scores = json.loads(results[-1].read_text())["results"]
    assert 0 <= scores["emu_tiny_vqa"]["exact_match,none"] <= 1 and 0 <= scores["emu_tiny_choice"]["acc,none"] <= 1
    samples = {task: sorted((json.loads(line) for p in (tmp_path / "out").rglob(f"*_samples_{task}.jsonl")
                             for line in p.read_text().splitlines()), key=lambda r: r["doc_id"])
               for task in ("emu_tiny_vqa", "emu_tiny_choice")}
    # The same requests in-process.
    records = json.loads((tasks / "questions.json").read_text())
    lm = EmuLightning(model=model, max_new_tokens=4, batch_size=2)
    lm.task_dict = {"t": {"test": [{**r, "image": Image.open(tasks / r["image"]).convert("RGB")} for r in records]}}
    context = "What color is the picture?\nAnswer the question using a single word or phrase."
    answers = lm.generate_until([SimpleNamespace(args=(context, {"max_new_tokens": 4, "until": ["\n"]}, visual, i,
                                                       "t", "test")) for i in range(4)])
    assert [r["filtered_resps"][0] for r in samples["emu_tiny_vqa"]] == answers and any(answers)
    scored = lm.loglikelihood([SimpleNamespace(args=("What color is the picture? Answer:", f" {c}", visual, i, "t",
                                                     "test")) for i in range(4) for c in COLORS])
    logged = [(float(lp), g in (True, "True")) for r in samples["emu_tiny_choice"] for lp, g in r["filtered_resps"]]
    assert [g for _, g in logged] == [g for _, g in scored]
    assert [lp for lp, _ in logged] == pytest.approx([lp for lp, _ in scored], abs=1e-4)
    assert len({round(lp, 4) for lp, _ in scored[:4]}) == 4     # the four choices of a question score differently
