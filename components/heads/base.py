"""Visual generation heads: how the LLM produces the N visual embeddings of an image it generates.

A head owns three things that must agree, so no system branches on the kind of head (docs/generation_heads.md):

- what the LLM *reads* at the `<image>` rows of an image it is trained to generate (`read_inputs`);
- which hidden positions *predict* those rows' targets, in the targets' order (`predicting`);
- the inference loop that produces them (`generate`).

Every head maps the LLM width to the target width with one bias-free linear map `proj` (Emu1's
`stu_regress_head`, Emu2's `project_down`), so its state-dict key is `proj.weight` whatever the head. With
`whiten`, the head regresses per-dimension standardised targets; `forward` undoes that, so its output is
always in the target space the decoder reads. The statistics are buffers: they travel with checkpoints and
exports.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from components.base import CausalLM


@runtime_checkable
class VisualHead(Protocol):
    in_dim: int                 # D_llm
    out_dim: int                # D_tgt
    feeds_back: bool            # True: the LLM reads (teacher-forced / generated) image rows it regresses

    def forward(self, hidden: Tensor) -> Tensor: ...        # (...,D_llm) -> (...,D_tgt), target space

    def predicting(self, rows: Tensor) -> Tensor: ...       # (B,T) regressed <image> rows -> (B,T) hidden positions

    def read_inputs(self, embeds: Tensor, rows: Tensor, training: bool) -> Tensor: ...   # (B,T,D_llm)

    def generate(self, llm: CausalLM, feedback: Any, embeds: Tensor, mask: Tensor, num_tokens: int,
                 use_cache: bool = True) -> Tensor: ...      # prompt ending in [IMG] -> (B,N,D_tgt)


class ProjectionHead(nn.Module):
    """The linear map and the optional target whitening every head shares.

    Args:
        in_dim: LLM width D_llm.
        out_dim: target width D_tgt.
        whiten: regress (target - mean) / std per dimension; the statistics are estimated once from a data
            sample (`fit_whitening`, called by the system at fit start) and saved as buffers.
    """

    feeds_back = True

    def __init__(self, in_dim: int = 256, out_dim: int = 256, whiten: bool = False) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.whiten = in_dim, out_dim, whiten
        self.proj = nn.Linear(in_dim, out_dim, bias=False)
        if whiten:
            self.register_buffer("target_mean", torch.zeros(out_dim))
            self.register_buffer("target_std", torch.ones(out_dim))
            self.register_buffer("whiten_samples", torch.zeros((), dtype=torch.long))   # 0 = not estimated

    @property
    def whitening_ready(self) -> bool:
        return not self.whiten or int(self.whiten_samples) > 0

    @torch.no_grad()
    def fit_whitening(self, targets: Tensor, eps: float = 1e-4) -> None:
        """Per-dimension mean / std of (P,D_tgt) sample targets; a dimension with std < eps keeps eps."""
        if not self.whiten:
            raise ValueError("fit_whitening on a head built with whiten=False")
        if targets.dim() != 2 or targets.shape[1] != self.out_dim or len(targets) < 2:
            raise ValueError(f"whitening needs (P≥2,{self.out_dim}) targets, got {tuple(targets.shape)}")
        t = targets.detach().float()
        self.target_mean.copy_(t.mean(0))
        self.target_std.copy_(t.std(0).clamp_min(eps))
        self.whiten_samples.fill_(len(t))

    def normalize(self, target: Tensor) -> Tensor:
        """Target space → the space the head regresses in (identity without whitening)."""
        if not self.whiten:
            return target
        return (target - self.target_mean.to(target.dtype)) / self.target_std.to(target.dtype)

    def denormalize(self, pred: Tensor) -> Tensor:
        if not self.whiten:
            return pred
        return pred * self.target_std.to(pred.dtype) + self.target_mean.to(pred.dtype)

    def regress(self, hidden: Tensor) -> Tensor:
        """(...,D_llm) → (...,D_tgt) in the regression space (whitened when `whiten`): what the loss reads."""
        return self.proj(hidden)

    def forward(self, hidden: Tensor) -> Tensor:
        """(...,D_llm) → (...,D_tgt) in the target space (the decoder's condition space)."""
        return self.denormalize(self.proj(hidden))
