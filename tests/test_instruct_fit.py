"""End to end: the real CLI fits the debug chat and gen recipes (Emu2-Chat / Emu2-Gen tuning) and a chat model
starts from a stage-2 checkpoint through the hand-off.

- chat: answer-only CE (`train/text_loss`), no image loss (`train/regression_loss` 0), VQA accuracy of the
  held-out answers, encoder and regression head frozen, the model's template copied into the datamodule (a
  different explicit data template is refused), `main.py predict` writes the answers as JSON lines;
- gen: the image loss only (`train/loss` is the regression term), `val_gen/gen_cos`, and only the last image
  of each document regressed, a subject-driven reference image included;
- hand-off: encoder / adapter / LLM / regression head of a stage-2 checkpoint land in the chat model unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from emu_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "recipes" / "debug"
CHAT_KINDS = ["vqa", "count", "compare", "video"]
STEPS = 3

pytestmark = pytest.mark.usefixtures("one_thread")   # the machine's cores are shared with training runs


def _logger(save_dir: Path, name: str) -> dict:
    return {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(save_dir), "name": name, "version": 0}}


def chat_overlay(tmp: Path, steps: int = STEPS) -> str:
    """Tiny eval sets, `steps` steps, a fixed log dir `<tmp>/runs/chat/version_0`."""
    def ev(split):
        return {f"{split}_chat": {"class_path": "emu_lightning.data.synthetic.instruct.SyntheticChat",
                                  "init_args": {"split": split, "size": 4, "image_size": 64, "kinds": CHAT_KINDS}}}

    cfg = {"trainer": {"max_steps": steps, "val_check_interval": steps, "log_every_n_steps": 1,
                       "enable_progress_bar": False, "logger": _logger(tmp / "runs", "chat")},
           "data": {"init_args": {"val": ev("val"), "test": ev("test"), "batch_size": 4, "eval_batch_size": 4,
                                  "num_workers": 0}}}
    path = tmp / "chat_overlay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def gen_overlay(tmp: Path, steps: int = STEPS) -> str:
    """Tiny grounded eval sets; half the training items are subject-driven (a reference image)."""
    def gen(split, size, **kw):
        return {"class_path": "emu_lightning.data.synthetic.instruct.SyntheticGen",
                "init_args": {"split": split, "size": size, "image_size": 64, **kw}}

    cfg = {"trainer": {"max_steps": steps, "val_check_interval": steps, "log_every_n_steps": 1,
                       "enable_progress_bar": False, "logger": _logger(tmp / "runs", "gen")},
           "data": {"init_args": {"train": {"gen": gen("train", 64, grounded_p=0.5, subject_p=0.5)},
                                  "val": {"val_gen": gen("val", 4, grounded_p=1.0, subject_p=0.0)},
                                  "test": {"test_gen": gen("test", 4, grounded_p=1.0, subject_p=0.0)},
                                  "batch_size": 4, "eval_batch_size": 4, "num_workers": 0}}}
    path = tmp / "gen_overlay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def fit(tmp: Path, recipe: str, overlay: str, *extra: str):
    """`main.py fit` in `tmp` (the working directory of the run)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        return cli_main(["fit", "--config", str(DEBUG / f"{recipe}.yaml"), "--config", overlay, *extra])


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0}).Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("chat")
    overlay = chat_overlay(tmp)
    cli = fit(tmp, "chat", overlay)
    return tmp, overlay, cli, tmp / "runs" / "chat" / "version_0"


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("gen")
    overlay = gen_overlay(tmp)
    cli = fit(tmp, "gen", overlay)
    return tmp, overlay, cli, tmp / "runs" / "gen" / "version_0"


# ---------------------------------------------------------------- chat


def test_chat_fit_logs_answer_loss_and_accuracy_without_image_loss(chat_run):
    _, _, cli, logdir = chat_run
    assert cli.trainer.global_step == STEPS
    assert (logdir / "checkpoints" / "last.ckpt").is_file() and (logdir / "config.yaml").is_file()
    logged = scalars(logdir)
    missing = [t for t in ("train/loss", "train/text_loss", "train/regression_loss", "val_chat/answer_acc",
                           "val_chat/text_loss") if t not in logged]
    assert not missing, (missing, sorted(logged))
    assert len(logged["train/text_loss"]) == STEPS
    assert all(v > 0 for _, v in logged["train/text_loss"])
    assert all(v == 0.0 for _, v in logged["train/regression_loss"]), logged["train/regression_loss"]
    # regression_weight 0 and nothing regressed: the total is the answer CE.
    text = dict(logged["train/text_loss"])
    for step, v in logged["train/loss"]:
        assert v == pytest.approx(text[step], rel=1e-6)
    [(_, acc)] = logged["val_chat/answer_acc"]
    assert 0.0 <= acc <= 1.0


