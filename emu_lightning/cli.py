"""EmuCLI: `main.py fit|validate|test|predict --config recipe.yaml`, LightningCLI with Emu's links.

The model owns the tokenizer and N (visual tokens per image); both are linked into the datamodule, so
swapping the adapter is one `class_path` line and the collate always agrees with it. Checkpoints are written
atomically and read `weights_only` (`SafeCheckpointIO`) unless the recipe's `trainer.plugins` names another
CheckpointIO. `--empty_init true` builds the model's parts on the meta device for a hand-off from full-size shards
(`checkpoints/shards.py`).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

# Nothing is ever fetched from a hub: weights and tokenizers come from local paths in the recipe.
# huggingface_hub reads this once at import, so it is set before anything imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging
import warnings
from contextlib import nullcontext
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.hparams import ConfigToTensorBoard
from emu_lightning.checkpoints.handoff import CheckpointInfo, key_differences, part_names
from emu_lightning.checkpoints.io import SafeCheckpointIO, safe_load
from emu_lightning.checkpoints.shards import empty_init
from emu_lightning.systems.base import PartsSystem

# Known-benign messages, silenced here so that a run's log shows what needs attention:
# - the systems move batches themselves (`PartsSystem.transfer_batch_to_device`: scene records are frozen
#   dataclasses that Lightning's default copy cannot rebuild), and Lightning warns about that on every run
#   that also has a datamodule;
# - frozen parts (encoder, VAE, a frozen adapter) are in eval mode on purpose (the recipe's `policy`, audited
#   by `TrainableAudit`), and Lightning warns about every module in eval mode at fit start;
# - Lightning 2.6's own pytree helper calls a torch API that torch 2.14 deprecates;
# - Lightning advertises a cloud logger on every Trainer.
warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule`")
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoAdverts())


class EmuCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model", "data.init_args.tokenizer", compute_fn=lambda m: m.tokenizer,
                              apply_on="instantiate")
        parser.link_arguments("model", "data.init_args.num_image_tokens",
                              compute_fn=lambda m: m.num_image_tokens, apply_on="instantiate")
        # How the CLI builds the model, not a hyper-parameter of it: LightningCLI builds the injected parts before
        # the system exists, so only the CLI can build them empty. Saved in the run's config.yaml, not the ckpt.
        parser.add_argument("--empty_init", type=bool, default=False,
                            help="Build the model's parameters on the meta device and let the hand-off assign "
                                 "model.init_args.init_from's tensors (memory-mapped safetensors shards: one copy "
                                 "of the weights, not two); what init_from does not hold is initialised at setup. "
                                 "Ignored with --ckpt_path, which restores every part.")

    def before_instantiate_classes(self) -> None:
        # `--trainer.enable_progress_bar false` (logs to a file, CI) wins over the recipe's RichProgressBar.
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg.trainer.enable_progress_bar is False and cfg.trainer.callbacks:
            cfg.trainer.callbacks = [c for c in cfg.trainer.callbacks if not c.class_path.endswith("ProgressBar")]
        self._copy_template(cfg)

    def before_fit(self) -> None:
        """A resume (`--ckpt_path`) restores every part from its own checkpoint, so the earlier stage's
        checkpoint named by `init_from` is neither needed nor read: the run resumes even after that stage's
        folder moved or was deleted, or from another working directory. (The saved config keeps `init_from`.)"""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path and getattr(self.model, "init_from", None):
            print(f"resuming from {ckpt_path}: the hand-off from init_from={self.model.init_from} is skipped "
                  f"(the checkpoint holds every part)", flush=True)
            self.model.init_from = None

    @staticmethod
    def _copy_template(cfg) -> None:
        # The chat template is named once, on the model (it builds the prompts and is saved with it); the data
        # renders the training conversations with the same one. A different explicit data template is an error.
        model = cfg.get("model") and cfg.model.get("init_args")
        data = cfg.get("data") and cfg.data.get("init_args")
        if not model or not data or "template" not in model or "template" not in data:
            return
        if data.template is not None and data.template != model.template:
            raise ValueError(f"data.init_args.template={data.template!r} differs from model.init_args.template="
                             f"{model.template!r}: name the chat template once, on the model")
        data.template = model.template

    _ckpt: CheckpointInfo | None = None     # what `--ckpt_path` is, checked against the recipe's system once built

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's reading of `--ckpt_path`'s hyper-parameters into the config, with the file read once by
        `safe_load` (weights_only; a file that is no checkpoint is named as such) and what it is kept for
        `after_instantiate_classes`. A checkpoint of another system class than the recipe's is not forced onto the
        config (its hyper-parameters do not parse there, and the failure ended in a repr of the whole config): the
        recipe is built as written and the check names both systems and their parts."""
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if not path:
            return
        if Path(path).is_dir():
            # A sharded checkpoint (`EmuModelParallelStrategy`/FSDP2 saves a folder of per-rank files): the strategy
            # reads it; its hyper-parameters and parts are not checked here.
            return
        if not Path(path).is_file():
            if str(path) in ("last", "best", "hpc") or str(path).startswith("registry"):
                return                                              # Lightning's own names, resolved by the Trainer
            raise FileNotFoundError(f"--ckpt_path {path}: no such file")
        ckpt = safe_load(path)
        self._ckpt = CheckpointInfo.of(path, ckpt)
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        recipe = self.config[sub].get("model") and self.config[sub].model.get("class_path")
        if not hparams or (recipe and hparams.get("_class_path", recipe) != recipe):
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise
        self._ckpt_hparams = True

    _ckpt_hparams = False                    # the model config holds `--ckpt_path`'s hyper-parameters

    def _build_empty(self) -> bool:
        """Whether `--empty_init true` applies: with `init_from` to assign and no `--ckpt_path` (a resume builds
        normally: Lightning's restore copies the checkpoint into existing tensors, and under FSDP the checkpoint
        holds every part anyway)."""
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if not cfg.get("empty_init"):
            return False
        init_from = cfg.get("model") and cfg.model.get("init_args") and cfg.model.init_args.get("init_from")
        if cfg.get("ckpt_path"):
            print(f"--empty_init is ignored: --ckpt_path {cfg.ckpt_path} restores every part into a model built "
                  "the ordinary way", flush=True)
            return False
        if not init_from:
            raise ValueError("--empty_init true builds the parts on the meta device for model.init_args.init_from "
                             "to fill, but init_from is not set: give the weights, or leave empty_init false")
        print(f"--empty_init: parameters built on the meta device; init_from={init_from} is assigned (memory-mapped "
              "when safetensors) at setup (under FSDP2 on several processes: after the sharding, each rank its own "
              "slices), and what it does not hold is initialised then", flush=True)
        return True

    def instantiate_classes(self) -> None:
        try:
            # Everything LightningCLI builds is inside `empty_init()`, but only the model holds parameters (data
            # modules, callbacks and the Trainer hold none; a parameter left on meta fails at setup anyway).
            with empty_init() if self._build_empty() else nullcontext():
                super().instantiate_classes()
        except Exception as err:
            if not (self._ckpt and self._ckpt_hparams):
                raise
            # e.g. a stage-2 C-Former recipe resumed from a mean-pool run: its target_space='pooled' came with it
            raise ValueError(f"{self._ckpt}; its hyper-parameters (which --ckpt_path applies over the recipe's) do "
                             f"not build this recipe: {_root_cause(err)}") from None

    def after_instantiate_classes(self) -> None:
        """A `--ckpt_path` that does not fit the recipe's system fails now, before any data is read, naming the file,
        the system that saved it and its parts, and what the recipe needs (instead of Lightning's strict-load error
        or a config parse failure)."""
        info, self._ckpt = self._ckpt, None
        if info is None or not isinstance(self.model, PartsSystem):
            return
        want = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        system, needs = type(self.model).__name__, part_names(want)
        hint = ("--ckpt_path resumes a run of this recipe; to start from another run's weights give it as "
                "--model.init_args.init_from" if self.subcommand == "fit"
                else "--ckpt_path must be a checkpoint of this recipe's system")
        if info.parts != needs:
            raise info.mismatch(system, needs, hint=hint)
        if self.subcommand == "fit" and info.system not in (None, system):
            raise info.mismatch(system, needs, f" (the same parts, but saved by {info.system})", hint)
        diffs = [d for part in needs if (d := key_differences(info.shapes, want, part))]
        if diffs:
            raise info.mismatch(system, needs, "; " + "; ".join(diffs[:2]),
                                "The recipe's parts are not the ones that were saved (another class or size)")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, SafeCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


