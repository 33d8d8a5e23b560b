"""`callbacks.protocol_eval.ProtocolEval`: the benchmark protocols of `python -m emu_lightning.evaluate` in the loop.

A tiny system trains a few steps with the callback; it must run at the steps it is asked to, log at those global
steps, leave every module's train/eval mode as it was, and log exactly what the offline command prints for the
same weights and the same first `limit` items (and write the same result file). Bad files stop the fit before
its first step, naming the file and the field.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
import yaml

from callbacks.protocol_eval import ProtocolEval, flat_scores
from emu_lightning.cli import cli_main
from emu_lightning.evaluate import cli
from tests.helpers import TINY_RUNS, tiny_datamodule
from tests.test_evaluate import coco, no_java, vqa_files  # noqa: F401  (fixtures and file writers shared)

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(num_beams=1, max_new_tokens=3, batch_size=4)


def build(kind: str):
    """The system of `TINY_RUNS[kind]`, built by the CLI's own parser (what a run directory's config rebuilds)."""
    trainer = {"accelerator": "cpu", "devices": 1, "logger": False}
    torch.manual_seed(0)
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return cli_main({"model": TINY_RUNS[kind], "trainer": trainer, "seed_everything": False}, run=False).model


def speak_red_square(system) -> None:
    """Makes the tiny LLM say " red" or " square" at every position (by the sign of one hidden unit), so that its
    captions share words with the references and the scores compared are not all 0; a few steps of training at
    lr 1e-3 move these weights by ~1e-3, far from changing the choice."""
    llm = system.llm.model
    red, square = (system.tokenizer.encode(w, add_special_tokens=False)[0] for w in (" red", " square"))
    with torch.no_grad():
        llm.model.norm.weight.zero_()
        llm.model.norm.weight[0] = 1.0                # (…,D_llm) hidden states: only unit 0 survives the norm
        llm.lm_head.weight.zero_()
        llm.lm_head.weight[red, 0], llm.lm_head.weight[square, 0] = 100.0, -100.0


def save_run(system, folder: Path, kind: str) -> Path:
    """`folder` as a run directory of `system`'s current weights (as `helpers.tiny_run` writes one)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": TINY_RUNS[kind]}))
    torch.save({"state_dict": system.state_dict()}, folder / "checkpoints" / "last.ckpt")
    return folder


class ModeLog(L.Callback):
    """Each training batch's view of the system: every module's train flag, and the captioner's own length."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((tuple(m.training for m in pl_module.modules()), pl_module.max_new_tokens))


def fit(system, callback: ProtocolEval, root: Path, steps: int) -> tuple[ModeLog, dict[int, dict[str, float]]]:
    """`steps` optimizer steps with `callback`; returns the mode log and the CSV logger's rows by step."""
    modes = ModeLog()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=L.pytorch.loggers.CSVLogger(root),
                        callbacks=[callback, modes], limit_val_batches=0, num_sanity_val_steps=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    trainer.fit(system, datamodule=tiny_datamodule(system, train_size=16, eval_size=2, batch_size=4))
    rows: dict[int, dict[str, float]] = {}
    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            rows.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v and k != "step"})
    return modes, rows


