"""A trained system behind the papers' evaluation prompts (`data/layout/fewshot.py`), for every protocol here.

Which prompt a model gets depends on what it is (docs/evaluation.md):
- a stage-1 captioner (`Stage1System`): `<s>[IMG]<image>×N[/IMG]` and its caption, zero-shot captioning only;
- a pretrained stage-2 model (`Stage2System`): the few-shot prompts, Emu's `{img}{caption}…{img}` for captions and
  Emu2's `{img} based on the picture, {q} short answer: {a}. …` for VQA, with k = 0, 2, 4, 8, …;
- a chat-tuned model (`ChatSystem`): Emu-I's instruction in its own chat template, zero-shot.

Generated text is cut the way the papers' evaluation reads it: a caption at its first line break, an answer at its
first period or line break (`first_answer`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from emu_lightning.data.layout.fewshot import few_shot_segments, first_answer, instruct_segments, rices_demos
from emu_lightning.data.modules.captions import image_transform

KINDS = ("captioner", "base", "chat")


def model_kind(system: Any) -> str:
    """"captioner", "base" or "chat" (module docstring)."""
    from emu_lightning.systems.instruct import ChatSystem
    from emu_lightning.systems.stage1 import Stage1System
    from emu_lightning.systems.stage2 import Stage2System

    if isinstance(system, ChatSystem):
        return "chat"
    if isinstance(system, Stage2System):
        return "base"
    if isinstance(system, Stage1System):
        return "captioner"
    raise ValueError(f"{type(system).__name__} is neither a stage-1, a stage-2 nor a chat-tuned model: it cannot "
                     f"caption or answer (a visual decoder run goes to --decoder)")


class PromptedModel:
    """Batched generation with the papers' prompts.

    Args:
        system: a loaded system in eval mode (`emu_lightning.inference.infer.load_model`).
        num_beams: beams of the beam search (the papers: 5).
        max_new_tokens: the longest generation.
    """

    def __init__(self, system: Any, num_beams: int = 5, max_new_tokens: int = 20) -> None:
        self.system, self.kind = system.eval(), model_kind(system)
        self.num_beams, self.max_new_tokens = num_beams, max_new_tokens
        self.transform = image_transform(system.encoder.img_size)

    def pixels(self, image: Image.Image | Tensor) -> Tensor:
        """A PIL image → the (3,S,S) CLIP-normalised input of the model's encoder (a tensor passes through)."""
        return image if isinstance(image, Tensor) else self.transform(image)

    def check(self, task: str, shots: int) -> None:
        """Raises when this model has no prompt for `task` at `shots` demonstrations."""
        if self.kind == "captioner" and task != "caption":
            raise ValueError(f"a stage-1 captioner cannot answer questions ({task}): give a stage-2 or chat-tuned "
                             f"model")
        if self.kind != "base" and shots > 0:
            raise ValueError(f"{shots}-shot prompts need a pretrained stage-2 model; a {self.kind} model is "
                             f"evaluated zero-shot (--shots 0)")

    def _prepared(self, sample: dict) -> dict:
        return {**sample, "image": self.pixels(sample["image"])}

    @torch.no_grad()
    def generate(self, task: str, queries: Sequence[dict], demos: Sequence[Sequence[dict]] | None = None) -> list[str]:
        """One text per query (`{"image", "question"?}`), after its demonstrations (`{"image", "captions"}` or
        `{"image", "question", "answers"}`), cut as the module docstring says."""
        demos = demos if demos is not None else [[] for _ in queries]
        self.check(task, max((len(d) for d in demos), default=0))
        queries = [self._prepared(q) for q in queries]
        s = self.system
        if self.kind == "captioner":
            from emu_lightning.data.layout.collate import image_block

            ids = [s.ids.bos, *image_block(s.ids, s.num_image_tokens)]
            s.max_new_tokens = self.max_new_tokens     # Stage1System.caption reads its own attribute
            pixels = torch.stack([q["image"] for q in queries]).to(s.device)
            texts = s.caption(pixels, torch.tensor([ids] * len(queries), device=s.device), self.num_beams)
        else:
            if self.kind == "chat":
                prompts = [instruct_segments(task, q, s.template) for q in queries]
            else:
                prompts = [few_shot_segments(task, [self._prepared(d) for d in ds], q) for ds, q in zip(demos, queries)]
            texts = s.generate_text(prompts, self.max_new_tokens, self.num_beams)
        if task == "caption":
            return [t.split("\n")[0].strip() for t in texts]
        return [first_answer(t) for t in texts]

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image | Tensor]) -> Tensor:
        """(B,D_enc) frozen-encoder features, the token mean: what RICES compares (docs/design.md §6)."""
        x = torch.stack([self.pixels(im) for im in images]).to(self.system.device)     # (B,3,S,S)
        return self.system.encoder(x).mean(dim=1)                                     # (B,L,D_enc) → (B,D_enc)

    def rices(self, queries: Sequence[dict], pool_features: Tensor, k: int) -> list[list[int]]:
        """Per query, the k pool indices most similar by encoder cosine, the most similar last (next to the query)."""
        return rices_demos(self.features([q["image"] for q in queries]), pool_features.to(self.system.device),
                           k).tolist()
