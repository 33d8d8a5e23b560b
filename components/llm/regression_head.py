"""Regression head: LLM hidden state -> visual embedding space (spec §1, §8).

Emu1 `stu_regress_head` Linear(5120→5120) and Emu2 `project_down` Linear(6656→1792), both without bias,
applied to the last hidden state after the final RMSNorm. Contract: (B,T,D_llm) -> (B,T,D_vis).
"""
from __future__ import annotations

from torch import Tensor, nn


class RegressionHead(nn.Module):
    """Bias-free linear map from the LLM width to the regression target width.

    Args:
        in_dim: LLM width D_llm.
        out_dim: Target width (Emu1: D_llm, the C-Former output space; Emu2: D_enc, pooled EVA space).
    """

    def __init__(self, in_dim: int = 256, out_dim: int = 256) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B,T,D_llm) -> (B,T,out_dim)."""
        return self.proj(hidden)
