"""Stage 0, contrastive encoder pretraining (docs/encoder_pretraining.md): the EVA encoder learns from image-text
pairs before stage 1, as Emu / Emu2's EVA-CLIP encoders did (CLIP, Radford et al. 2021; EVA-CLIP, Sun et al. 2023).

Each image's encoder tokens are mean-pooled and projected (`PooledImageHead`, no adapter), each caption runs through
a small `TextTower`, and a symmetric InfoNCE with a learnable temperature pulls the B matching pairs together against
the B² - B others of the batch. Validation logs the loss and in-batch image→text / text→image retrieval accuracy
(`<set>/i2t_acc`, `<set>/t2i_acc`) and, on synthetic scenes, how often an image ranks its caption above the caption
of its shape-swapped twin (`<set>/shape_swap_acc`, chance 0.5). With `shape_negatives` those twins' captions also
train, as hard negatives (NegCLIP, Yuksekgonul et al. 2023; `data/synthetic/negatives.py`). Stage 1 then starts
from the encoder only: `init_from: <stage-0 ckpt>` with its default hand-off `{encoder: encoder}` (`Stage1System`).

Batches are the stage-1 caption batches (`CaptionDataModule`) with an empty image block (`num_image_tokens` 0): the
caption's tokens are those the collator marks as targets (`labels != -100`: the caption and its `</s>`).
"""
from __future__ import annotations

import random

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from components.base import VisualEncoder
from components.contrastive import PooledImageHead, TextTower, init_logit_scale
from components.losses.contrastive import contrastive_logits, info_nce
from emu_lightning.data.layout.collate import IGNORE
from emu_lightning.data.layout.tokenizer import load_tokenizer
from emu_lightning.data.layout.tokens import SpecialIds
from emu_lightning.data.synthetic.negatives import shape_negative_captions
from emu_lightning.metrics.registry import MetricStore
from emu_lightning.systems.base import PartsSystem, _adamw
from emu_lightning.systems.policy import StagePolicy


