"""Every stage recipe parses through the real CLI; real-size ones instantiate on the meta device."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emu_lightning.cli import EmuCLI, cli_main
from emu_lightning.systems.base import EmuSystem, PartsSystem

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
STAGES = sorted(p for p in RECIPES.rglob("*.yaml") if p.parent.name not in {"_base", "components", "sweeps", "chains"})
REAL = [p for p in STAGES if p.parent.name != "debug"]


def test_there_are_recipes():
    assert {p.name for p in STAGES} >= {"stage1_cformer.yaml", "stage1_meanpool.yaml"}
    assert {p.parent.name for p in REAL} >= {"emu1", "emu2"}


@pytest.mark.parametrize("recipe", [p for p in STAGES if p not in REAL], ids=str)
def test_debug_recipe_builds(recipe):
    cli = cli_main(["--config", str(recipe)], run=False)
    emu = "decoder" not in recipe.name and "stage0" not in recipe.name   # decoder, contrastive: no LLM
    assert isinstance(cli.model, EmuSystem if emu else PartsSystem)
    assert cli.datamodule.num_image_tokens == cli.model.num_image_tokens


def test_debug_recipes_differ_only_in_adapter():
    a = (RECIPES / "debug" / "stage1_cformer.yaml").read_text().splitlines()
    b = (RECIPES / "debug" / "stage1_meanpool.yaml").read_text().splitlines()
    diff = [(x, y) for x, y in zip(a, b) if x != y and not x.startswith("#")]
    # the adapter line, and the run folder each logs to (runs/stage1_cformer, runs/stage1_meanpool)
    assert len(a) == len(b) and len(diff) == 2 and "adapter:" in diff[1][0]
    assert diff[0] == ("    init_args: {save_dir: runs, name: stage1_cformer}", "    init_args: {save_dir: runs, name: stage1_meanpool}")


@pytest.mark.parametrize("recipe", [p for p in REAL if "decoder" not in p.name], ids=str)
def test_real_size_recipe_builds_on_meta(recipe):
    # Real weights and shards are not on this machine: the test points the local paths at nothing (random
    # init, synthetic tokenizer) and keeps the recipe's architecture; meta tensors allocate no memory.
    overrides = ["--model.init_args.tokenizer", "null", "--data.init_args.train", "null",
                 "--data.init_args.val", "null",
                 "--data.init_args.test", "null", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                 "--trainer.strategy", "auto", "--trainer.logger", "false"]
    # Released fine-tuning and instruction tuning (chat, gen) are stage-2 models too, at stage 2's 448 px.
    stage2 = "stage2" in recipe.name or recipe.name in ("finetune_released.yaml", "chat.yaml", "gen.yaml")
    if stage2:  # the real sources' names go with them
        overrides += ["--data.init_args.weights", "null", "--data.init_args.layouts", "null",
                      "--data.init_args.demos", "null"]
    with torch.device("meta"):
        cli = cli_main(["--config", str(recipe), *overrides], run=False)
    n = sum(p.numel() for p in cli.model.parameters())
    assert all(p.is_meta for p in cli.model.parameters())
    m = cli.model
    # docs/design.md §1: Emu1 = EVA-CLIP-g (1408, 16×16 + CLS = 257 tokens) → C-Former (32) → LLaMA-13B (5120);
    # Emu2 = EVA-E-plus (1792, CLS dropped) → 8×8 = 64 pooled tokens → LLaMA-33B (6656).
    # Emu2 stage 2 runs at 448 px: a 32×32 grid (1024 tokens) pooled with k = s = 4 to the same 8×8.
    expected = {"emu1": (1408, 257, 32, 5120, 40), "emu2": (1792, 256, 64, 6656, 60)}[recipe.parent.name]
    if recipe.parent.name == "emu2" and stage2:
        expected = (1792, 1024, 256 if recipe.name == "chat.yaml" else 64, 6656, 60)   # Emu2-Chat: 16×16 per image
    got = (m.encoder.embed_dim, m.encoder.num_tokens, m.adapter.num_tokens, m.llm.hidden_dim,
           m.llm.model.config.num_hidden_layers)
    assert got == expected
    assert cli.datamodule.num_image_tokens == expected[2]
    assert n > 13e9 if recipe.parent.name == "emu1" else n > 32e9, n
    if stage2:  # the regression head's width is the target space's (docs/design.md §1)
        head = {"emu1": (5120, 5120), "emu2": (6656, 1792)}[recipe.parent.name]
        assert (m.regression_head.in_dim, m.regression_head.out_dim) == head
        assert "encoder" not in m.policy.trainable


def test_stage2_debug_recipes_differ_only_in_adapter_head_and_targets():
    a = (RECIPES / "debug" / "stage2_cformer.yaml").read_text().splitlines()
    b = (RECIPES / "debug" / "stage2_meanpool.yaml").read_text().splitlines()
    diff = [x.split(":")[0].strip() for x, y in zip(a, b) if x != y and not x.startswith("#")]
    # init_args: the run folder each logs to (runs/stage2_cformer, runs/stage2_meanpool)
    assert len(a) == len(b) and diff == ["init_args", "adapter", "regression_head", "target_space"]


def test_unknown_recipe_key_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "debug" / "stage1_cformer.yaml").read_text().replace("num_beams: 3", "num_beamz: 3")
                   .replace("../", str(RECIPES / "debug") + "/../"))
    with pytest.raises(SystemExit):
        EmuCLI(EmuSystem, subclass_mode_model=True, subclass_mode_data=True, args=["--config", str(bad)], run=False)
    assert "num_beamz" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", [p for p in REAL if "decoder" in p.name], ids=str)
def test_real_size_decoder_recipe_builds_on_meta(recipe, tmp_path):
    # No SD weights here: the UNet and VAE are built from the architectures the recipe states beside the local
    # paths (`pretrained: null`), on the meta device. Nested nulls go in a YAML overlay: on the command line
    # jsonargparse hands a nested `init_args` the string "None".
    overlay = tmp_path / "no_weights.yaml"
    overlay.write_text("model:\n  init_args:\n    unet:\n      init_args: {pretrained: null}\n"
                       "    space:\n      init_args: {pretrained: null}\n")
    overrides = ["--config", str(overlay), "--model.init_args.init_from", "null",
                 "--data.init_args.train", "null", "--data.init_args.val", "null", "--data.init_args.test", "null",
                 "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                 "--trainer.strategy", "auto", "--trainer.logger", "false"]
    with torch.device("meta"):
        cli = cli_main(["--config", str(recipe), *overrides], run=False)
    m = cli.model
    assert all(p.is_meta for p in m.parameters())
    unet = m.unet.unet.config
    # docs/design.md §4: Emu1 = SD1.5 UNet (860 M) reading 32 × 5120 C-Former outputs, 512 px (64² latents);
    # Emu2 = SDXL UNet (2.6 B) reading 64 × 1792 pooled tokens + their mean (add-embedding input 3328), 1024 px.
    if recipe.parent.name == "emu1":
        assert (m.condition_kind, unet.cross_attention_dim, m.unet.num_tokens, unet.sample_size, m.image_size) == (
            "adapter", 5120, 32, 64, 512)
        assert m.adapter.out_dim == 5120 and m.noise_offset == 0.0 and m.sampler == "pndm"
    else:
        assert (m.condition_kind, unet.cross_attention_dim, m.unet.num_tokens, unet.sample_size, m.image_size) == (
            "pooled", 1792, 64, 128, 1024)
        assert unet.addition_embed_type == "text_time" and unet.projection_class_embeddings_input_dim == 3328
        assert m.noise_offset == 0.1 and m.sampler == "euler" and m.guidance_scale == 3.0
    n_unet = sum(p.numel() for p in m.unet.parameters())
    assert (0.8e9 < n_unet < 1.2e9) if recipe.parent.name == "emu1" else (2.4e9 < n_unet < 2.8e9), n_unet
    assert m.cond_drop == 0.1 and m.policy.trainable == ["unet"]
    assert m.space.vae.config.latent_channels == 4 and m.space.factor == 8
