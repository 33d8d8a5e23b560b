"""Regression of visual embeddings (docs/design.md §2; docs/generation_heads.md): targets are detached.

Objectives: `mse` (the papers' ℓ2, mean over positions × dims), `cosine` (1 − cosine per position, SEED-X's
choice: direction only), `mse+cosine` (their sum).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

OBJECTIVES = ("mse", "cosine", "mse+cosine")


def regression_loss(pred: Tensor, target: Tensor, objective: str = "mse") -> dict[str, Tensor]:
    """The regression loss of predicted against target visual embeddings, plus readings of both kinds.

    Args:
        pred: (P,D_tgt) regression-head outputs at the predicting positions.
        target: (P,D_tgt) the embeddings those positions must predict; detached here whatever the caller passed.
        objective: one of `OBJECTIVES`.

    Returns:
        `{"regression_loss", "regression_mse", "regression_cos"}` (scalars); the loss is the objective, the other
        two are readings (detached). With P = 0 the loss is a graph-connected 0 and there are no readings (a 0
        cosine would read as a failure where nothing was measured).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"regression objective {objective!r}; expected one of {OBJECTIVES}")
    if pred.shape != target.shape:
        raise ValueError(f"regression pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    target = target.detach()
    if pred.shape[0] == 0:
        return {"regression_loss": pred.sum() * 0.0}
    mse = (pred.float() - target.float()).pow(2).mean(-1).mean()                 # mean over P × D
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()       # mean over P
    loss = {"mse": mse, "cosine": 1 - cos, "mse+cosine": mse + 1 - cos}[objective]
    return {"regression_loss": loss, "regression_mse": mse.detach(), "regression_cos": cos.detach()}
