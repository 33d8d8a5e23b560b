"""Shifted next-token cross-entropy (docs/design.md §2): position t predicts token t+1; label -100 = no loss."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def token_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """(B,T,V) logits, (B,T) labels → (B,T-1) CE of each next-token prediction; 0 where the label is -100."""
    pred = logits[:, :-1].float()                 # (B,T-1,V): position t predicts token t+1
    return F.cross_entropy(pred.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")


def text_loss(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Mean CE over the target tokens of a batch.

    Args:
        logits: (B,T,V) scores at every position.
        labels: (B,T) token ids; -100 where no loss is taken (prompt, image block, padding).

    Returns:
        `{"text_loss": ()}`.
    """
    pred = logits[:, :-1].flatten(0, 1).float()   # (B*(T-1),V): positions 0..T-2 predict 1..T-1
    target = labels[:, 1:].flatten()              # (B*(T-1),)
    if not (target != -100).any():
        raise ValueError("batch has no target tokens: every label is -100")
    return {"text_loss": F.cross_entropy(pred, target, ignore_index=-100)}
