"""`python -m emu_lightning.inference` end to end on tiny CLI-trained runs (a few steps each: wiring, not quality).

Runs (module fixtures, each fitted once): chat (`recipes/debug/chat.yaml`), stage 1 (`stage1_meanpool.yaml`),
gen (`gen.yaml`) and a visual decoder (`decoder.yaml`, 2 sampling steps). Every subcommand goes through
`infer.main([...])` (its exit code) with PNG files as inputs, and writes `<out>/<command>.jsonl` / PNG files.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from emu_lightning.inference import infer
from emu_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "recipes" / "debug"
DECODER_SIZE = 32   # recipes/debug/decoder.yaml image_size

# One thread: the machine's cores are shared with training runs, and oversubscribed CPU kernels (the decoder
# UNet's first calls especially) run ~100x slower than on one thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(tmp: Path, recipe: str, name: str, steps: int, data: dict, model: dict | None = None) -> Path:
    """Fit `recipes/debug/<recipe>.yaml` for `steps` steps with tiny data; the run directory."""
    cfg = {"trainer": {"max_steps": steps, "val_check_interval": steps, "limit_val_batches": 0,   # no evaluation: these runs only feed inference
                       "log_every_n_steps": 1, "enable_progress_bar": False,
                       "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": str(tmp / "runs"), "name": name, "version": 0}}},
           "data": {"init_args": {"batch_size": 4, "eval_batch_size": 2, "num_workers": 0, **data}}}
    if model:
        cfg["model"] = {"init_args": model}
    overlay = tmp / f"{name}_overlay.yaml"
    overlay.write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        cli = cli_main(["fit", "--config", str(DEBUG / f"{recipe}.yaml"), "--config", str(overlay)])
    assert cli.trainer.global_step == steps
    run = tmp / "runs" / name / "version_0"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    return run


def _set(cls: str, split: str, size: int = 2, **kw) -> dict:
    return {"class_path": cls, "init_args": {"split": split, "size": size, "image_size": 64, **kw}}


CAPTIONS = "emu_lightning.data.synthetic.scenes.SyntheticCaptions"
CHAT = "emu_lightning.data.synthetic.instruct.SyntheticChat"
GEN = "emu_lightning.data.synthetic.instruct.SyntheticGen"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def chat_run(runs) -> Path:
    kinds = {"kinds": ["vqa", "count"]}
    return _fit(runs, "chat", "chat", 2, {"val": {"val_chat": _set(CHAT, "val", **kinds)},
                                          "test": {"test_chat": _set(CHAT, "test", **kinds)}})


@pytest.fixture(scope="module")
def stage1_run(runs) -> Path:
    return _fit(runs, "stage1_meanpool", "stage1_meanpool", 2,
                {"val": {"val": _set(CAPTIONS, "val")}, "test": {"test": _set(CAPTIONS, "test")}},
                {"max_new_tokens": 3, "num_beams": 1})


@pytest.fixture(scope="module")
def gen_run(runs) -> Path:
    evals = {"grounded_p": 1.0, "subject_p": 0.0}
    return _fit(runs, "gen", "gen", 2, {"train": {"gen": _set(GEN, "train", 32, subject_p=0.5)},
                                        "val": {"val_gen": _set(GEN, "val", **evals)},
                                        "test": {"test_gen": _set(GEN, "test", **evals)}})


@pytest.fixture(scope="module")
def decoder_run(runs) -> Path:
    return _fit(runs, "decoder", "decoder", 2,
                {"train": _set(CAPTIONS, "train", 16), "val": {"val": _set(CAPTIONS, "val")}},
                {"init_from": None, "sample_steps": 2})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Three synthetic scenes as PNG files."""
    from emu_lightning.data.synthetic.scenes import SyntheticCaptions

    folder = tmp_path_factory.mktemp("images")
    ds = SyntheticCaptions(split="test", size=3, image_size=64)
    paths = []
    for i in range(3):
        path = folder / f"scene{i}.png"
        ds[i]["image"].save(path)
        paths.append(str(path))
    return paths


