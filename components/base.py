"""Interfaces every component family implements; systems rely on these and nothing else.

Shapes: B batch, L encoder tokens (patches, +1 with CLS), N visual tokens per image, T sequence,
D_enc encoder width, D_llm LLM width, V vocabulary.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class VisualEncoder(Protocol):
    embed_dim: int              # D_enc
    num_tokens: int             # L: tokens per image this encoder emits (after drop_cls)
    block_cls: type[nn.Module]  # FSDP / activation-checkpointing unit

    def forward(self, pixels: Tensor) -> Tensor: ...    # (B,3,H,W) -> (B,L,D_enc)


@runtime_checkable
class Adapter(Protocol):
    """Encoder tokens -> the N visual embeddings the LLM reads. Everything systems use of an adapter is here:
    the two widths (checked against the encoder and the LLM at start-up) and N (linked into the datamodule,
    so the sequence layout follows the adapter). A new adapter is one module with these plus a YAML fragment
    (docs/extending.md)."""

    in_dim: int                 # D_enc: the encoder width it reads
    out_dim: int                # D_llm: the LLM width it writes
    num_tokens: int             # N: 32 for the C-Former, grid**2 for mean-pool

    def forward(self, feats: Tensor) -> Tensor: ...     # (B,L,D_enc) -> (B,N,D_llm)


@runtime_checkable
class PooledAdapter(Adapter, Protocol):
    """An adapter that first reduces the encoder tokens in encoder space, then projects (Emu2's mean-pool +
    `project_up`). Only such an adapter offers the `pooled` target space of stage 2 and the `pooled` decoder
    condition: the LLM regresses `pool(feats)` and its predictions re-enter through `project_up`."""

    def pool(self, feats: Tensor) -> Tensor: ...        # (B,L,D_enc) -> (B,N,D_enc)

    def project_up(self, pooled: Tensor) -> Tensor: ... # (B,N,D_enc) -> (B,N,D_llm)


@runtime_checkable
class CausalLM(Protocol):
    """`forward` returns the hidden state after the final norm. cache=None runs without a KV cache and
    returns None; to decode incrementally pass an empty cache (e.g. `LlamaLM.new_cache()`) and then the
    returned one, with `mask` spanning past + new tokens (B,T_past+T).
    """

    hidden_dim: int             # D_llm
    vocab_size: int             # V
    block_cls: type[nn.Module]

    def embed(self, input_ids: Tensor) -> Tensor: ...   # (B,T) -> (B,T,D_llm)

    def forward(self, embeds: Tensor, mask: Tensor, cache: Any | None = None
                ) -> tuple[Tensor, Any]: ...            # (B,T,D_llm), (B,T) -> hidden (B,T,D_llm), cache

    def logits(self, hidden: Tensor) -> Tensor: ...     # (B,T,D_llm) -> (B,T,V)

    def new_cache(self) -> Any: ...                     # an empty KV cache for incremental decoding

    def resize_vocab(self, size: int) -> None: ...      # new rows = mean embedding (docs/design.md §2)

    def generate(self, embeds: Tensor, mask: Tensor, **kwargs: Any) -> Tensor: ...
        # (B,T,D_llm) prompt embeddings -> (B,T_new) generated ids (greedy / beam via kwargs)
