"""Every N training steps: one of the papers' benchmark protocols of `python -m emu_lightning.evaluate`
(docs/evaluation.md) on the first `limit` items of its local files, run on the system being trained.

The protocol is the command's own code (`emu_lightning/evaluate/cli.py`: `run_caption`, `run_vqa`,
`run_generation`) given the in-memory system instead of `--ckpt`, so a logged score equals what
`python -m emu_lightning.evaluate <task> --ckpt <this step's checkpoint> --limit <limit> ...` prints (at 32-bit
precision; under a mixed precision the loop generates under autocast, as validation does). Scores go to
every logger at the global step as `protocol/<task>/k<k>/<metric>` (`CIDEr`, `Bleu_4`, ...; VQA `overall` and
`perAnswerType/<type>`; coco-fid `protocol/coco-fid/fid/FID`; GenEval and DPG-Bench only write their folders),
and into `trainer.callback_metrics`, so `ModelCheckpoint` can monitor them.
Result files and image folders are written as the command writes them, under `<log_dir>/protocol/<task>/step_<N>/`.

Ranks: every rank runs the same protocol on the same items (the whole slice, not a shard), so every rank's system
answers the same forward calls; rank 0 writes the files and its loggers log. Parameter-sharding strategies (FSDP,
DeepSpeed) are refused at setup: the protocol calls the system's generation directly, outside the strategy's
wrapped forward. Each module's train/eval mode and the RNG state are restored afterwards.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from emu_lightning.evaluate import cli

TEXT_TASKS = ("caption", *cli.VQA_TASKS)


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """Restores every submodule's own train/eval flag on exit (a frozen encoder may stay in eval mode in training)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def flat_scores(scores: dict, prefix: str) -> dict[str, float]:
    """`{"k0": {"CIDEr": 0.1, "perAnswerType": {"yes/no": 50.0}, "notes": [...]}}` → `{"<prefix>/k0/CIDEr": 0.1,
    "<prefix>/k0/perAnswerType/yes/no": 50.0}`: numeric leaves only; VQA's per-question-type table (dozens of types)
    and question count stay in scores.json."""
    out: dict[str, float] = {}
    for key, value in scores.items():
        if key in ("perQuestionType", "questions"):
            continue
        if isinstance(value, dict):
            out.update(flat_scores(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)
    return out


class ProtocolEval(L.Callback):
    """Runs `python -m emu_lightning.evaluate <task>` on the system in training every `every_n_steps` steps.

    Arguments after `limit` are the command's options of the same name (`--demo-annotations` → `demo_annotations`);
    None leaves the command's default.

    Args:
        task: "caption", "vqav2", "okvqa", "vizwiz", "textvqa", "geneval", "dpg-bench" or "coco-fid".
        every_n_steps: run after each optimizer step whose global step is a multiple of this.
        limit: items scored, the first ones of the file (`--limit`); None = all of them.
        shots: demonstrations per query, one score each (k > 0 needs a stage-2 model and the `demo_*` files).
        images, annotations, split, questions, image_template, num_answers, rules, selection, demo_annotations,
            demo_questions, demo_images, demo_split, demo_image_template, metrics, batch_size, num_beams,
            max_new_tokens, seed: captioning and VQA options.
        decoder, decoder_config, ckpt, config, prompts, per_prompt, captions, num, reference, inception_weights,
            fid_size, guidance, steps: generation options; the system in training is the generator (a stage-2
            model: `decoder` is loaded) or the decoder (`ckpt` names the generator).
    """

    def __init__(self, task: str, every_n_steps: int = 1000, limit: int | None = 100, shots: Sequence[int] = (0,),
                 images: str | None = None, annotations: str | None = None, split: str | None = None,
                 questions: str | None = None, image_template: str | None = None, num_answers: int | None = None,
                 rules: str | None = None, selection: str | None = None, demo_annotations: str | None = None,
                 demo_questions: str | None = None, demo_images: str | None = None, demo_split: str | None = None,
                 demo_image_template: str | None = None, metrics: str | None = None, batch_size: int | None = None,
                 num_beams: int | None = None, max_new_tokens: int | None = None, seed: int | None = None,
                 decoder: str | None = None, decoder_config: str | None = None, ckpt: str | None = None,
                 config: str | None = None, prompts: str | None = None, per_prompt: int | None = None,
                 captions: str | None = None, num: int | None = None, reference: str | None = None,
                 inception_weights: str | None = None, fid_size: int | None = None, guidance: float | None = None,
                 steps: int | None = None) -> None:
        if task not in cli.TASKS:
            raise ValueError(f"ProtocolEval: task={task!r}; expected one of {cli.TASKS}")
        if every_n_steps < 1:
            raise ValueError(f"ProtocolEval: every_n_steps={every_n_steps}; expected at least 1")
        self.task, self.every_n_steps = task, every_n_steps
        # Every other argument is a command option of the same name.
        options = {k: v for k, v in locals().items() if k not in ("self", "task", "every_n_steps")}
        options["shots"] = list(shots)
        self.args = self._parse(task, options)
        self._inputs: Any = None
        self._pipeline: Any = None
        self._last_step = -1

    @staticmethod
    def _parse(task: str, options: dict[str, Any]) -> argparse.Namespace:
        """The command's own parser on these options: same defaults, same checks (`rules`, `selection` choices)."""
        argv = [task]
        for name, value in options.items():
            if value is None:
                continue
            values = value if isinstance(value, list) else [value]
            argv += [f"--{name.replace('_', '-')}", *map(str, values)]
        p = cli.parser()
        p.exit_on_error = False
        try:
            return p.parse_args(argv)
        except argparse.ArgumentError as err:
            raise ValueError(f"ProtocolEval({task}): {err}") from None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Reads and checks every file (and the model's fit for the task) before the first step."""
        if stage != "fit":
            return
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(f"ProtocolEval runs the system's generation outside the strategy's forward; "
                             f"{type(trainer.strategy).__name__} shards parameters (use a single device or DDP)")
        a = self.args
        if self.task == "caption":
            self._inputs = cli.caption_inputs(a)
        elif self.task in cli.VQA_TASKS:
            if not a.annotations:
                raise ValueError(f"ProtocolEval({self.task}) logs scores: it needs annotations (the question file "
                                 f"{a.questions} alone gives results, not scores)")
            self._inputs = cli.vqa_inputs(a)
        else:
            self._inputs = cli.generation_inputs(a)
        with evaluating(pl_module):
            if self.task in TEXT_TASKS:
                model = cli.prompted_model(a, pl_module)      # raises if the system has no prompt for the task at k
                for k in a.shots:
                    model.check("caption" if self.task == "caption" else "vqa", k)
            else:
                self._pipeline = cli.image_pipeline(a, pl_module)   # loads the other half (decoder or generator)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end on one global step: run once per step.
        if step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        scores = self.run(trainer, pl_module)
        metrics = flat_scores(scores, f"protocol/{self.task}")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """The protocol's scores (as its `scores.json`) for the system as it is now."""
        cuda = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        log_dir = trainer.log_dir or trainer.default_root_dir     # on every rank: `log_dir` broadcasts rank 0's
        with contextlib.ExitStack() as stack:
            if trainer.is_global_zero:
                out = Path(log_dir) / "protocol" / self.task / f"step_{trainer.global_step:06d}"
            else:   # same work on every rank; only rank 0's files are kept
                out = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            out.mkdir(parents=True, exist_ok=True)
            stack.enter_context(evaluating(pl_module))
            stack.enter_context(torch.random.fork_rng(devices=cuda))   # training draws as without this callback
            stack.enter_context(trainer.precision_plugin.val_step_context())
            pl_module.eval()
            if self.task == "caption":
                scores = cli.run_caption(self.args, out, pl_module, self._inputs, progress=None)
            elif self.task in cli.VQA_TASKS:
                scores = cli.run_vqa(self.args, out, pl_module, self._inputs, progress=None)
            else:
                for part in (self._pipeline.generator, self._pipeline.decoder):
                    part.to(pl_module.device)   # the loaded half follows the system onto its device
                scores = cli.run_generation(self.args, out, self._pipeline, self._inputs)
            (out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")   # as the command's
        return scores