def run(argv: list[str], out: Path) -> tuple[int, list[dict]]:
    code = infer.main([*argv, "--out", str(out), "--max-new-tokens", "4"])
    path = out / f"{argv[0]}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if code == 0 else []
    return code, rows


# ---------------------------------------------------------------- caption / vqa / chat


def test_caption_with_a_chat_run(chat_run, images, tmp_path):
    code, rows = run(["caption", "--ckpt", str(chat_run), "--image", images[0], "--image", images[1]], tmp_path)
    assert code == 0
    assert [r["image"] for r in rows] == images[:2] and all(isinstance(r["caption"], str) for r in rows)


def test_caption_with_a_ckpt_file(chat_run, images, tmp_path):
    ckpt = chat_run / "checkpoints" / "last.ckpt"        # its config.yaml is found two levels up
    code, rows = run(["caption", "--ckpt", str(ckpt), "--image", images[0]], tmp_path)
    assert code == 0 and len(rows) == 1


def test_caption_with_a_stage1_run(stage1_run, images, tmp_path):
    code, rows = run(["caption", "--ckpt", str(stage1_run), "--image", images[0], "--image", images[2]], tmp_path)
    assert code == 0
    assert [r["image"] for r in rows] == [images[0], images[2]] and all(isinstance(r["caption"], str) for r in rows)


def test_stage1_run_refuses_vqa(stage1_run, images, tmp_path, capsys):
    code = infer.main(["vqa", "--ckpt", str(stage1_run), "--image", images[0], "--question", "what color?",
                       "--out", str(tmp_path)])
    assert code == 2 and "captioner" in capsys.readouterr().err


def test_caption_with_an_exported_folder(chat_run, images, tmp_path, capsys):
    from emu_lightning.checkpoints.export import main as export_main
    from emu_lightning.systems.instruct import ChatSystem

    out = tmp_path / "exported"
    export_main([str(chat_run), str(out)])
    assert (out / "emu_config.json").is_file()
    assert json.loads((out / "emu_config.json").read_text())["chat_template"] is not None
    assert isinstance(infer.load_model(out), ChatSystem)
    code, rows = run(["caption", "--ckpt", str(out), "--image", images[1]], tmp_path / "o")
    assert code == 0 and rows[0]["image"] == images[1] and isinstance(rows[0]["caption"], str)
    # The exported model answers as the run does (same weights, same template, greedy).
    capsys.readouterr()
    code, again = run(["caption", "--ckpt", str(chat_run), "--image", images[1]], tmp_path / "r")
    assert code == 0 and again[0]["caption"] == rows[0]["caption"]


def test_vqa_with_a_chat_run(chat_run, images, tmp_path, capsys):
    code, rows = run(["vqa", "--ckpt", str(chat_run), "--image", images[0], "--question",
                      "what color is the circle?"], tmp_path)
    assert code == 0
    [row] = rows
    assert row == {"image": images[0], "question": "what color is the circle?", "answer": row["answer"]}
    assert json.loads(capsys.readouterr().out.strip()) == row      # also printed as a JSON line


def test_chat_with_messages(chat_run, images, tmp_path):
    code, rows = run(["chat", "--ckpt", str(chat_run), "--image", images[0], "--message", "how many shapes are there?",
                      "--message", "what color is the first one?"], tmp_path)
    assert code == 0
    assert [r["user"] for r in rows] == ["how many shapes are there?", "what color is the first one?"]
    assert all(isinstance(r["assistant"], str) for r in rows)


def test_empty_answers_are_noted_not_passed_off(chat_run, images, tmp_path, monkeypatch, capsys):
    """A model that ends every answer at once (an untrained or briefly tuned one emits </s> first) still exits 0,
    but says so on stderr instead of printing nothing."""
    from emu_lightning.systems.stage2 import Stage2System

    monkeypatch.setattr(Stage2System, "generate_text", lambda self, docs, *a, **k: [""] * len(docs))
    code, rows = run(["chat", "--ckpt", str(chat_run), "--image", images[0], "--image", images[1],
                      "--message", "which image has more shapes?"], tmp_path)
    assert code == 0 and rows == [{"user": "which image has more shapes?", "assistant": ""}]
    err = capsys.readouterr().err
    assert "note: 1 of 1 replies are empty" in err and "first token was </s>" in err, err


