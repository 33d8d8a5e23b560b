"""LLaVA-1.5's projector: a 2-layer MLP applied to every encoder token, N = L (no pooling, no queries).

Liu et al., 2023, "Improved Baselines with Visual Instruction Tuning" (arXiv:2310.03744). It is the worked
example of docs/extending.md ("Add an adapter"): this file and `recipes/components/adapter_mlp_debug.yaml`
are all it takes to train it in stage 1 and in the adapter sweep.

Contract (components/base.py `Adapter`): (B,L,D_enc) -> (B,L,D_llm).
"""
from __future__ import annotations

from torch import Tensor, nn


class MLPProjector(nn.Module):
    """Linear(D_enc → D_llm) → GELU → Linear(D_llm → D_llm) on each encoder token.

    Args:
        in_dim: Encoder width D_enc.
        out_dim: LLM width D_llm.
        num_tokens: Encoder tokens per image L, which is also N (64 for the debug encoder: 8×8, CLS dropped).
    """

    def __init__(self, in_dim: int = 192, out_dim: int = 256, num_tokens: int = 64) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.num_tokens = in_dim, out_dim, num_tokens
        self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, feats: Tensor) -> Tensor:
        """(B,L,D_enc) -> (B,L,D_llm)."""
        if feats.shape[1] != self.num_tokens:
            raise ValueError(f"MLPProjector(num_tokens={self.num_tokens}) got {feats.shape[1]} encoder tokens per "
                             f"image: set num_tokens to the encoder's token count")
        return self.proj(feats)
