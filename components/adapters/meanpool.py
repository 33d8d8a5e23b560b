"""Emu2 visual adapter: mean-pool the square patch grid, then `project_up` into the LLM width.

Follows the Emu2 paper and release (docs/design.md §1, §8): EVA-02 tokens with CLS dropped form a
(side×side) row-major grid; average pooling to grid×grid (8×8 = 64 tokens for Emu2, 16×16 for Chat)
is followed by a bias-free Linear(D_enc → D_llm).

Contract: (B,L,D_enc), L = side² with no CLS -> (B,grid²,D_llm).
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class MeanPoolProjector(nn.Module):
    """Average-pool patch tokens to a grid×grid map and project each pooled token.

    Args:
        in_dim: Encoder width D_enc.
        out_dim: LLM width D_llm.
        grid: Output tokens per side; N = grid².
        bias: Give `project_up` a bias (Emu2 has none).
        adaptive: Allow a grid that does not tile the patch grid (overlapping, uneven windows, as
            `adaptive_avg_pool2d` makes them). Off by default: Emu2 pools with kernel = stride = side / grid, and a
            grid that does not divide the side is an error naming both sizes.
    """

    def __init__(self, in_dim: int = 192, out_dim: int = 256, grid: int = 8, bias: bool = False,
                 adaptive: bool = False) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.grid, self.adaptive = grid, adaptive
        self.num_tokens = grid * grid
        self.project_up = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, feats: Tensor) -> Tensor:
        """(B,L,D_enc) -> (B,grid²,D_llm)."""
        return self.project_up(self.pool(feats))

    def pool(self, feats: Tensor) -> Tensor:
        """(B,L,D_enc) -> (B,grid²,D_enc): the pooled EVA tokens, Emu2's regression targets (docs/design.md §2)."""
        B, L, D = feats.shape
        side = math.isqrt(L)
        if side * side != L:
            raise ValueError(f"MeanPoolProjector needs a square patch grid with the CLS dropped; got L={L} tokens")
        if side < self.grid:
            raise ValueError(f"MeanPoolProjector cannot pool a {side}×{side} grid (L={L}) "
                             f"up to {self.grid}×{self.grid}")
        if side % self.grid and not self.adaptive:
            raise ValueError(f"MeanPoolProjector(grid={self.grid}) does not tile the {side}×{side} patch grid "
                             f"(L={L}): use a grid that divides {side}, or adaptive: true for uneven windows")
        # Emu2: k = s = side / grid; with `adaptive`, uneven (overlapping) windows where the grid does not divide.
        x = feats.transpose(1, 2).reshape(B, D, side, side)    # (B,D_enc,s,s): row-major patch grid
        x = F.adaptive_avg_pool2d(x, self.grid)                 # (B,D_enc,g,g)
        return x.flatten(2).transpose(1, 2)                     # (B,g²,D_enc): row-major again
