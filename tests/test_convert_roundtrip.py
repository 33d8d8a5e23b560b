"""Released checkpoint → convert → fine-tune through the CLI → export → convert again
for every released layout docs/converting.md lists, at tiny sizes.

Each layout is built as the tests of the converter build it (tests/test_convert_emu1.py, tests/test_convert_emu2.py:
names, prefixes and dtypes from the official code, file and line cited there), converted with `python -m
emu_lightning.checkpoints.convert`, fine-tuned 2 steps on the debug synthetic data through `main.py fit` (the
release's `finetune_released.yaml` + the converter's `model.yaml`), exported with `convert export --weights`, and
the export converted again. Exact means:
- the export has the release's keys, each in the release's dtype; what did not train (the encoder, the tensors
  kept aside: EVA-CLIP head, T5 word embedding, RoPE buffers, Gen's UNet / VAE / safety checker) is the released
  tensor itself;
- the export converted again gives the fine-tuned tensors exactly (cast to the released dtype), all but the
  platform's appended vocabulary rows, which the released layout has no room for: they come back as the mean of the
  released rows, as in any conversion (docs/converting.md, "The appended vocabulary rows");
- Emu-I's LoRA layout exports the fine-tuned LLaMA as the base weights with zero `lora_B`, and a run fine-tuned
  with `policy.lora` (Emu-I's own recipe) exports with its factors merged.

Then continued training in the other modes from a converted Emu2: chat tuning (`recipes/debug/chat.yaml`, Emu2-Chat
style, `[USER]` / `[ASSISTANT]` at the release's ids) and generation tuning (`recipes/debug/gen.yaml`, grounding in
the release's own tokens: `data.init_args.spelling: emu2`).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from emu_lightning.checkpoints.convert.__main__ import main as convert
from emu_lightning.checkpoints.convert.emu2 import GEN, PROJECTIONS
from emu_lightning.checkpoints.convert.folder import lora_merged
from emu_lightning.checkpoints.convert.tokenizer import ASSISTANT, USER
from emu_lightning.checkpoints.io import safe_load
from emu_lightning.cli import cli_main
from tests.test_convert_common import EVA, LLM, _rand, base_tokenizer
from tests.test_convert_emu1 import T5, emu_i_release, released_emu1
from tests.test_convert_emu2 import GRID, released_emu2

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
HEADS = ["--vision-heads", str(EVA["heads"]), "--llm-heads", str(LLM["heads"])]


def _bf16(state: dict) -> dict:
    return {k: v.to(torch.bfloat16) for k, v in state.items()}


def _save(state: dict, path: Path) -> str:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return str(path)


def _shards(state: dict, folder: Path) -> str:
    """The HF `variant="bf16"` shards of Emu2-Gen's `multimodal_encoder/` (model.bf16-0000i-of-00002 + index)."""
    from safetensors.torch import save_file

    folder.mkdir()
    keys = sorted(state)
    shards = {"model.bf16-00001-of-00002.safetensors": keys[::2], "model.bf16-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(folder / name))
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.bf16.json").write_text(json.dumps(index))
    return str(folder)


def _gen_file(tok: str) -> dict:
    """Emu2-Gen's native file: the Emu2 keys under `multimodal_encoder.` beside the pipeline's other modules."""
    state, _ = released_emu2(tok, prefix=GEN)
    state.update({"unet.conv_in.weight": _rand(8, 4, 3, 3), "vae.decoder.conv_out.weight": _rand(3, 8, 3, 3),
                  "safety_checker.vision_model.embeddings.patch_embedding.weight": _rand(8, 3, 4, 4)})
    return _bf16(state)


# id → (release, build(tok, tmp) → (released state, SRC), converter flags, exported file name, policy.lora)
LAYOUTS = {
    "emu1-native": ("emu1", lambda tok, tmp: (s := released_emu1(tok)[0], _save({"module": s}, tmp / "emu1.pt")),
                    ["--t5-heads", str(T5["num_heads"])], "emu1.pt", None),
    "emu-i-peft": ("emu1", lambda tok, tmp: (s := emu_i_release(tok, base_layer=True)[0],
                                             _save({"module": s}, tmp / "Emu-instruct.pt")),
                   ["--t5-heads", str(T5["num_heads"]), "--lora-alpha", "8"], "Emu-instruct.pt", None),
    "emu-i-peft+lora-policy": ("emu1", lambda tok, tmp: (s := emu_i_release(tok, base_layer=False)[0],
                                                         _save(s, tmp / "Emu-instruct.pt")),
                               ["--t5-heads", str(T5["num_heads"]), "--lora-alpha", "8"], "Emu-instruct.pt",
                               {"llm": {"r": 4, "alpha": 8.0}}),
    "emu2-native-bf16": ("emu2", lambda tok, tmp: (s := _bf16(released_emu2(tok)[0]),
                                                   _save(s, tmp / "Emu2_pytorch_model.bf16.bin")),
                         ["--grid", str(GRID)], "Emu2_pytorch_model.bf16.bin", None),
    "emu2-a8bd539-names": ("emu2", lambda tok, tmp: (s := released_emu2(tok, names=PROJECTIONS[1])[0],
                                                     _save(s, tmp / "emu2.pt")), ["--grid", str(GRID)], "emu2.pt",
                           None),
    "emu2-pre-a8bd539-names": ("emu2", lambda tok, tmp: (s := released_emu2(tok, names=PROJECTIONS[2])[0],
                                                         _save(s, tmp / "emu2.pt")), ["--grid", str(GRID)],
                               "emu2.pt", None),
    "emu2-hf-bf16-shards": ("emu2", lambda tok, tmp: (s := _bf16(released_emu2(tok, layout="hf")[0]),
                                                      _shards(s, tmp / "multimodal_encoder")),
                            ["--grid", str(GRID)], "model.safetensors", None),
    "emu2-chat-bf16": ("emu2", lambda tok, tmp: (s := _bf16(released_emu2(tok, instruct=True)[0]),
                                                 _save(s, tmp / "Emu2-Chat_pytorch_model.bf16.pth")),
                       ["--grid", str(GRID)], "Emu2-Chat_pytorch_model.bf16.pth", None),
    "emu2-gen-bf16": ("emu2", lambda tok, tmp: (s := _gen_file(tok),
                                                _save(s, tmp / "Emu2-Gen_pytorch_model.bf16.safetensors")),
                      ["--grid", str(GRID)], "Emu2-Gen_pytorch_model.bf16.safetensors", None),
}


def data_overlay(tmp: Path, train: dict, **init_args) -> str:
    """Debug synthetic data at the tiny checkpoints' 32 px, 2 documents a step; no evaluation sets are run."""
    def syn(module, cls, split, n):
        return {"class_path": f"emu_lightning.data.synthetic.{module}.{cls}",
                "init_args": {"split": split, "size": n, "image_size": EVA["image"]}}

    small = {"captions": syn("scenes", "SyntheticCaptions", "val", 2)}
    trainer = {"max_steps": STEPS, "val_check_interval": None, "limit_val_batches": 0, "num_sanity_val_steps": 0,
               "accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true",
               "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
               "default_root_dir": str(tmp), "callbacks": [
                   {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True, "save_top_k": 0}},
                   {"class_path": "callbacks.trainable_audit.TrainableAudit"}]}
    cfg = {"trainer": trainer,
           "data": {"init_args": {"train": {k: syn(*v) for k, v in train.items()}, "weights": None, "layouts": None,
                                  "val": small, "test": small, "demos": small, "image_size": EVA["image"],
                                  "batch_size": 2, "eval_batch_size": 2, "num_workers": 0, "max_length": 96,
                                  "num_frames": 2, **init_args}}}
    path = tmp / "overlay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


