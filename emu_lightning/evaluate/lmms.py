"""The lmms-eval model plug-in: `lmms-eval --model emu_lightning --model_args ckpt=<model> --tasks ...`.

lmms-eval (EvolvingLMMs-Lab/lmms-eval; 0.6.1, pinned as the `[lmms]` extra, docs/evaluation.md says why) runs its
benchmarks' data, prompts and metrics on any model that implements its `lmms` interface; numbers from it stand next
to those of other models evaluated the same way. This plug-in is that interface over the model
`python -m emu_lightning.evaluate` uses (`evaluate/model.py`: loaded by `inference.infer.load_model` from a run
directory, a `.ckpt` of a run or an exported folder; docs/evaluation.md, "lmms-eval").

lmms-eval finds it through the entry point `emu_lightning` of the group `lmms_eval.models` (pyproject.toml), which
its model registry reads at start-up; nothing is copied into lmms-eval.

model_args (`key=value,...`):
- `ckpt` (required), `config`, `tokenizer`: as `--ckpt`, `--config`, `--tokenizer` of
  `python -m emu_lightning.evaluate`;
- `prompt`: what the model reads (`PROMPTS`):
  - `task` (default, except for a captioner): the task's own text (lmms-eval's context) after the document's images;
    a chat-tuned model reads them as one user turn of its chat template, ending with its generation prompt;
  - `vqa`: the papers' zero-shot VQA prompt of docs/evaluation.md with the task's text as the question (Emu2's
    `{img} based on the picture, answer in one word or phrase. {q} short answer:` for a pretrained model, Emu-I's
    instruction for a chat model), the answer cut at its first period or line break; one image per document;
  - `caption`: the papers' captioning prompt, the task's text ignored, the caption cut at its first line break; one
    image per document; the only prompt of a stage-1 captioner (and its default);
- `num_beams` (default 1), `max_new_tokens` (default 32): used where the task's `generation_kwargs` do not set them;
- `batch_size` (lmms-eval's `--batch_size`), `device` (`--device`; default cuda when there is one, else cpu).

Generation (`generate_until`) is deterministic (greedy or beam search) and stops at `</s>`, at a new `[IMG]`, after
`max_new_tokens`, or at the first of the task's `until` strings, which is cut off. A task asking for sampling
(`do_sample` or `temperature` > 0) is decoded deterministically all the same, and a warning says so.
`loglikelihood` scores a continuation after the same prompt (`PromptedModel.score`): multiple-choice tasks work.
Images only: a document whose visual is a video or audio stops the run, naming the document.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MODEL_ID = "emu_lightning"
PROMPTS = ("task", "vqa", "caption")

try:
    from lmms_eval.api.model import lmms as _Base
except ImportError:   # lmms-eval is the [lmms] extra; without it the request handling still runs (the tests)
    class _Base:   # the part of `lmms.__init__` this plug-in reads
        is_simple = True

        def __init__(self) -> None:
            self._rank, self._world_size, self.task_dict = 0, 1, {}


def manifest():
    """The entry point lmms-eval's registry loads: `emu_lightning` → `EmuLightning` (a "simple" model: it is given
    the task's text and `doc_to_visual`, not chat messages)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.EmuLightning")


def _int(name: str, value: Any, default: int) -> int:
    if value is None or value == "" or (isinstance(value, str) and value.startswith("auto")):
        return default   # lmms-eval's --batch_size auto: no memory probing here
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"emu_lightning: {name}={value!r} is not an integer") from None
    if out < 1:
        raise ValueError(f"emu_lightning: {name}={out}; expected >= 1")
    return out


def cut_at(text: str, until: Sequence[str]) -> str:
    """`text` up to the earliest of the stop strings `until` (lmms-eval's `until`), the stop string dropped."""
    ends = [i for i in (text.find(u) for u in until if u) if i >= 0]
    return text[:min(ends)] if ends else text


