"""Symmetric InfoNCE over a batch of image / text embeddings (CLIP, Radford et al. 2021, §2.3; EVA-CLIP, Sun et
al. 2023): both sets L2-normalised, logits = exp(logit_scale) · cosine, cross-entropy in both directions with the
matching pair on the diagonal. The learnable `logit_scale` (log of 1/τ) is clamped at log 100, as CLIP does.

Contract: (B,E) image embeddings, (B+K,E) text embeddings, () logit_scale -> (B,B+K) image→text logits (the K extra
captions are hard negatives with no image of their own, NegCLIP-style) -> {"contrastive_loss": ()}.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_LOGIT_SCALE = math.log(100.0)


def contrastive_logits(image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """(B,E), (B+K,E), () -> (B,B+K) image→text logits: row i is image i against every caption, its own at i."""
    if image.shape[1] != text.shape[1] or len(text) < len(image):
        raise ValueError(f"image embeddings {tuple(image.shape)} and text embeddings {tuple(text.shape)}: need the "
                         f"same width and a caption per image (extra captions are negatives)")
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    return scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T


def info_nce(logits: Tensor) -> dict[str, Tensor]:
    """(B,B+K) image→text logits -> the mean of the image→text (over all B+K captions) and text→image (the B true
    captions over the B images) cross-entropies."""
    B = len(logits)
    target = torch.arange(B, device=logits.device)
    return {"contrastive_loss": (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :B].T, target)) / 2}