STAGE2_DATA = {"pairs": ("scenes", "SyntheticCaptions", "train", 16),
               "documents": ("scenes", "SyntheticDocuments", "train", 16)}


def fit(tmp: Path, recipe: Path, folder: Path, overlay: str, *extra: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        cli = cli_main(["fit", "--config", str(recipe), "--config", str(folder / "model.yaml"), "--config", overlay,
                        *extra])
    assert cli.trainer.global_step == STEPS
    return cli


def _lr(parts: list[str], lr: float = 1e-2) -> list[str]:
    """Large enough that 2 steps move bf16 weights (the recipes' 1e-5 would round away in a bf16 export)."""
    return ["--model.init_args.warmup", "0", "--model.init_args.policy.lr", json.dumps({p: lr for p in parts})]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_convert_fine_tune_export_and_convert_again_is_exact(layout, tmp_path):
    release, build, flags, name, lora = LAYOUTS[layout]
    tok = base_tokenizer(tmp_path / "llama")
    released, src = build(tok, tmp_path)
    folder = convert([release, src, str(tmp_path / "converted"), "--tokenizer", tok, *HEADS, *flags])
    meta = json.loads((folder / "conversion.json").read_text())
    extra = _lr(["adapter", "llm", "regression_head"])
    if lora:
        extra += ["--model.init_args.policy.lora", json.dumps(lora)]
    cli = fit(tmp_path, ROOT / "recipes" / release / "finetune_released.yaml", folder,
              data_overlay(tmp_path, STAGE2_DATA, video_token=release == "emu2"), *extra)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    trained = lora_merged(str(ckpt))                    # a policy.lora run: its factors merged (peft's merge)
    if lora:
        assert any(".lora_B." in k for k in cli.model.state_dict())
    out = convert(["export", str(folder), str(tmp_path / name), "--weights", str(ckpt)])

    from emu_lightning.checkpoints.convert.common import read_released

    exported = read_released(str(out))
    assert exported.keys() == {k for k in released} and all(exported[k].dtype == released[k].dtype for k in released)
    ours_of = {r: o for r, o in meta["keys"].items() if not o.startswith("unused")}   # released key → our key
    untouched = [r for r in released if (r not in ours_of or ours_of[r].startswith("encoder."))
                 and ".lora_B." not in r]                             # Emu-I's B factors export as zeros (below)
    assert untouched and all(torch.equal(exported[r], released[r]) for r in untouched)
    moved = [r for r, o in ours_of.items() if o.startswith(("llm.", "adapter.")) and not torch.equal(exported[r],
                                                                                                      released[r])]
    assert moved, "the fine-tune changed nothing that the export wrote"
    if layout.startswith("emu-i"):
        assert all(not exported[k].any() for k in exported if ".lora_B." in k)       # the update is in the base

    again = convert([release, str(out), str(tmp_path / "again"), "--tokenizer", tok, *HEADS, *flags])
    reread = safe_load(again / "weights.pt")
    assert reread.keys() == safe_load(folder / "weights.pt").keys()
    rows = meta["rows"]
    for key, value in reread.items():
        want = trained[key].to(value.dtype)
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):             # released rows, then the mean
            assert torch.equal(value[:rows], want[:rows]), key
            assert torch.equal(value[rows:], value[:rows].float().mean(0).to(value.dtype).expand_as(value[rows:]))
        else:
            assert torch.equal(value, want), key


