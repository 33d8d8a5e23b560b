"""ℓ2 regression of the next visual embedding (EMU_SPEC §2): targets are detached, MSE over positions × dims."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def regression_loss(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """MSE between predicted and target visual embeddings, plus their cosine (a reading, not a loss term).

    Args:
        pred: (P,D_tgt) regression-head outputs at the predicting positions.
        target: (P,D_tgt) the embeddings those positions must predict; detached here whatever the caller passed.

    Returns:
        `{"regression_loss": (), "regression_cos": ()}`; with P = 0 the loss is a graph-connected 0.
    """
    if pred.shape != target.shape:
        raise ValueError(f"regression pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    target = target.detach()
    if pred.shape[0] == 0:
        zero = pred.sum() * 0.0
        return {"regression_loss": zero, "regression_cos": zero.detach()}
    per_position = (pred.float() - target.float()).pow(2).mean(-1)          # (P,)
    cos = F.cosine_similarity(pred.detach().float(), target.float(), dim=-1)  # (P,)
    return {"regression_loss": per_position.mean(), "regression_cos": cos.mean()}