def test_caption_every_n_steps_logs_what_the_offline_command_gives(coco, tmp_path, capsys, no_java):  # noqa: F811
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap is the [eval] extra")
    files = dict(annotations=str(coco / "dataset_coco.json"), images=str(coco), metrics="bleu,cider")
    system = build("stage1")
    speak_red_square(system)
    length = system.max_new_tokens
    callback = ProtocolEval("caption", every_n_steps=2, limit=2, **files, **FAST)
    modes, rows = fit(system, callback, tmp_path / "logs", steps=4)

    tag = "protocol/caption/k0/CIDEr"
    assert sorted(s for s, r in rows.items() if tag in r) == [2, 4]             # global steps 2 and 4, not 1 or 3
    assert {"protocol/caption/k0/Bleu_4", tag} <= set(rows[4])
    assert rows[4]["protocol/caption/k0/Bleu_1"] > 0                            # captions that share words
    assert len(modes.seen) == 4 and len(set(modes.seen)) == 1                   # modes as before, after each run
    assert modes.seen[0][1] == length

    # The offline command on the weights the last run saw (step 4 ended the fit) and the same first 2 images.
    run = save_run(system, tmp_path / "run", "stage1")
    out = tmp_path / "offline"
    argv = ["caption", "--ckpt", str(run), "--annotations", files["annotations"], "--images", files["images"],
            "--metrics", "bleu,cider", "--limit", "2", "--num-beams", "1", "--max-new-tokens", "3", "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    offline = json.loads((out / "scores.json").read_text())
    logged = {k: v for k, v in rows[4].items() if k.startswith("protocol/")}
    assert logged == pytest.approx(flat_scores(offline, "protocol/caption"), abs=1e-6)
    in_loop = tmp_path / "logs" / "lightning_logs" / "version_0" / "protocol" / "caption" / "step_000004"
    for name in ("results_k0.json", "scores.json"):
        assert json.loads((in_loop / name).read_text()) == json.loads((out / name).read_text())
    assert len(json.loads((out / "results_k0.json").read_text())) == 2         # the first `limit` images only


def test_k_shot_vqa_in_the_loop_equals_the_offline_command(tmp_path, capsys):
    from tests.helpers import tiny_stage2_datamodule

    q, a = vqa_files(tmp_path, 4, first_qid=500)
    dq, da = vqa_files(tmp_path, 5, first_qid=900)
    files = dict(questions=str(q), annotations=str(a), images=str(tmp_path / "images"), demo_questions=str(dq),
                 demo_annotations=str(da), demo_images=str(tmp_path / "images"))
    system = build("stage2")
    speak_red_square(system)            # one token per answer: "red" (6 of 10 annotators) or "square" (none)
    callback = ProtocolEval("vqav2", every_n_steps=2, limit=3, shots=[0, 2], **files, num_beams=1, max_new_tokens=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        callbacks=[callback], limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(system, datamodule=tiny_stage2_datamodule(system))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("protocol/")}

    out = tmp_path / "offline"
    argv = ["vqav2", "--ckpt", str(save_run(system, tmp_path / "run", "stage2")), "--limit", "3", "--shots", "0", "2",
            "--num-beams", "1", "--max-new-tokens", "1", "--out", str(out),
            *[f"--{k.replace('_', '-')}={v}" for k, v in files.items()]]
    assert cli.main(argv) == 0, capsys.readouterr().err
    offline = json.loads((out / "scores.json").read_text())
    assert set(offline) == {"k0", "k2"} and offline["k0"]["questions"] == 3
    assert logged == pytest.approx(flat_scores(offline, "protocol/vqav2"))
    assert "protocol/vqav2/k2/perAnswerType/number" in logged
    in_loop = Path(trainer.log_dir) / "protocol" / "vqav2" / "step_000002"
    for k in (0, 2):
        assert (json.loads((in_loop / f"results_k{k}.json").read_text())
                == json.loads((out / f"results_k{k}.json").read_text()))


@pytest.mark.slow   # a decoder run, two stage-2 builds and two decoder loads: ~4 s
def test_geneval_in_the_loop_writes_the_offline_folder(tmp_path, capsys):
    """A stage-2 system in training is the generator; `decoder` names the decoder run, loaded once at setup."""
    from tests.helpers import tiny_run, tiny_stage2_datamodule

    prompts = tmp_path / "evaluation_metadata.jsonl"
    prompts.write_text("".join(json.dumps({"tag": "single_object", "include": [{"class": c, "count": 1}],
                                           "prompt": f"a photo of a {c}"}) + "\n" for c in ("bench", "cup")))
    decoder = tiny_run(tmp_path / "decoder", "decoder")
    options = dict(decoder=str(decoder), prompts=str(prompts), per_prompt=1, steps=2)
    system = build("stage2")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        callbacks=[ProtocolEval("geneval", every_n_steps=1, limit=1, **options)],
                        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(system, datamodule=tiny_stage2_datamodule(system))

    out = tmp_path / "offline"
    argv = ["geneval", "--ckpt", str(save_run(system, tmp_path / "run", "stage2")), "--limit", "1", "--out", str(out),
            *[f"--{k.replace('_', '-')}={v}" for k, v in options.items()]]
    assert cli.main(argv) == 0, capsys.readouterr().err
    in_loop = Path(trainer.log_dir) / "protocol" / "geneval" / "step_000001"
    assert (in_loop / "samples.jsonl").read_text() == (out / "samples.jsonl").read_text()
    assert len((out / "samples.jsonl").read_text().splitlines()) == 1                # the first prompt only
    sample = Path("images") / "00000" / "samples" / "0000.png"
    assert (in_loop / sample).read_bytes() == (out / sample).read_bytes()


def test_a_bad_file_stops_the_fit_before_its_first_step(tmp_path):
    q, a = vqa_files(tmp_path, 3, first_qid=1)
    (tmp_path / "images" / "COCO_val2014_000000000043.jpg").unlink()
    system, modes = build("stage2"), ModeLog()
    callback = ProtocolEval("vqav2", every_n_steps=1, questions=str(q), annotations=str(a),
                            images=str(tmp_path / "images"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, callbacks=[callback, modes],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(FileNotFoundError, match=r"questions_1\.json: questions\[1\] .*field 'image_id'"):
        trainer.fit(system, datamodule=tiny_datamodule(system))
    assert modes.seen == []


@pytest.mark.parametrize("kind, options, expected", [
    ("stage1", dict(task="vqav2", annotations="{a}"), "stage-1 captioner cannot answer questions"),
    ("stage2", dict(task="vqav2"), "needs annotations"),
    ("stage2", dict(task="vqav2", annotations="{a}", shots=[0, 4]), "k-shot VQA needs --demo-questions"),
    ("chat", dict(task="vqav2", annotations="{a}", shots=[2], demo_questions="{q}", demo_annotations="{a}",
                  demo_images="{images}"), "2-shot prompts need a pretrained stage-2 model"),
    ("stage2", dict(task="vqav2", annotations="{q}"), "lacks required field 'annotations'"),
], ids=["captioner-vqa", "no-annotations", "no-demos", "chat-k-shot", "wrong-file"])
def test_setup_checks_files_and_model(tmp_path, kind, options, expected):
    q, a = vqa_files(tmp_path, 2, first_qid=1)
    images = tmp_path / "images"
    options = {k: v.format(q=q, a=a, images=images) if isinstance(v, str) else v for k, v in options.items()}
    callback = ProtocolEval(**options, questions=str(q), images=str(images))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    system = build(kind)
    with pytest.raises(ValueError, match=expected):
        callback.setup(trainer, system, "fit")
    assert system.training                                  # the check left the model's mode alone


@pytest.mark.parametrize("options, expected", [
    (dict(task="mme"), "task='mme'; expected one of"),
    (dict(task="vqav2", rules="strict"), "--rules: invalid choice: 'strict'"),
    (dict(task="caption", every_n_steps=0), "every_n_steps=0"),
])
def test_bad_options_fail_at_construction(options, expected):
    with pytest.raises(ValueError, match=expected):
        ProtocolEval(**options)


@pytest.mark.parametrize("form", ["fragment", "overlay"])
def test_recipe_fragment_and_command_line_append_the_callback(tmp_path, form):
    root = Path(__file__).parents[1]
    if form == "fragment":     # main.py fit --config <recipe> --trainer.callbacks+=recipes/_base/protocol_caption.yaml
        extra = ["--trainer.callbacks+", str(root / "recipes" / "_base" / "protocol_caption.yaml"),
                 "--trainer.callbacks.limit=4"]
    else:                      # main.py fit --config <recipe> --config overlay.yaml
        overlay = tmp_path / "overlay.yaml"
        overlay.write_text("trainer:\n  callbacks+:\n  - class_path: callbacks.protocol_eval.ProtocolEval\n"
                           "    init_args: {task: okvqa, every_n_steps: 50, questions: q.json, annotations: a.json, "
                           "images: val2014, shots: [0, 4]}\n")
        extra = ["--config", str(overlay)]
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        trainer = cli_main(["--config", str(root / "recipes" / "debug" / "stage1_meanpool.yaml"), *extra],
                           run=False).trainer
    found = [c for c in trainer.callbacks if isinstance(c, ProtocolEval)]
    assert len(found) == 1 and len(trainer.callbacks) > 2              # appended to the recipe's callbacks
    args = found[0].args
    expected = ("caption", 4, [0], 500) if form == "fragment" else ("okvqa", 100, [0, 4], 50)
    assert (args.task, args.limit, args.shots, found[0].every_n_steps) == expected