def test_chat_reads_turns_from_stdin(chat_run, images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("how many shapes are there?\n\nis there a red circle?\n"))  # blank: no turn
    code, rows = run(["chat", "--ckpt", str(chat_run), "--image", images[1]], tmp_path)
    assert code == 0
    assert [r["user"] for r in rows] == ["how many shapes are there?", "is there a red circle?"]
    printed = capsys.readouterr().out.splitlines()
    assert printed == [r["assistant"] for r in rows]                  # not a tty: plain replies, no prompts


# ---------------------------------------------------------------- generate / blend


def test_gen_model_and_decoder_share_the_condition_space(gen_run, decoder_run):
    gen, decoder = infer.load_model(gen_run), infer.load_model(decoder_run)
    assert gen.target_space == decoder.condition_kind == "pooled"
    assert (gen.num_image_tokens, gen.regression_head.out_dim) == (decoder.unet.num_tokens, decoder.unet.cond_dim)


def _pngs(rows: list[dict], n: int) -> None:
    assert len(rows) == n
    for row in rows:
        with Image.open(row["image"]) as im:
            assert im.format == "PNG" and im.size == (DECODER_SIZE, DECODER_SIZE)


def test_generate_from_text(gen_run, decoder_run, tmp_path):
    code, rows = run(["generate", "--ckpt", str(gen_run), "--decoder", str(decoder_run), "--prompt",
                      "a picture of a large red circle.", "--steps", "2"], tmp_path)
    assert code == 0
    _pngs(rows, 1)
    assert rows[0]["prompt"] == "a picture of a large red circle." and rows[0]["images"] == []


def test_generate_with_a_reference_image(gen_run, decoder_run, images, tmp_path):
    prompt = "a picture of <image> this shape and a small blue star."
    code, rows = run(["generate", "--ckpt", str(gen_run), "--decoder", str(decoder_run), "--prompt", prompt,
                      "--image", images[2], "--steps", "2"], tmp_path)
    assert code == 0
    _pngs(rows, 1)
    assert rows[0]["images"] == [images[2]]


def test_generate_with_an_exported_decoder_matches_the_run(gen_run, decoder_run, tmp_path):
    """`--decoder` also takes an `export_decoder` folder (plain diffusers UNet + condition files): same prompt and
    seed, same pixels as sampling with the decoder's training run."""
    from emu_lightning.checkpoints.decoder_export import export_decoder

    folder = export_decoder(infer.load_model(decoder_run), tmp_path / "export")
    argv = ["generate", "--ckpt", str(gen_run), "--prompt", "a picture of a small green square.", "--steps", "2"]
    code_run, from_run = run([*argv, "--decoder", str(decoder_run)], tmp_path / "from_run")
    code_export, from_export = run([*argv, "--decoder", str(folder)], tmp_path / "from_export")
    assert code_run == code_export == 0
    _pngs(from_export, 1)
    a, b = (np.asarray(Image.open(r[0]["image"]), dtype=np.int16) for r in (from_run, from_export))
    assert np.abs(a - b).max() <= 1, np.abs(a - b).max()          # PNG rounding of identical floats
    assert a.std() > 0                                             # an image, not a blank


def test_blend_with_an_exported_decoder_is_an_error(decoder_run, images, tmp_path, capsys):
    from emu_lightning.checkpoints.decoder_export import export_decoder

    folder = export_decoder(infer.load_model(decoder_run), tmp_path / "export")
    code = infer.main(["blend", "--decoder", str(folder), "--image", images[0], "--image", images[1],
                       "--steps", "1", "--out", str(tmp_path)])
    assert code == 2 and "exported decoder has no encoder" in capsys.readouterr().err


