"""In-batch retrieval accuracy of a contrastive model (CLIP's zero-shot retrieval, Radford et al. 2021, at batch
scale) as a torchmetrics ``Metric``: image→text is right when an image's best-scoring caption in the batch is its
own, text→image likewise. Chance is 1 / batch size; two scenes with the same caption count as a miss.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class RetrievalAccuracy(Metric):
    """Fractions of images and of captions whose best match in their batch is their pair, over ``update(logits)``.

    Args:
        **kwargs: Forwarded to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("i2t", "t2i", "count"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor) -> None:
        """(B,B) image→text logits, the pairs on the diagonal."""
        if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
            raise ValueError(f"RetrievalAccuracy needs square (B,B) logits, got {tuple(logits.shape)}")
        target = torch.arange(len(logits), device=logits.device)
        self.i2t += (logits.argmax(1) == target).sum()
        self.t2i += (logits.argmax(0) == target).sum()
        self.count += len(logits)

    def compute(self) -> dict[str, Tensor]:
        return {"i2t": self.i2t.float() / self.count, "t2i": self.t2i.float() / self.count}
