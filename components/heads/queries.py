"""Learnable generation queries (SEED-X, Ge et al. 2024; DreamLLM, Dong et al. 2024; MetaQuery, Pan et al. 2025):
the `<image>` rows of an image to generate read N learned query embeddings instead of the image, and the
hidden state at query k regresses target k. All N come from one forward pass and nothing is fed back, so a
prediction error cannot move the next prediction off the data.

Consequence for the sequence: a regressed image is *replaced* by its queries, so text after it sees the
queries' outputs, not the image; the system therefore reads (does not regress) an image that opens a document,
where nothing conditions it (docs/generation_heads.md).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from components.base import CausalLM
from components.heads.base import ProjectionHead


class QueryHead(ProjectionHead):
    """N learnable queries after `[IMG]`, read out in one pass.

    Args:
        in_dim, out_dim, whiten, flow: see `ProjectionHead`.
        num_tokens: N, the number of queries; must equal the adapter's tokens per image.
        init_std: standard deviation of the queries' initialisation.
    """

    feeds_back = False

    def __init__(self, in_dim: int = 256, out_dim: int = 256, num_tokens: int = 16, whiten: bool = False,
                 init_std: float = 0.02, flow: dict[str, Any] | None = None) -> None:
        super().__init__(in_dim, out_dim, whiten, flow)
        self.num_tokens = num_tokens
        self.queries = nn.Parameter(torch.randn(num_tokens, in_dim) * init_std)   # (N,D_llm)

    def predicting(self, rows: Tensor) -> Tensor:
        """Query k's own hidden state regresses target k: the positions are the rows themselves."""
        return rows

    def read_inputs(self, embeds: Tensor, rows: Tensor, training: bool) -> Tensor:
        """Every regressed image's N rows read the N queries (train and eval alike)."""
        n = int(rows.sum())
        if n % self.num_tokens:
            raise ValueError(f"{n} regressed <image> rows are not whole images of num_tokens={self.num_tokens}")
        source = self.queries.to(embeds.dtype).repeat(n // self.num_tokens, 1)         # (n,D_llm)
        return embeds.masked_scatter(rows.unsqueeze(-1), source)

    def generate(self, llm: CausalLM, feedback: Any, embeds: Tensor, mask: Tensor, num_tokens: int,
                 use_cache: bool = True) -> Tensor:
        """Prompt (B,T,D_llm) ending in `[IMG]` + the N queries → (B,N,D_tgt) from one forward pass."""
        if num_tokens != self.num_tokens:
            raise ValueError(f"asked for {num_tokens} embeddings but the head has {self.num_tokens} queries")
        B = len(embeds)
        queries = self.queries.to(embeds.dtype).expand(B, -1, -1)                       # (B,N,D_llm)
        hidden, _ = llm(torch.cat([embeds, queries], 1), torch.cat([mask, mask.new_ones(B, num_tokens)], 1))
        return self(hidden[:, -num_tokens:])
