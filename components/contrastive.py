"""CLIP-style towers for contrastive encoder pretraining (stage 0, docs/encoder_pretraining.md).

Real Emu / Emu2 start from EVA-CLIP, an EVA encoder pretrained contrastively on image-text pairs (CLIP, Radford
et al. 2021, arXiv:2103.00020; EVA-CLIP, Sun et al. 2023, arXiv:2303.15389). At debug scale the same encoder is
pretrained the same way on the synthetic world's scene / caption pairs. Both towers end in one embedding per
sample, compared by the symmetric InfoNCE of `components/losses/contrastive.py`.

Contracts: `PooledImageHead` (B,L,D_enc) encoder tokens -> (B,E); `TextTower` (B,T) ids + (B,T) mask -> (B,E).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PooledImageHead(nn.Module):
    """Adapter-free image embedding: the mean of the encoder's tokens, normed and projected (no CLS, no attention
    pooling: what stage 1's mean-pool adapter reads is the token grid itself, so the grid is what must carry shape).

    Args:
        in_dim: encoder width D_enc.
        out_dim: joint embedding width E.
    """

    def __init__(self, in_dim: int = 192, out_dim: int = 128) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, feats: Tensor) -> Tensor:
        """(B,L,D_enc) -> (B,E), not normalised."""
        return self.proj(self.norm(feats.mean(1)))            # (B,D_enc): mean over the L tokens


class TextTower(nn.Module):
    """Small bidirectional transformer over the project tokenizer's ids, mean-pooled over the caption's tokens.

    CLIP's text tower is causal and reads the EOS position; with captions of ~40 tokens and no generation to
    serve, a bidirectional encoder with a masked mean is the simpler equivalent.

    Args:
        vocab_size: rows of the token embedding; at least the tokenizer's length (the system checks).
        width: transformer width.
        depth: transformer blocks.
        num_heads: attention heads per block.
        max_length: longest sequence (learned positions).
        out_dim: joint embedding width E.
    """

    def __init__(self, vocab_size: int = 1024, width: int = 128, depth: int = 2, num_heads: int = 4,
                 max_length: int = 64, out_dim: int = 128) -> None:
        super().__init__()
        self.vocab_size, self.max_length, self.out_dim = vocab_size, max_length, out_dim
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embedding = nn.Parameter(torch.randn(max_length, width) * 0.01)
        block = nn.TransformerEncoderLayer(width, num_heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.block_cls = nn.TransformerEncoderLayer
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim, bias=False)

    def forward(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        """(B,T) ids, (B,T) mask (1 = a caption token) -> (B,E), not normalised."""
        B, T = input_ids.shape
        if T > self.max_length:
            raise ValueError(f"TextTower(max_length={self.max_length}) got sequences of {T} tokens")
        keep = mask.bool()
        counts = keep.sum(1)
        if bool((counts == 0).any()):
            raise ValueError(f"TextTower: {int((counts == 0).sum())} of {B} sequences have no token in the mask")
        x = self.token_embedding(input_ids) + self.pos_embedding[:T]          # (B,T,W)
        x = self.norm(self.blocks(x, src_key_padding_mask=~keep))             # (B,T,W): masked tokens attend to none
        x = (x * keep.unsqueeze(-1)).sum(1) / counts.unsqueeze(-1)            # (B,W): mean over the caption
        return self.proj(x)


def init_logit_scale(temperature: float) -> nn.Parameter:
    """CLIP's learnable temperature, as log(1/τ) (τ = 0.07 at the start)."""
    return nn.Parameter(torch.tensor(math.log(1 / temperature)))