class EmuLightning(_Base):
    """lmms-eval's `lmms` over a `PromptedModel` (module docstring).

    Args:
        ckpt: run directory, `.ckpt` file of a run or exported folder.
        config: config.yaml of the run, for a `.ckpt` outside `<run>/checkpoints/`.
        tokenizer: tokenizer folder overriding the run's.
        prompt: `task`, `vqa` or `caption` (module docstring); None = `caption` for a captioner, else `task`.
        num_beams, max_new_tokens: decoding where the task's generation_kwargs do not say.
        batch_size: requests per forward pass.
        device: torch device; None = cuda when available, else cpu.
        max_batch_size: lmms-eval passes it; unused (no `auto` batch size).
        model: an already loaded `PromptedModel` instead of `ckpt` (Python use and tests).
    """

    is_simple = True

    def __init__(self, ckpt: str | None = None, config: str | None = None, tokenizer: str | None = None,
                 prompt: str | None = None, num_beams: int = 1, max_new_tokens: int = 32,
                 batch_size: int | str | None = 1, device: str | None = None, max_batch_size: int | None = None,
                 model: Any = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"emu_lightning: unknown model_args {sorted(unknown)}; known: ckpt, config, tokenizer, "
                             f"prompt, num_beams, max_new_tokens, batch_size, device")
        if prompt is not None and prompt not in PROMPTS:
            raise ValueError(f"emu_lightning: prompt={prompt!r}; expected one of {PROMPTS}")
        self.batch_size_per_gpu = _int("batch_size", batch_size, 1)
        num_beams, max_new_tokens = _int("num_beams", num_beams, 1), _int("max_new_tokens", max_new_tokens, 32)
        # The arguments are checked before the model is loaded (a large one takes minutes).
        self.model = model if model is not None else load(ckpt, config, tokenizer, device)
        self.model.num_beams, self.model.max_new_tokens = num_beams, max_new_tokens
        self.prompt = prompt or ("caption" if self.model.kind == "captioner" else "task")
        if self.model.kind == "captioner" and self.prompt != "caption":
            raise ValueError(f"emu_lightning: a stage-1 captioner reads only its image (prompt=caption); "
                             f"prompt={self.prompt} needs a stage-2 or chat-tuned model")
        self._warned: set[str] = set()

    @property
    def device(self):
        return self.model.system.device

    # ------------------------------------------------------------------ prompts

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError) as err:
            raise KeyError(f"emu_lightning: no document {doc_id} of {task}/{split} in the task data") from err

    def _images(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int) -> list:
        from PIL import Image

        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id))
        visuals = [] if visuals is None else visuals if isinstance(visuals, (list, tuple)) else [visuals]
        out = []
        for v in visuals:
            if isinstance(v, (str, Path)) and Path(v).is_file():
                try:
                    v = Image.open(v)
                except OSError:
                    pass   # not an image: named below
            if not isinstance(v, Image.Image):
                raise ValueError(f"emu_lightning reads images; document {doc_id} of {task}/{split} gave a "
                                 f"{type(v).__name__} ({str(v)[:80]!r}): video and audio tasks are not supported")
            out.append(v.convert("RGB"))
        return out

    def _prompt(self, context: str, images: list, where: str) -> list[tuple[str, Any]]:
        """The segments the model reads for one request (module docstring, `prompt`)."""
        model = self.model
        if self.prompt == "task":
            content = [*(("image", im) for im in images), *([("text", context)] if context else [])]
            if model.kind == "chat":
                return model.system.template.segments([("user", content)], prompt=True)
            return content
        if len(images) != 1:
            raise ValueError(f"emu_lightning: prompt={self.prompt} reads one image per document; {where} has "
                             f"{len(images)}")
        return model.prompt(self.prompt, {"image": images[0], "question": context})

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _decoding(self, gen_kwargs: dict | None, task: str) -> tuple[int, int, tuple[str, ...]]:
        """(max_new_tokens, num_beams, until) of a request; the model's settings where the task sets none."""
        kw = dict(gen_kwargs or {})
        until = kw.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        if kw.get("do_sample") or float(kw.get("temperature") or 0) > 0:
            self._warn_once(f"sample/{task}", f"emu_lightning: {task} asks for sampling (do_sample="
                                              f"{kw.get('do_sample')}, temperature={kw.get('temperature')}); "
                                              f"decoding greedily / by beam search instead")
        return (_int("max_new_tokens", kw.get("max_new_tokens"), self.model.max_new_tokens),
                _int("num_beams", kw.get("num_beams"), self.model.num_beams), until)

    # ------------------------------------------------------------------ lmms-eval's requests

    def _request_prompt(self, args: tuple) -> list[tuple[str, Any]]:
        """The prompt of one request (`args[0]` its context; its document at `args[2:6]` when it has one)."""
        if len(args) == 2:   # an unconditional loglikelihood request (acc_mutual_info): no document, no image
            return self._prompt(args[0], [], "an unconditional request")
        doc_to_visual, doc_id, task, split = args[2:6]
        return self._prompt(args[0], self._images(doc_to_visual, task, split, doc_id),
                            f"document {doc_id} of {task}/{split}")

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """`Instance.args` = (context, generation_kwargs, doc_to_visual, doc_id, task, split) → one text each.

        Requests with the same decoding settings share batches, in their order; a batch's images are read when it
        runs, so a benchmark's images are never all in memory at once."""
        settings = [self._decoding(req.args[1], req.args[4]) for req in requests]
        out: list[str] = [""] * len(requests)
        for setting in dict.fromkeys(settings):
            max_new_tokens, num_beams, until = setting
            same = [i for i, s in enumerate(settings) if s == setting]
            for start in range(0, len(same), self.batch_size_per_gpu):
                chunk = same[start:start + self.batch_size_per_gpu]
                prompts = [self._request_prompt(requests[i].args) for i in chunk]
                for i, text in zip(chunk, self.model.complete(prompts, max_new_tokens, num_beams)):
                    text = self.model.cut(self.prompt, text) if self.prompt != "task" else text
                    out[i] = cut_at(text, until).strip()
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """`Instance.args` = (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split), or
        (context, continuation) without a document → (log p(continuation | prompt), greedy?) each."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = [req.args for req in requests[start:start + self.batch_size_per_gpu]]
            out += self.model.score([self._request_prompt(a) for a in chunk], [self._continuation(a) for a in chunk])
        return out

    def _continuation(self, args: tuple) -> str:
        """A multiple-choice request's continuation is given; a `loglikelihood` task's is `doc_to_target(doc)`."""
        if isinstance(args[1], str):
            return args[1]
        _, doc_to_target, _, doc_id, task, split = args
        return str(doc_to_target(self._doc(task, split, doc_id)))

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("emu_lightning answers one request at a time (generate_until): multi-round tasks "
                                  "(generate_until_multi_round) are not supported")


def load(ckpt: str | None, config: str | None = None, tokenizer: str | None = None, device: str | None = None):
    """A `PromptedModel` on `device` from what `python -m emu_lightning.evaluate --ckpt` takes."""
    import torch

    from emu_lightning.evaluate.model import PromptedModel
    from emu_lightning.inference.infer import load_model

    if not ckpt:
        raise ValueError("emu_lightning needs model_args ckpt=<run directory, .ckpt file or exported folder>")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return PromptedModel(load_model(ckpt, config, tokenizer).to(device))
