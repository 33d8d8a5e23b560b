"""Visual-embedding generation (docs/design.md §5): the official full-recompute loop and a KV-cached one.

For k = 0..N-1 the regression head reads the hidden state of the last position (`[IMG]` at k = 0, then each
generated `<image>`), and its output — mapped back to the LLM input space by `feedback` (Emu1: identity;
Emu2: `project_up`) — becomes the next input embedding. The official inference re-runs the whole sequence
for every embedding; with causal attention that work is redundant, so `generate_visual_cached` keeps the
LLM's KV cache and feeds one embedding per step. Both return the same (B,N,D_tgt) embeddings. An LLM may offer
a leaner step of its own (`start_decoding`: `LlamaLM`'s static K/V buffers and direct layer math,
`components.llm.llama_decode`), which the cached loop then uses.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from components.base import CausalLM


def _ones(mask: Tensor, n: int = 1) -> Tensor:
    return torch.cat([mask, mask.new_ones(mask.shape[0], n)], dim=1)


@torch.no_grad()
def generate_visual_cached(llm: CausalLM, head: Callable[[Tensor], Tensor], feedback: Callable[[Tensor], Tensor],
                           embeds: Tensor, mask: Tensor, num_tokens: int, lean: bool = True) -> Tensor:
    """KV-cached loop: one LLM step per embedding.

    Args:
        llm: causal LM whose `forward` accepts a cache.
        head: regression head, (B,D_llm) → (B,D_tgt).
        feedback: maps a prediction back to an input embedding, (B,D_tgt) → (B,D_llm).
        embeds: (B,T,D_llm) prompt embeddings ending with `[IMG]` (left-padded).
        mask: (B,T) attention mask of the prompt.
        num_tokens: N embeddings to generate.
        lean: step through the LLM's own static-cache decoder where it offers one (`start_decoding`, e.g.
            `LlamaLM`: preallocated K/V, direct layer math; `LlamaLM(lean_decoding=False)` turns it off for
            every caller); False, an LLM without one or one it refuses steps `forward` with its cache object.
            Both give the same embeddings (within float rounding).

    Returns:
        (B,N,D_tgt) predicted visual embeddings.
    """
    start = getattr(llm, "start_decoding", None) if lean else None
    decoder = start(embeds, mask, num_tokens - 1) if start is not None else None
    if decoder is None:
        decoder = _CachedSteps(llm, embeds, mask)
    preds = [head(decoder.hidden[:, -1])]                          # (B,D_tgt) read at [IMG]
    for _ in range(num_tokens - 1):
        preds.append(head(decoder.step(feedback(preds[-1]))))      # one new position per step
    return torch.stack(preds, dim=1)


class _CachedSteps:
    """The generic stepper, with `StaticDecoder`'s interface: `forward` with the LLM's own cache object."""

    def __init__(self, llm: CausalLM, embeds: Tensor, mask: Tensor) -> None:
        self.llm, self.mask = llm, mask
        self.hidden, self.cache = llm(embeds, mask, llm.new_cache())     # (B,T,D_llm): the prompt

    def step(self, x: Tensor) -> Tensor:
        """(B,D_llm) input embedding of the new position → (B,D_llm) its hidden state."""
        self.mask = _ones(self.mask)                                     # (B,T+k)
        hidden, self.cache = self.llm(x[:, None], self.mask, self.cache)
        return hidden[:, -1]


@torch.no_grad()
def generate_visual_reference(llm: CausalLM, head: Callable[[Tensor], Tensor],
                              feedback: Callable[[Tensor], Tensor], embeds: Tensor, mask: Tensor,
                              num_tokens: int) -> Tensor:
    """The official loop: a full forward pass with no cache for every generated embedding (same arguments)."""
    preds: list[Tensor] = []
    for k in range(num_tokens):
        fed = [feedback(p)[:, None] for p in preds]                # k × (B,1,D_llm) generated slots
        hidden, _ = llm(torch.cat([embeds, *fed], dim=1), _ones(mask, k) if k else mask)
        preds.append(head(hidden[:, -1]))
    return torch.stack(preds, dim=1)
