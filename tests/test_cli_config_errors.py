"""Config faults fail at start-up, before any data is read, and name both sides: unknown keys, wrong types,
component widths that do not chain (encoder → adapter → LLM, LLM → regression head → targets, condition →
decoder cross-attention). The data section of each run points at annotation files that do not exist: the error
being the width / key one proves the check ran before any data was touched (stage 1, whose `train` is one
dataset; the stage-2 sources are lazy synthetic sets, built after the model in the same way)."""
from __future__ import annotations

from pathlib import Path

import pytest

from emu_lightning.cli import cli_main

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "debug"
NO_DATA = ["--data.init_args.train", '{"class_path": "emu_lightning.data.real.captions.CocoCaptions", '
           '"init_args": {"annotations": "/nonexistent/captions.json", "image_dir": "/nonexistent"}}']

WIDTHS = {
    "adapter out vs LLM": ("stage2_meanpool", ["--model.init_args.adapter.init_args.out_dim", "128"],
                           r"adapter output width \(adapter.out_dim=128, MeanPoolProjector\) does not match the LLM "
                           r"width \(llm.hidden_dim=256, LlamaLM\)"),
    "encoder vs adapter in": ("stage2_cformer", ["--model.init_args.adapter.init_args.in_dim", "96"],
                              r"encoder width \(encoder.embed_dim=192, EVAEncoder\) does not match the adapter's "
                              r"input width \(adapter.in_dim=96, CFormer\)"),
    "regression head vs targets": ("stage2_meanpool", ["--model.init_args.regression_head.init_args.out_dim", "256"],
                                   r"regression_head is 256→256; target_space='pooled' needs 256→192"),
    "stage-1 adapter vs LLM": ("stage1_cformer", ["--model.init_args.adapter.init_args.out_dim", "64"],
                               r"adapter.out_dim=64.*llm.hidden_dim=256"),
}


@pytest.mark.parametrize("case", WIDTHS, ids=str)
def test_width_mismatch_names_both_sides_before_data(case):
    recipe, override, match = WIDTHS[case]
    no_data = NO_DATA if recipe.startswith("stage1") else []
    with pytest.raises(ValueError, match=match):
        cli_main(["--config", str(RECIPES / f"{recipe}.yaml"), *override, *no_data], run=False)


def test_the_missing_data_is_found_once_the_widths_agree():   # the control of NO_DATA
    # (jsonargparse wraps the loader's FileNotFoundError in a ValueError that quotes it)
    with pytest.raises((FileNotFoundError, ValueError), match="COCO annotation file not found: /nonexistent/captions"):
        cli_main(["--config", str(RECIPES / "stage1_cformer.yaml"), *NO_DATA], run=False)


def test_decoder_condition_width_vs_cross_attention():
    with pytest.raises(ValueError, match=r"conditioning width 192 \(condition='pooled' of MeanPoolProjector\) does "
                                         r"not match the UNet's cross_attention_dim 128"):
        cli_main(["--config", str(RECIPES / "decoder.yaml"), "--model.init_args.unet.init_args.cond_dim", "128"],
                 run=False)


@pytest.mark.parametrize("override, named", [
    (["--model.init_args.text_wieght", "1.0"], "text_wieght"),                    # unknown key (a typo)
    (["--model.init_args.text_weight", "heavy"], "text_weight"),                  # wrong type
    (["--data.init_args.batch_size", "[8]"], "batch_size"),
    (["--model.init_args.max_bad_steps", "some"], "max_bad_steps"),
])
def test_unknown_key_or_wrong_type_is_named(override, named, capsys):
    with pytest.raises(SystemExit):
        cli_main(["--config", str(RECIPES / "stage2_meanpool.yaml"), *override], run=False)
    assert named in capsys.readouterr().err
