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

    def prompt(self, task: str, query: dict, demos: Sequence[dict] = ()) -> list[tuple[str, Any]]:
        """The segments of one query's prompt after its demonstrations (the table of the module docstring)."""
        if self.kind == "captioner":
            return [("image", query["image"])]
        if self.kind == "chat":
            return instruct_segments(task, query, self.system.template)
        return few_shot_segments(task, list(demos), query)

    @staticmethod
    def cut(task: str, text: str) -> str:
        """A generated text cut as the papers read it: a caption at its first line break, an answer at its first
        period or line break."""
        return text.split("\n")[0].strip() if task == "caption" else first_answer(text)

    @torch.no_grad()
    def generate(self, task: str, queries: Sequence[dict], demos: Sequence[Sequence[dict]] | None = None) -> list[str]:
        """One text per query (`{"image", "question"?}`), after its demonstrations (`{"image", "captions"}` or
        `{"image", "question", "answers"}`), cut as the module docstring says."""
        demos = demos if demos is not None else [[] for _ in queries]
        self.check(task, max((len(d) for d in demos), default=0))
        texts = self.complete([self.prompt(task, q, ds) for ds, q in zip(demos, queries)])
        return [self.cut(task, t) for t in texts]

    def _segments(self, prompt: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        return [(k, self.pixels(v)) if k == "image" else (k, v) for k, v in prompt]

    @torch.no_grad()
    def complete(self, prompts: Sequence[Sequence[tuple[str, Any]]], max_new_tokens: int | None = None,
                 num_beams: int | None = None) -> list[str]:
        """The uncut continuation of each prompt, given as segments (`("image", PIL image | tensor)`,
        `("text" | "prompt", str)`; `prompt`'s output or any other). A captioner's only prompt is its image
        (`<s>[IMG]<image>×N[/IMG]`): each of its prompts must be exactly one image."""
        s = self.system
        max_new_tokens, num_beams = max_new_tokens or self.max_new_tokens, num_beams or self.num_beams
        prompts = [self._segments(p) for p in prompts]
        if self.kind != "captioner":
            return s.generate_text(prompts, max_new_tokens, num_beams)
        from emu_lightning.data.layout.collate import image_block

        if any(len(p) != 1 or p[0][0] != "image" for p in prompts):
            raise ValueError("a stage-1 captioner's only prompt is one image (<s>[IMG]<image>×N[/IMG]); got "
                             + str(next([k for k, _ in p] for p in prompts if len(p) != 1 or p[0][0] != "image")))
        ids = [s.ids.bos, *image_block(s.ids, s.num_image_tokens)]
        pixels = torch.stack([p[0][1] for p in prompts]).to(s.device)
        # Stage1System.caption reads its own attribute; restored after, as a system in training keeps its value.
        saved, s.max_new_tokens = s.max_new_tokens, max_new_tokens
        try:
            return s.caption(pixels, torch.tensor([ids] * len(prompts), device=s.device), num_beams)
        finally:
            s.max_new_tokens = saved

    @torch.no_grad()
    def score(self, prompts: Sequence[Sequence[tuple[str, Any]]], continuations: Sequence[str]
              ) -> list[tuple[float, bool]]:
        """Per prompt, log p(continuation | prompt) summed over the continuation's tokens, and whether greedy
        decoding gives exactly those tokens (lm-evaluation-harness's `loglikelihood`, docs/evaluation.md).

        The prompt's last text and the continuation are tokenized as one string, the continuation's tokens being
        those that overlap its characters: the way a chat answer is masked in training
        (`SequenceCollator._encode_run`), so the split does not depend on the tokenizer. The prompt reads as in
        `complete` (a captioner's: its image alone), the continuation follows it directly.
        """
        from emu_lightning.data.layout.collate import IGNORE
        from emu_lightning.data.layout.sequence import SequenceCollator, pad

        s = self.system
        collate = s.collator() if hasattr(s, "collator") else SequenceCollator(s.tokenizer, s.num_image_tokens)
        seqs, targets, images = [], [], []
        for prompt, continuation in zip(prompts, continuations, strict=True):
            if not continuation:
                raise ValueError("an empty continuation has no tokens to score")
            segs = [("prompt", v) if k == "text" else (k, v) for k, v in self._segments(prompt)]
            ids, labels, ims, _ = collate.encode([*segs, ("answer", continuation)], close=False, limit=10**9)
            seqs.append(ids)
            targets.append(labels)
            images += ims
        ids, mask = pad(seqs, s.ids.pad)                                                  # (B,T) right-padded
        labels = pad(targets, IGNORE)[0].to(s.device)                                     # (B,T)
        ids, mask = ids.to(s.device), mask.to(s.device)
        visual = (s.encode_images(torch.stack(images).to(s.device)) if images
                  else torch.zeros(0, s.num_image_tokens, s.llm.hidden_dim, device=s.device))
        hidden, _ = s.llm(s.embed_multimodal(ids, visual), mask)                          # (B,T,D_llm)
        scored = labels[:, 1:] != IGNORE                                                  # (B,T-1): t predicts t+1
        if int(scored.any(-1).sum()) != len(seqs):
            raise ValueError(f"continuation {continuations[int((~scored.any(-1)).nonzero()[0])]!r} gave no token")
        logp = s.llm.logits(hidden[:, :-1][scored]).float().log_softmax(-1)               # (K,V)
        wanted = labels[:, 1:][scored]                                                    # (K,)
        token_lp = logp.gather(-1, wanted[:, None])[:, 0]                                 # (K,)
        hit = logp.argmax(-1) == wanted                                                   # (K,)
        row = scored.nonzero()[:, 0]                                                      # (K,) sequence of each
        total = torch.zeros(len(seqs), device=s.device).index_add_(0, row, token_lp)         # (B,)
        misses = torch.zeros(len(seqs), device=s.device).index_add_(0, row, (~hit).float())  # (B,)
        return [(float(t), m == 0) for t, m in zip(total.tolist(), misses.tolist())]

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image | Tensor]) -> Tensor:
        """(B,D_enc) frozen-encoder features, the token mean: what RICES compares (docs/design.md §6)."""
        x = torch.stack([self.pixels(im) for im in images]).to(self.system.device)     # (B,3,S,S)
        return self.system.encoder(x).mean(dim=1)                                     # (B,L,D_enc) → (B,D_enc)

    def rices(self, queries: Sequence[dict], pool_features: Tensor, k: int) -> list[list[int]]:
        """Per query, the k pool indices most similar by encoder cosine, the most similar last (next to the query)."""
        return rices_demos(self.features([q["image"] for q in queries]), pool_features.to(self.system.device),
                           k).tolist()