# A converted release's encoder has the patchify stem EVA ships; the debug recipes' encoder, trained from scratch, has
# a convolutional stem and a sine-cosine position start (recipes/components/encoder_eva_debug.yaml): put it back.
RELEASED_STEM = ["--model.init_args.encoder.init_args.stem", "patch",
                 "--model.init_args.encoder.init_args.pos_init", "default"]


def _converted(tmp: Path, instruct: bool) -> tuple[Path, str]:
    tok = base_tokenizer(tmp / "llama")
    state = _bf16(released_emu2(tok, instruct=instruct)[0])
    src = _save(state, tmp / "emu2.bin")
    return convert(["emu2", src, str(tmp / "converted"), "--tokenizer", tok, *HEADS, "--grid", str(GRID)]), tok


def test_chat_tuning_from_a_converted_emu2_chat_uses_the_released_role_rows(tmp_path):
    """Emu2-Chat style: the debug chat system (answer-only CE, `recipes/debug/chat.yaml`) started from a converted
    Emu2-Chat in its chat template; `[USER]` and `[ASSISTANT]` are the release's own rows (lm.py L53-54: the last
    two released ids), not appended ones, and the sequences the model trains on carry them."""
    folder, _ = _converted(tmp_path, instruct=True)
    rows = json.loads((folder / "conversion.json").read_text())["rows"]
    overlay = data_overlay(tmp_path, {"chat": ("instruct", "SyntheticChat", "train", 16)}, max_length=160)
    cli = fit(tmp_path, ROOT / "recipes" / "debug" / "chat.yaml", folder, overlay,
              "--model.init_args.template", "emu2_chat", *_lr(["adapter", "llm"]), *RELEASED_STEM)
    tok, system = cli.model.tokenizer, cli.model
    assert tok.convert_tokens_to_ids([USER, ASSISTANT]) == [rows - 2, rows - 1]
    assert system.handoff_report.loaded.keys() == {"encoder", "adapter", "llm", "regression_head"}
    batch = next(iter(cli.datamodule.train_dataloader()))
    ids = batch["input_ids"]
    assert (ids == rows - 2).any() and (ids == rows - 1).any()
    assert (batch["labels"] != -100).any()


def test_gen_tuning_from_a_converted_emu2_in_the_release_spelling(tmp_path):
    """Emu2-Gen style: the debug gen system (ℓ2 on the last image only, `recipes/debug/gen.yaml`) started from a
    converted Emu2, its grounded instructions in the release's own tokens (`data.init_args.spelling: emu2`, so every
    id it reads is a released row); the regression head and the LLM move, the frozen encoder does not."""
    folder, _ = _converted(tmp_path, instruct=False)
    rows = json.loads((folder / "conversion.json").read_text())["rows"]
    overlay = data_overlay(tmp_path, {"gen": ("instruct", "SyntheticGen", "train", 16)}, max_length=160,
                           spelling="emu2")
    cli = fit(tmp_path, ROOT / "recipes" / "debug" / "gen.yaml", folder, overlay,
              *_lr(["adapter", "llm", "regression_head"]), *RELEASED_STEM)
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert int(batch["input_ids"].max()) < rows
    start, end = safe_load(folder / "weights.pt"), cli.model.state_dict()
    assert all(torch.equal(end[k], start[k].float()) for k in start if k.startswith("encoder."))
    assert not torch.equal(end["regression_head.proj.weight"], start["regression_head.proj.weight"].float())