def cli_main(args: list[str] | None = None, run: bool = True) -> EmuCLI:
    """The CLI on `args`, or on the process's command line when `args` is None."""
    with warnings.catch_warnings():
        # Given `args`, the process's own command line (a test runner's, a notebook's) is not read; Lightning
        # warns whenever it is non-empty anyway.
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within")
        return EmuCLI(PartsSystem, subclass_mode_model=True, subclass_mode_data=True, args=args, run=run,
                      save_config_callback=ConfigToTensorBoard, save_config_kwargs={"overwrite": True},
                      parser_kwargs={"parser_mode": "omegaconf"})


_WRAPPERS = ("Does not validate against any of the Union subtypes", "Problem with given class_path")


def _root_cause(err: BaseException) -> BaseException:
    """The exception that says what is wrong: the innermost of the chain that is not the config parser's wrapper
    around it (jsonargparse re-raises a component's ValueError as "Does not validate against any of the Union
    subtypes" followed by a repr of the whole config)."""
    chain, e = [], err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ if e.__cause__ is not None else None if e.__suppress_context__ else e.__context__
    for e in reversed(chain):
        if not any(w in str(e) for w in _WRAPPERS) and type(e).__module__.split(".")[0] not in ("jsonargparse",):
            return e
    return err


def failure_message(err: BaseException, max_lines: int = 12) -> str:
    """One short block for a failed run: what failed and the message that names the file, field or widths."""
    root = _root_cause(err)
    text = str(root).strip()
    if any(w in text for w in _WRAPPERS):                  # only the wrapper: keep its nested error lines
        nested = [ln.strip()[2:] for ln in text.splitlines() if ln.strip().startswith("- ") and "NoneType" not in ln]
        text = "\n".join(nested) or text.splitlines()[0]
    lines = [ln for ln in text.splitlines() if not ln.startswith("Given value")][:max_lines]
    return "\n".join([f"error: {type(root).__name__}: {lines[0] if lines else ''}", *("  " + ln for ln in lines[1:]),
                      "(the full traceback: run again with EMU_TRACEBACK=1)"])


def main(args: list[str] | None = None) -> int:
    """`main.py`'s entry: the CLI's exit status. A SIGTERM'd fit (`CheckpointOnSigterm` saved `last.ckpt`)
    exits 143 as a SIGTERM'd process does, so launchers and the sweep runner do not take it for a success.
    Any other failure prints one short block (`failure_message`) and exits 1; `EMU_TRACEBACK=1` lets the
    exception and its full traceback through instead."""
    try:
        cli_main(args)
    except SIGTERMException:
        return 128 + signal.SIGTERM
    except Exception as err:   # noqa: BLE001: every failure becomes a message a user can act on
        if os.environ.get("EMU_TRACEBACK", "") not in ("", "0"):
            raise
        print(failure_message(err), file=sys.stderr, flush=True)
        return 1
    return 0
