"""Similarity of predicted to target visual embeddings as a torchmetrics ``Metric``.

Scores Emu's regression head (stage 2: the LLM predicts the next image's N visual embeddings).
Per token vector (along D) the cosine similarity, and per element the squared error, summed in
float64 over all ``update`` calls; ``compute`` gives the mean token cosine and the element-wise MSE,
the quantity the regression loss minimises. Sums are tensor states, so the metric syncs across ranks.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric


class EmbeddingSimilarity(Metric):
    """Mean token cosine similarity and mean squared error of predicted embeddings.

    A zero vector has cosine 0 with anything (``F.cosine_similarity`` clamps the norms at 1e-8).

    Args:
        **kwargs: Forwarded to ``torchmetrics.Metric`` (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    higher_is_better = None  # cos: higher is better, mse: lower is better
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # float64: sums over millions of tokens / elements should not drift.
        for name in ("cos_sum", "sq_err_sum", "tokens", "elements"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Accumulate one batch.

        Args:
            pred: (n,N,D) predicted embeddings; any (..., D) works, the last dim is the vector.
            target: same shape as ``pred``.
        """
        if pred.shape != target.shape or pred.ndim < 2:
            raise ValueError(
                f"EmbeddingSimilarity: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                "must have the same (n,N,D) shape"
            )
        pred, target = pred.detach().double(), target.detach().double()
        cos = F.cosine_similarity(pred, target, dim=-1)  # (n,N): one value per token vector
        self.cos_sum += cos.sum()
        self.sq_err_sum += (pred - target).pow(2).sum()
        self.tokens += cos.numel()
        self.elements += pred.numel()

    def compute(self) -> dict[str, Tensor]:
        """``{"cos": mean token cosine, "mse": mean squared error over all elements}`` (float64)."""
        if self.tokens == 0:
            raise ValueError("EmbeddingSimilarity has no samples: call update() with tokens before compute()")
        return {"cos": self.cos_sum / self.tokens, "mse": self.sq_err_sum / self.elements}