def test_chat_fit_trains_adapter_and_llm_only(chat_run):
    from callbacks.trainable_audit import audit_rows

    model = chat_run[2].model
    rows = {name: (n_train, n_frozen, verdict) for name, n_train, n_frozen, _, verdict in audit_rows(model)}
    assert set(rows) == {"encoder", "adapter", "llm", "regression_head"}
    for name in ("encoder", "regression_head"):
        n_train, n_frozen, verdict = rows[name]
        assert verdict == "frozen" and n_train == 0 and n_frozen > 0, (name, rows[name])
        assert not model.parts[name].training                     # frozen parts stay in eval mode
    for name in ("adapter", "llm"):
        n_train, n_frozen, verdict = rows[name]
        assert verdict == "train" and n_train > 0 and n_frozen == 0, (name, rows[name])


def test_chat_datamodule_gets_the_model_template(chat_run):
    from emu_lightning.data.layout.chat import PRESETS

    cli = chat_run[2]
    assert cli.model.template == PRESETS["plain"]
    assert cli.datamodule.template == cli.model.template
    saved = yaml.safe_load((chat_run[3] / "config.yaml").read_text())
    assert saved["data"]["init_args"]["template"] == saved["model"]["init_args"]["template"] == "plain"


def test_chat_template_copy_follows_a_model_override(chat_run, tmp_path, monkeypatch):
    from emu_lightning.data.layout.chat import PRESETS

    monkeypatch.chdir(tmp_path)
    cli = cli_main(["--config", str(DEBUG / "chat.yaml"), "--config", chat_run[1],
                    "--model.init_args.template", "emu1"], run=False)
    assert cli.model.template == cli.datamodule.template == PRESETS["emu1"]
    # The same template given on both sides is fine.
    cli = cli_main(["--config", str(DEBUG / "chat.yaml"), "--config", chat_run[1],
                    "--data.init_args.template", "plain"], run=False)
    assert cli.datamodule.template == PRESETS["plain"]


@pytest.mark.parametrize("subcommand", [[], ["fit"]])
def test_chat_different_data_template_is_refused(chat_run, subcommand, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)data\.init_args\.template='emu2_chat'.*model\.init_args\.template="
                                         r"'plain'"):
        cli_main([*subcommand, "--config", str(DEBUG / "chat.yaml"), "--config", chat_run[1],
                  "--data.init_args.template", "emu2_chat"], run=bool(subcommand))
    assert not (tmp_path / "runs").exists()                           # refused before anything ran


def test_chat_predict_writes_answers(chat_run):
    tmp, overlay, _, logdir = chat_run
    predictions = logdir / "predictions.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        cli_main(["predict", "--config", str(DEBUG / "chat.yaml"), "--config", overlay,
                  "--ckpt_path", str(logdir / "checkpoints" / "last.ckpt")])
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 4                                           # the 4 test conversations
    for row in rows:
        assert {"id", "question", "answer", "references"} <= set(row), row
        assert row["id"].startswith("synth-") and isinstance(row["answer"], str)
        assert isinstance(row["question"], str) and row["question"]
        assert len(row["references"]) == 10 and all(isinstance(r, str) for r in row["references"])


# ---------------------------------------------------------------- gen


