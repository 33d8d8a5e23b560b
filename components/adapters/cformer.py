"""Emu1 C-Former (Causal Transformer): learned queries read the EVA tokens through a T5 decoder stack.

Follows the Emu paper ("Causal Transformer") and the released module (docs/design.md §1, §8):
`ln_visual` LayerNorm over all encoder tokens (CLS kept) -> 32 learned queries N(0, 0.02) as the
inputs of a T5 decoder stack (causal self-attention with relative position bias computed in block 0
and shared, cross-attention whose K/V take the vision width, ReLU FFN, RMS pre-norm, no 1/√d scaling)
-> `final_layer_norm` -> `projection` Linear(d_model → D_llm) with bias.

Contract: (B,L,D_enc) -> (B,num_queries,D_llm). The stack is transformers' own `T5Stack`, so it is
the released computation by construction; its token embedding is removed (queries are the inputs).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Block, T5Stack


def t5_decoder_config(d_model: int, num_layers: int, num_heads: int, d_ff: int, dropout: float) -> T5Config:
    """T5 decoder-only config of the C-Former (T5-base defaults for buckets and eps)."""
    return T5Config(
        vocab_size=1, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff, num_layers=num_layers,
        num_decoder_layers=num_layers, num_heads=num_heads, dropout_rate=dropout, feed_forward_proj="relu",
        relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
        is_decoder=True, is_encoder_decoder=False, eos_token_id=None, pad_token_id=0, use_cache=False,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


class CFormer(nn.Module):
    """Emu1 visual adapter: N causal queries cross-attending to the encoder tokens.

    Args:
        in_dim: Encoder width D_enc (cross-attention K/V input width).
        out_dim: LLM width D_llm.
        num_queries: Number of learned queries N (Emu1: 32).
        d_model: Width of the T5 stack (Emu1: 768).
        num_layers: Number of T5 decoder blocks (Emu1: 12).
        num_heads: Attention heads; d_kv = d_model // num_heads.
        d_ff: Hidden width of the ReLU FFN (Emu1: 3072).
        dropout: T5 dropout rate (Emu1: 0.1).
        ln_eps: epsilon of `ln_visual` (torch's default 1e-5; the Emu1 release uses 1e-6).
    """

    def __init__(
        self,
        in_dim: int = 192,
        out_dim: int = 256,
        num_queries: int = 32,
        d_model: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        d_ff: int = 512,
        dropout: float = 0.0,
        ln_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_tokens = num_queries
        self.ln_visual = nn.LayerNorm(in_dim, eps=ln_eps)
        self.causal_tokens = nn.Parameter(torch.randn(num_queries, d_model) * 0.02)  # (N,d_model)
        self.cformer = T5Stack(t5_decoder_config(d_model, num_layers, num_heads, d_ff, dropout))
        self.cformer.embed_tokens = None  # queries are fed as inputs_embeds; no word embedding
        inner = num_heads * (d_model // num_heads)
        for block in self.cformer.block:
            attn = block.layer[1].EncDecAttention
            # Cross-attention K/V read the vision width directly (Linear(D_enc → inner), no bias).
            attn.k = nn.Linear(in_dim, inner, bias=False)
            attn.v = nn.Linear(in_dim, inner, bias=False)
            nn.init.normal_(attn.k.weight, std=in_dim**-0.5)  # T5's K/V init, with the input width
            nn.init.normal_(attn.v.weight, std=in_dim**-0.5)
        self.projection = nn.Linear(d_model, out_dim, bias=True)
        self.block_cls: type[nn.Module] = T5Block

    def forward(self, feats: Tensor) -> Tensor:
        """(B,L,D_enc) -> (B,N,D_llm)."""
        hidden = self.forward_hidden(feats)   # (B,N,d_model)
        return self.projection(hidden)        # (B,N,D_llm)

    def forward_hidden(self, feats: Tensor) -> Tensor:
        """(B,L,D_enc) -> (B,N,d_model): the stack output after `final_layer_norm`, before `projection`."""
        vis = self.ln_visual(feats)                                         # (B,L,D_enc)
        queries = self.causal_tokens.unsqueeze(0).expand(feats.shape[0], -1, -1)  # (B,N,d_model)
        out = self.cformer(inputs_embeds=queries, encoder_hidden_states=vis, use_cache=False)
        return out.last_hidden_state

    @classmethod
    def tiny(cls, **overrides: Any) -> CFormer:
        """Test size: 2 blocks, d 32, 2 heads, FFN 64, 8 queries, D_enc 64 -> D_llm 64."""
        args: dict[str, Any] = dict(in_dim=64, out_dim=64, num_queries=8, d_model=32, num_layers=2,
                                    num_heads=2, d_ff=64, dropout=0.0)
        return cls(**{**args, **overrides})

