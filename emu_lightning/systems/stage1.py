"""Stage 1, image captioning (docs/design.md §3): image → encoder → adapter → LLM, cross-entropy on the caption.

Validation and test decode captions from `<s>[IMG]<image>×N[/IMG]` (greedy and beam search) and score them
with CIDEr-D per evaluation set; on synthetic scenes also with attribute accuracy (is each shape's color,
shape, size and position named right), the figure that templated captions cannot fake.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from components.losses.text import text_loss
from emu_lightning.metrics.registry import MetricStore
from emu_lightning.systems.base import EmuSystem


class Stage1System(EmuSystem):
    """Captioning stage. Arguments of `EmuSystem`, plus:

    Args:
        max_new_tokens: longest generated caption.
        num_beams: beam width of the beam-search decode at evaluation; 1 skips it (greedy only).
        num_samples: images per evaluation set kept in `eval_samples` for the sample-log callback.
        init_from: checkpoint to start from (Lightning `.ckpt` or state dict); None = fresh weights. Typically a
            stage-0 contrastive run (`ContrastiveSystem`, docs/encoder_pretraining.md).
        handoff: target part → source prefix in `init_from`; the default takes the encoder only, the parts not
            named (adapter, LLM) stay fresh.
    """

    def __init__(self, *args: Any, max_new_tokens: int = 32, num_beams: int = 3, num_samples: int = 8,
                 init_from: str | None = None, handoff: dict[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.init_from, self.handoff = init_from, handoff or {"encoder": "encoder"}
        self.max_new_tokens, self.num_beams, self.num_samples = max_new_tokens, num_beams, num_samples
        self.metrics = MetricStore(self)          # (set, metric, decode) → metric, made on first use
        self.eval_samples: dict[str, list] = {}   # set → [(image, caption, reference)]
        self.counters = {"truncated": 0}           # captions cut at max_length so far (checkpointed)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None,
                visual: Tensor | None = None) -> Tensor:
        """(B,T) ids, (B,T) mask, (B,3,H,W) images or their (B,N,D_llm) embeddings → (B,T,V) logits."""
        visual = self.encode_images(pixel_values) if visual is None else visual
        hidden, _ = self.llm(self.embed_multimodal(input_ids, visual), attention_mask)
        return self.llm.logits(hidden)

    def loss_terms(self, batch: dict) -> dict[str, Tensor]:
        """The training loss and its named terms (caption CE)."""
        losses = text_loss(self(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]), batch["labels"])
        losses["loss"] = losses["text_loss"]
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self.loss_terms(batch)
        self.counters["truncated"] += int(batch["num_truncated"])
        self.log("train/truncated_total", float(self.counters["truncated"]))
        self.count_skips(batch.get("skipped") or {}, len(batch["ids"]))
        loss = self.checked_loss(losses)
        if loss is not None:
            self.log_losses(losses, "train", len(batch["ids"]))
        return loss

    @torch.no_grad()
    def caption(self, pixel_values: Tensor | None, prompt_ids: Tensor, num_beams: int = 1,
                visual: Tensor | None = None) -> list[str]:
        """Decode one caption per image (or per precomputed (B,N,D_llm) embedding) from `<s>[IMG]<image>×N[/IMG]`."""
        visual = self.encode_images(pixel_values) if visual is None else visual
        embeds = self.embed_multimodal(prompt_ids, visual)
        mask = torch.ones(prompt_ids.shape, dtype=torch.long, device=prompt_ids.device)
        out = self.llm.generate(embeds, mask, max_new_tokens=self.max_new_tokens, num_beams=num_beams,
                                eos_token_id=self.ids.eos, pad_token_id=self.ids.pad)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _evaluate(self, batch: dict, batch_idx: int, name: str) -> None:
        B = len(batch["ids"])
        visual = self.encode_images(batch["pixel_values"])  # (B,N,D_llm), shared by the loss and every decode
        losses = text_loss(self(batch["input_ids"], batch["attention_mask"], visual=visual), batch["labels"])
        self.log_losses(losses, name, B)
        decodes = {"greedy": 1} | ({"beam": self.num_beams} if self.num_beams > 1 else {})
        for decode, beams in decodes.items():
            preds = self.caption(None, batch["prompt_ids"], beams, visual=visual)
            # <set>/cider_<decode>; on scenes <set>/<attribute>_acc_<decode> (metrics/registry.py)
            self.metrics.metric(name, "cider", decode).update(preds, batch["captions"])
            if "scenes" in batch:
                self.metrics.metric(name, "attributes", decode).update(preds, batch["scenes"])
            if decode == "greedy":
                kept = self.eval_samples.setdefault(name, [])
                for i in range(min(B, self.num_samples - len(kept))):
                    kept.append((batch["pixel_values"][i].cpu(), preds[i], batch["captions"][i][0]))

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        preds = self.caption(batch["pixel_values"], batch["prompt_ids"], self.num_beams)
        return [{"id": i, "caption": p} for i, p in zip(batch["ids"], preds)]