def test_gen_fit_trains_on_the_image_loss_only(gen_run):
    _, _, cli, logdir = gen_run
    assert cli.trainer.global_step == STEPS
    logged = scalars(logdir)
    missing = [t for t in ("train/loss", "train/text_loss", "train/regression_loss", "val_gen/gen_cos",
                           "val_gen/gen_mse", "val_gen/regression_loss") if t not in logged]
    assert not missing, (missing, sorted(logged))
    reg = dict(logged["train/regression_loss"])
    assert len(reg) == STEPS and all(v > 0 for v in reg.values())
    assert all(v > 0 for _, v in logged["train/text_loss"])         # computed and logged, but weighted 0
    for step, v in logged["train/loss"]:
        assert v == pytest.approx(reg[step], rel=1e-6)
    [(_, cos)] = logged["val_gen/gen_cos"]
    assert -1.0 <= cos <= 1.0
    from callbacks.trainable_audit import audit_rows

    verdicts = {row[0]: (row[1] > 0, row[4]) for row in audit_rows(cli.model)}
    assert verdicts == {"encoder": (False, "frozen"), "adapter": (True, "train"), "llm": (True, "train"),
                        "regression_head": (True, "train")}


def test_gen_batch_regresses_only_the_last_image(gen_run):
    from emu_lightning.data.modules.multimodal import _EvalCollate
    from emu_lightning.data.synthetic.instruct import SyntheticGen

    dm = gen_run[2].datamodule
    ds = SyntheticGen(split="train", size=64, image_size=64, grounded_p=0.5, subject_p=0.5)
    items = [ds[i] for i in range(16)]
    subject = [s for s in items if s["references"]]
    plain = [s for s in items if not s["references"]]
    assert subject and plain
    samples = [subject[0], plain[0], subject[1] if len(subject) > 1 else subject[0], plain[-1]]
    for train in (True, False):
        batch = _EvalCollate(dm, dm.layout("gen", train=train))(samples)
        n_images = [len(s["references"]) + 1 for s in samples]
        want = [i == n - 1 for n in n_images for i in range(n)]
        assert batch["regress_images"].tolist() == want
        assert batch["pixel_values"].shape == (sum(n_images), 3, 64, 64)
        # The regressed images are the targets; the reference images are not.
        firsts = torch.tensor([0, *n_images]).cumsum(0)
        for k, s in enumerate(batch["samples"]):
            torch.testing.assert_close(batch["pixel_values"][int(firsts[k + 1]) - 1], s["image"])
            for j, ref in enumerate(s["references"]):
                torch.testing.assert_close(batch["pixel_values"][int(firsts[k]) + j], ref)
        # The reference image sits where its `<image>` placeholder was: text before and after it.
        ids, img = batch["input_ids"][0].tolist(), gen_run[2].model.ids.img
        starts = [i for i, t in enumerate(ids) if t == img]
        assert len(starts) == 2 and starts[0] > 1 and starts[1] - starts[0] > gen_run[2].model.num_image_tokens + 2
    # The model's regression positions: N per regressed image (the last one of each document).
    model = gen_run[2].model
    with torch.no_grad():
        feats = model.encoder(batch["pixel_values"])
        visual = model.adapter(feats)
        embeds = model.embed_multimodal(batch["input_ids"], visual)
        pos, target = model.regression_pairs(batch["input_ids"], embeds, feats, visual, batch["regress_images"])
    assert pos.sum(1).tolist() == [model.num_image_tokens] * len(samples)
    assert target.shape[0] == model.num_image_tokens * len(samples)


# ---------------------------------------------------------------- hand-off


def test_chat_starts_from_a_stage2_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tests.helpers import debug_system

    stage2 = debug_system("stage2_meanpool")   # the debug stage-2 recipe's system, built without a CLI parse
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():   # distinct from any fresh init with the recipe's seed
        for p in stage2.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    source = {k: v.clone() for k, v in stage2.state_dict().items()}
    torch.save({"state_dict": source, "global_step": 2}, tmp_path / "stage2.ckpt")

    cli = cli_main(["--config", str(DEBUG / "chat.yaml"), "--model.init_args.init_from",
                    str(tmp_path / "stage2.ckpt")], run=False)
    chat = cli.model
    state = chat.state_dict()
    parts = ("encoder", "adapter", "llm", "regression_head")
    assert any(not torch.equal(state[k], source[k]) for k in source if k.startswith("llm."))  # before the hand-off
    chat.setup("fit")
    assert set(chat.handoff_report.loaded) == set(parts)
    state = chat.state_dict()
    for part in parts:
        keys = [k for k in source if k.startswith(part + ".")]
        assert keys, part
        for k in keys:
            torch.testing.assert_close(state[k], source[k], rtol=0, atol=0, msg=k)
    assert set(state) == set(source)                                  # nothing left fresh
