"""Real-size recipes shard one FSDP unit per component block (`block_cls`) with activation checkpointing
chosen per part, and the strategy turns that into exactly those modules."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from emu_lightning.cli import EmuCLI, cli_main
from emu_lightning.systems.sharding import EmuFSDPStrategy, EmuModelParallelStrategy, block_units
from tests.helpers import tiny_stage1

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("recipe, ac, blocks", [
    ("emu1/stage1.yaml", ["encoder", "adapter", "llm"], {"encoder": 40, "adapter": 12, "llm": 40}),
    ("emu2/stage2.yaml", ["adapter", "llm"], {"encoder": 64, "llm": 60}),
])
def test_real_recipe_strategy_wraps_component_blocks(recipe, ac, blocks, monkeypatch):
    captured = {}
    # The CPU here cannot host Lightning's FSDP (CUDA only): keep the parsed strategy, build no Trainer.
    def keep_strategy(self, **kwargs):
        return captured.setdefault("strategy", self._get(self.config_init, "trainer")["strategy"])

    monkeypatch.setattr(EmuCLI, "instantiate_trainer", keep_strategy)
    overrides = ["--model.init_args.tokenizer", "null", "--data.init_args.train", "null", "--data.init_args.val",
                 "null", "--data.init_args.test", "null"]
    if "stage2" in recipe:   # the real sources' names go with them
        overrides += ["--data.init_args.weights", "null", "--data.init_args.layouts", "null",
                      "--data.init_args.demos", "null", "--model.init_args.init_from", "null"]
    with torch.device("meta"):
        cli = cli_main(["--config", str(RECIPES / recipe), *overrides], run=False)
    strategy = captured["strategy"]
    assert isinstance(strategy, EmuFSDPStrategy) and isinstance(strategy, FSDPStrategy)
    assert strategy.activation_checkpointing_parts == ac and strategy._state_dict_type == "sharded"
    assert {k: len(v) for k, v in block_units(cli.model.parts).items()} == blocks


@pytest.mark.parametrize("recipe, blocks", [("emu1/decoder.yaml", {"encoder": 40, "adapter": 12, "unet": 38}),
                                            ("emu2/decoder.yaml", {"encoder": 64, "unet": 87})])
def test_real_decoder_recipe_strategy_wraps_unet_blocks(recipe, blocks, monkeypatch, tmp_path):
    captured = {}

    def keep_strategy(self, **kwargs):
        return captured.setdefault("strategy", self._get(self.config_init, "trainer")["strategy"])

    monkeypatch.setattr(EmuCLI, "instantiate_trainer", keep_strategy)
    overlay = tmp_path / "no_weights.yaml"    # no SD weights here: the architectures the recipes state
    overlay.write_text("model:\n  init_args:\n    unet:\n      init_args: {pretrained: null}\n"
                       "    space:\n      init_args: {pretrained: null}\n")
    with torch.device("meta"):
        cli = cli_main(["--config", str(RECIPES / recipe), "--config", str(overlay), "--model.init_args.init_from",
                        "null", "--data.init_args.train", "null", "--data.init_args.val", "null",
                        "--data.init_args.test", "null"], run=False)
    strategy = captured["strategy"]
    assert isinstance(strategy, EmuFSDPStrategy) and strategy.activation_checkpointing_parts == ["unet"]
    units = block_units(cli.model.parts)
    assert {k: len(v) for k, v in units.items()} == blocks
    assert {type(m).__name__ for m in units["unet"]} == {"ResnetBlock2D", "BasicTransformerBlock"}


def test_fsdp_policies_select_each_parts_blocks(monkeypatch):
    system = tiny_stage1("cformer")
    monkeypatch.setattr(FSDPStrategy, "_setup_model", lambda self, model: model)
    strategy = EmuFSDPStrategy(activation_checkpointing_parts=["llm"])
    strategy._lightning_module = system
    strategy._setup_model(system)
    wrap = strategy.kwargs["auto_wrap_policy"]._lambda_fn
    check = strategy._activation_checkpointing_kwargs["check_fn"]
    wrapped = [m for m in system.modules() if wrap(m)]
    checkpointed = [m for m in system.modules() if check(m)]
    units = block_units(system.parts)
    assert {type(m).__name__ for m in wrapped} == {"EvaBlock", "T5Block", "LlamaDecoderLayer"}
    assert len(wrapped) == sum(map(len, units.values())) == 2 + 1 + 2
    assert checkpointed == units["llm"]       # only the part the recipe names


def test_strategy_options_are_checked():
    with pytest.raises(ValueError, match="param_dtype"):
        EmuModelParallelStrategy(param_dtype="bf16")
    with pytest.raises(ValueError, match="parts"):
        block_units(tiny_stage1().parts, ["vision"])
