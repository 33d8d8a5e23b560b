"""EmuCLI: `main.py fit|validate|test|predict --config recipe.yaml`, LightningCLI with Emu's links.

The model owns the tokenizer and N (visual tokens per image); both are linked into the datamodule, so
swapping the adapter is one `class_path` line and the collate always agrees with it.
"""
from __future__ import annotations

import os

# Nothing is ever fetched from a hub: weights and tokenizers come from local paths in the recipe.
# huggingface_hub reads this once at import, so it is set before anything imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning.pytorch.cli import LightningCLI

from emu_lightning.systems.base import PartsSystem


class EmuCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model", "data.init_args.tokenizer", compute_fn=lambda m: m.tokenizer,
                              apply_on="instantiate")
        parser.link_arguments("model", "data.init_args.num_image_tokens",
                              compute_fn=lambda m: m.num_image_tokens, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        # `--trainer.enable_progress_bar false` (logs to a file, CI) wins over the recipe's RichProgressBar.
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg.trainer.enable_progress_bar is False and cfg.trainer.callbacks:
            cfg.trainer.callbacks = [c for c in cfg.trainer.callbacks if not c.class_path.endswith("ProgressBar")]


def cli_main(args: list[str] | None = None, run: bool = True) -> EmuCLI:
    return EmuCLI(PartsSystem, subclass_mode_model=True, subclass_mode_data=True, args=args, run=run,
                  save_config_kwargs={"overwrite": True}, parser_kwargs={"parser_mode": "omegaconf"})