def test_generate_placeholder_count_mismatch(gen_run, decoder_run, images, tmp_path, capsys):
    code = infer.main(["generate", "--ckpt", str(gen_run), "--decoder", str(decoder_run), "--prompt",
                       "<image> and <image> together", "--image", images[0], "--steps", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "2 <image> placeholders" in err and "1 --image" in err, err
    assert not list(tmp_path.glob("*.png"))


def test_generate_without_decoder_is_an_error(gen_run, tmp_path, capsys):
    code = infer.main(["generate", "--ckpt", str(gen_run), "--prompt", "a red circle", "--out", str(tmp_path)])
    assert code == 2 and "--decoder" in capsys.readouterr().err


def test_decoder_flag_must_name_a_decoder_run(chat_run, images, tmp_path, capsys):
    code = infer.main(["blend", "--decoder", str(chat_run), "--image", images[0], "--image", images[1],
                       "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "holds a ChatSystem, not a visual decoder run" in err, err


def test_generate_with_a_stage1_model_is_an_error(stage1_run, decoder_run, tmp_path, capsys):
    code = infer.main(["generate", "--ckpt", str(stage1_run), "--decoder", str(decoder_run), "--prompt",
                       "a red circle", "--steps", "1", "--out", str(tmp_path)])
    assert code == 2 and "Stage1System" in capsys.readouterr().err


def test_blend_two_images(decoder_run, images, tmp_path):
    code, rows = run(["blend", "--decoder", str(decoder_run), "--image", images[0], "--image", images[1],
                      "--alphas", "0", "0.5", "1", "--steps", "2"], tmp_path)
    assert code == 0
    _pngs(rows, 3)
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["blend_000.png", "blend_001.png", "blend_002.png"]


def test_blend_needs_two_images(decoder_run, images, tmp_path, capsys):
    code = infer.main(["blend", "--decoder", str(decoder_run), "--image", images[0], "--out", str(tmp_path)])
    assert code == 2 and "exactly two --image, got 1" in capsys.readouterr().err


# ---------------------------------------------------------------- errors


def test_missing_checkpoint_names_the_path(images, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    code = infer.main(["caption", "--ckpt", str(missing), "--image", images[0], "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err, err


def test_missing_image_names_the_path(chat_run, tmp_path, capsys):
    missing = tmp_path / "nowhere.png"
    code = infer.main(["caption", "--ckpt", str(chat_run), "--image", str(missing), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err, err


def test_unreadable_image_names_the_path(chat_run, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    code = infer.main(["caption", "--ckpt", str(chat_run), "--image", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "not a readable image" in err, err


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> tuple[Path, int]:
    from emu_lightning.data.layout.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("tok512")
    tok = load_tokenizer(None, vocab_size=512)
    tok.save_pretrained(str(folder))
    return folder, len(load_tokenizer(str(folder)))


def _embedding_rows(run: Path) -> int:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    [rows] = {v.shape[0] for k, v in state.items() if k.endswith("embed_tokens.weight")}
    return rows


def test_mismatched_tokenizer_names_both_sizes(chat_run, small_tokenizer, images, tmp_path, capsys):
    folder, n_tok = small_tokenizer
    rows = _embedding_rows(chat_run)
    assert n_tok != rows
    code = infer.main(["caption", "--ckpt", str(chat_run), "--tokenizer", str(folder), "--image", images[0],
                       "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and f"{n_tok} tokens" in err and f"{rows} embedding rows" in err, err


def test_mismatched_tokenizer_on_an_exported_folder(chat_run, small_tokenizer, images, tmp_path, capsys):
    from emu_lightning.checkpoints.export import main as export_main

    folder, n_tok = small_tokenizer
    out = tmp_path / "exported"
    export_main([str(chat_run), str(out)])
    rows = _embedding_rows(chat_run)
    capsys.readouterr()
    code = infer.main(["caption", "--ckpt", str(out), "--tokenizer", str(folder), "--image", images[0],
                       "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"{n_tok} tokens" in err and f"{rows} embedding rows" in err, err