class _LogitScale(nn.Module):
    """The learnable log(1/τ), a part of its own so the policy gives it a learning rate (and no weight decay)."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.value = init_logit_scale(temperature)


class ContrastiveSystem(PartsSystem):
    """CLIP-style pretraining of a visual encoder on image-caption pairs.

    Args:
        encoder: visual encoder, (B,3,H,W) → (B,L,D_enc): the one stage 1 will start from.
        image_head: mean-pool + projection, (B,L,D_enc) → (B,E).
        text: text tower, (B,T) ids + mask → (B,E).
        tokenizer: local tokenizer path; None = the synthetic BPE (stage 1's).
        temperature: initial softmax temperature τ (CLIP: 0.07); log(1/τ) learns, clamped at log 100.
        shape_negatives: train with one hard negative caption per image, its scene with one shape changed (needs
            the batches' `scenes`: synthetic data only).
        policy, optimizer, warmup, min_lr_ratio, max_bad_steps, bad_step_window: see `PartsSystem`.
    """

    num_image_tokens = 0   # the caption batches carry no `<image>` run: the text tower reads captions only

    def __init__(self, encoder: VisualEncoder, image_head: PooledImageHead, text: TextTower,
                 tokenizer: str | None = None, temperature: float = 0.07, shape_negatives: bool = False,
                 policy: StagePolicy | None = None,
                 optimizer: OptimizerCallable = _adamw, warmup: float = 0.02, min_lr_ratio: float = 0.1,
                 max_bad_steps: int = 10, bad_step_window: int | None = 1000):
        parts = ["encoder", "image_head", "text", "logit_scale"]
        super().__init__(policy or StagePolicy(trainable=parts, lr=dict.fromkeys(parts, 5e-4), weight_decay=0.2),
                         optimizer, warmup, min_lr_ratio, max_bad_steps, bad_step_window)
        self.save_hyperparameters(ignore=["encoder", "image_head", "text", "optimizer"], logger=False)
        # Widths must chain encoder → image head, and both towers must meet in one space; checked before any data.
        if encoder.embed_dim != image_head.in_dim:
            raise ValueError(f"encoder width (encoder.embed_dim={encoder.embed_dim}) does not match the image head's "
                             f"input width (image_head.in_dim={image_head.in_dim})")
        if image_head.out_dim != text.out_dim:
            raise ValueError(f"image embedding width (image_head.out_dim={image_head.out_dim}) differs from the text "
                             f"embedding width (text.out_dim={text.out_dim})")
        self.encoder, self.image_head, self.text = encoder, image_head, text
        self.logit_scale = _LogitScale(temperature)
        self.shape_negatives = shape_negatives
        self.tokenizer = load_tokenizer(tokenizer)
        self.ids = SpecialIds.from_tokenizer(self.tokenizer)
        if len(self.tokenizer) > text.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but text.vocab_size={text.vocab_size}")
        self.metrics = MetricStore(self)
        self.policy.apply(self.parts)

    @property
    def parts(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "image_head": self.image_head, "text": self.text,
                "logit_scale": self.logit_scale}

    def embed_images(self, pixels: Tensor) -> Tensor:
        """(B,3,H,W) → (B,E) image embeddings (not normalised)."""
        return self.image_head(self.encoder(pixels))

    def embed_texts(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """(B,T) caption batch ids and labels → (B,E) text embeddings over the caption tokens (labels kept)."""
        return self.text(input_ids, labels != IGNORE)

    def negatives(self, scenes: list, seed: int) -> tuple[Tensor, Tensor]:
        """(B,T') ids and caption mask of each scene's shape-swapped caption, laid out as the collator lays out the
        true ones (`<s>[IMG][/IMG]caption</s>`): the same positions, so position cannot tell a negative apart."""
        prompt = [self.ids.bos, self.ids.img, self.ids.img_end]
        caps = self.tokenizer(shape_negative_captions(scenes, random.Random(seed)), add_special_tokens=False)
        seqs = [prompt + c + [self.ids.eos] for c in caps["input_ids"]]
        ids = torch.full((len(seqs), max(map(len, seqs))), self.ids.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)], mask[i, len(prompt): len(seq)] = torch.tensor(seq), 1
        return ids.to(self.device), mask.to(self.device)

    def forward(self, batch: dict, negatives: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """A caption batch (+ K negative captions' ids, mask) → (B,B+K) image→text logits, pairs on the diagonal."""
        text = self.embed_texts(batch["input_ids"], batch["labels"])        # (B,E)
        if negatives is not None:
            text = torch.cat([text, self.text(*negatives)])                  # (B+K,E)
        return contrastive_logits(self.embed_images(batch["pixel_values"]), text, self.logit_scale.value)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        # the negatives' draws follow the step (a resumed run draws the same ones)
        if self.shape_negatives and "scenes" not in batch:
            raise ValueError("shape_negatives needs scene records in the batches (synthetic captions); this data "
                             "has none: set model.init_args.shape_negatives false")
        negatives = self.negatives(batch["scenes"], self.global_step) if self.shape_negatives else None
        losses = info_nce(self(batch, negatives))
        losses["loss"] = losses["contrastive_loss"]
        self.count_skips(batch.get("skipped") or {}, len(batch["ids"]))
        loss = self.checked_loss(losses)
        if loss is not None:
            self.log_losses(losses, "train", len(batch["ids"]))
            self.log("train/temperature", 1 / self.logit_scale.value.detach().exp())
        return loss

    def _evaluate(self, batch: dict, batch_idx: int, name: str) -> None:
        scenes = batch.get("scenes")
        logits = self(batch, self.negatives(scenes, batch_idx) if scenes else None)
        B = len(logits)
        self.log_losses(info_nce(logits[:, :B]), name, B)                   # in-batch, as without negatives
        self.metrics.metric(name, "retrieval").update(logits[:, :B])       # <set>/i2t_acc, <set>/t2i_acc
        if scenes:   # own caption vs its shape-swapped twin's, per image
            wins = (logits.diagonal() > logits[:, B:].diagonal()).float().mean()
            self.log(f"{name}/shape_swap_acc", wins, batch_size=B, sync_dist=True, add_dataloader_idx=False)
