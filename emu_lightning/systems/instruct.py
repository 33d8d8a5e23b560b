"""Instruction tuning (docs/design.md §2-3): Emu-I / Emu2-Chat (`ChatSystem`) and Emu2-Gen (`GenSystem`).

Both are stage-2 models tuned further from a stage-2 checkpoint (`init_from`, the regression head included),
with the same forward pass; what differs is the data and which loss counts:

- chat: conversations in the chat template (`data/layout/chat.py`, the one place the format lives), cross-entropy
  on the answers and their `</s>` only, no image loss (docs/design.md §2: Emu2-Chat uses the text loss only).
  Evaluation asks each held-out conversation's last question with the template's generation prompt and scores the
  answer with VQA accuracy under its lenient rules (`<set>/answer_acc`, `metrics/vqa.py`);
- gen: instruction → image, with grounding tokens (`<p>phrase</p><coor><loc…>×4</coor>`) and reference images,
  ℓ2 regression of the last image only, no text loss (docs/design.md §2). Evaluation regresses the image from
  the instruction alone (KV-cached loop) and compares it with the encoder's embeddings (`<set>/gen_cos`, `gen_mse`);
  with a decoder and judge named, judged images (`<set>/t2i_*`) and, for in-context edit items, `<set>/edit_*`.
"""
from __future__ import annotations

from typing import Any

import torch

from emu_lightning.data.layout.chat import ChatTemplate, chat_template, conversation_turns
from emu_lightning.data.layout.fewshot import first_answer
from emu_lightning.systems.stage2 import Stage2System

_FROM_STAGE2 = {"encoder": "encoder", "adapter": "adapter", "llm": "llm", "regression_head": "regression_head"}


def chat_prompt(sample: dict, template: ChatTemplate) -> list[tuple[str, Any]]:
    """A conversation without its last answer → the prompt segments that ask for it."""
    turns = conversation_turns(sample)
    if turns[-1][0] == "assistant":
        turns = turns[:-1]
    return template.segments(turns, prompt=True)


def gen_prompt(segments: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """A gen document's segments without the image it asks for (its last segment)."""
    if not segments or segments[-1][0] != "image":
        raise ValueError("a gen document must end with the image it describes")
    return list(segments[:-1])


class ChatSystem(Stage2System):
    """Chat tuning. Arguments of `Stage2System`, plus:

    Args:
        template: the chat template: a preset (`emu1`, `emu2_chat`, `plain`) or a dict of `ChatTemplate` fields.
            The CLI copies it into the datamodule, which renders the training conversations with it.
        text_weight, regression_weight: 1 and 0: answer-only cross-entropy (Emu2-Chat, docs/design.md §2).
    """

    def __init__(self, *args: Any, template: str | dict = "emu2_chat", text_weight: float = 1.0,
                 regression_weight: float = 0.0, handoff: dict[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, text_weight=text_weight, regression_weight=regression_weight,
                         handoff=handoff or dict(_FROM_STAGE2), **kwargs)
        self.template = chat_template(template)

    @torch.no_grad()
    def answer(self, samples: list[dict], max_new_tokens: int | None = None, num_beams: int | None = None) -> list[str]:
        """Each conversation's next answer (prepared samples: images as normalised tensors)."""
        prompts = [chat_prompt(s, self.template) for s in samples]
        return self.generate_text(prompts, max_new_tokens or self.answer_max_new_tokens, num_beams or self.num_beams)

    def _evaluate(self, batch: dict, batch_idx: int, name: str) -> None:
        if batch["layout"] != "chat":
            return super()._evaluate(batch, batch_idx, name)
        samples = batch["samples"]
        self._eval_losses(batch, name)
        preds = self.answer(samples)
        # answer_acc: VQA accuracy under the lenient rules; the chat's answers are written freely ("the first", whole
        # captions), and the official rules never normalise unanimous human answers (emu_lightning/metrics/vqa.py).
        self.metrics.metric(name, "answer_acc").update(
            [first_answer(p) for p in preds], [s["answers"] for s in samples])
        kept = self.eval_samples.setdefault(name, [])
        for s, p in zip(samples, preds):
            image = (s.get("images") or s.get("video") or [None])[0]
            if len(kept) < 8 and image is not None:      # the sample log shows conversations with a picture
                kept.append((image, p, s["answers"][0]))

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """`main.py predict`: each test conversation's next answer, written by `CaptionWriter` as JSON lines."""
        samples = batch["samples"]
        rows = []
        for s, p in zip(samples, self.answer(samples)):
            asked = [t["value"] for t in s["conversations"] if t["from"] in ("human", "user")][-1]
            rows.append({"id": s["id"], "question": asked, "answer": first_answer(p), "generated": p,
                         "references": s.get("answers", [])})
        return rows


class GenSystem(Stage2System):
    """Generation tuning. Arguments of `Stage2System`, with text_weight 0 and regression_weight 1 (Emu2-Gen: the
    image loss only, on the last image; docs/design.md §2), plus:

    Args:
        self_feedback: probability that a regressed `<image>` input row is replaced, in training, by the model's
            own one-step prediction (through `feedback`, as generation feeds it back) from a first, gradient-free
            teacher-forced pass: scheduled sampling against the exposure bias of generating N embeddings one by
            one. 0 = the papers' pure teacher forcing. Costs one extra forward pass per step.
    """

    def __init__(self, *args: Any, text_weight: float = 0.0, regression_weight: float = 1.0,
                 handoff: dict[str, str] | None = None, self_feedback: float = 0.0, **kwargs: Any):
        super().__init__(*args, text_weight=text_weight, regression_weight=regression_weight,
                         handoff=handoff or dict(_FROM_STAGE2), **kwargs)
        if not 0.0 <= self_feedback <= 1.0:
            raise ValueError(f"self_feedback={self_feedback}; expected a probability in [0, 1]")
        if self_feedback > 0 and not self.regression_head.feeds_back:
            raise ValueError(f"self_feedback={self_feedback} needs a head that feeds its predictions back; "
                             f"{type(self.regression_head).__name__} feeds nothing back (set self_feedback: 0)")
        self.self_feedback = self_feedback

    def _forward(self, batch: dict, own: tuple | None = None) -> tuple[dict, tuple]:
        if own is None and self.training and self.self_feedback > 0:
            with torch.no_grad():
                pred = super()._forward(batch)[1][3]                                    # (P,D_tgt) one-step
            own = (pred, torch.rand(len(pred), device=pred.device) < self.self_feedback)
        return super()._forward(batch, own)

    def _evaluate(self, batch: dict, batch_idx: int, name: str) -> None:
        if batch["layout"] != "gen":
            return super()._evaluate(batch, batch_idx, name)
        samples = batch["samples"]
        self._eval_losses(batch, name)
        layout = self.trainer.datamodule.layout("gen", train=False)
        # With eval_decoder + eval_judge this also judges the images, reference-image (in-context) items included;
        # edit items are judged as edits of their source scene too (`<set>/edit_*`).
        sources = [s.get("source_scene") if s.get("kind") == "edit" else None for s in samples]
        source_pixels = torch.stack([s["references"][0] for s in samples]) if all(sources) else None
        self._gen_metric(name, [gen_prompt(layout(s)) for s in samples], torch.stack([s["image"] for s in samples]),
                         [s.get("scene") for s in samples], sources, source_pixels)
