"""Visual generation heads: how the LLM produces the N visual embeddings of an image it generates.

A head owns three things that must agree, so no system branches on the kind of head (docs/generation_heads.md):

- what the LLM *reads* at the `<image>` rows of an image it is trained to generate (`read_inputs`);
- which hidden positions *predict* those rows' targets, in the targets' order (`predicting`), and with what loss
  (`loss`);
- the inference loop that produces them (`generate`).

Every head maps the LLM width to the target width with one bias-free linear map `proj` (Emu1's
`stu_regress_head`, Emu2's `project_down`), so its state-dict key is `proj.weight` whatever the head. With
`whiten`, the head regresses per-dimension standardised targets; `forward` undoes that, so its output is
always in the target space the decoder reads. The statistics are buffers: they travel with checkpoints and
exports.
"""
from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from components.base import CausalLM
from components.heads.flow import FlowSampler
from components.losses.regression import regression_loss


@runtime_checkable
class VisualHead(Protocol):
    in_dim: int                 # D_llm
    out_dim: int                # D_tgt
    feeds_back: bool            # True: the LLM reads (teacher-forced / generated) image rows it regresses

    def forward(self, hidden: Tensor) -> Tensor: ...        # (...,D_llm) -> (...,D_tgt), target space

    def predicting(self, rows: Tensor) -> Tensor: ...       # (B,T) regressed <image> rows -> (B,T) hidden positions

    def read_inputs(self, embeds: Tensor, rows: Tensor, training: bool) -> Tensor: ...   # (B,T,D_llm)

    def loss(self, hidden: Tensor, target: Tensor, objective: str) -> tuple[dict[str, Tensor], Tensor]: ...
    # (P,D_llm) predicting hidden states, (P,D_tgt) normalised targets → loss terms, (P,D_tgt) point estimates

    def generate(self, llm: CausalLM, feedback: Any, embeds: Tensor, mask: Tensor, num_tokens: int,
                 use_cache: bool = True) -> Tensor: ...      # prompt ending in [IMG] -> (B,N,D_tgt)


class ProjectionHead(nn.Module):
    """The linear map and the optional target whitening every head shares.

    Args:
        in_dim: LLM width D_llm.
        out_dim: target width D_tgt.
        whiten: regress (target - mean) / std per dimension; the statistics are estimated once from a data
            sample (`fit_whitening`, called by the system at fit start) and saved as buffers.
        flow: arguments of a `FlowSampler` (`width`, `depth`, `steps`, `temperature`, `repeat`), or None. With it
            the head *samples* each embedding with a per-token flow-matching denoiser conditioned on the hidden
            state (MAR, Li et al. 2024) instead of returning the linear map's conditional mean; the linear map
            keeps its regression loss (the point estimate `mean`, and the readings), and the flow loss is added
            to it. The flow works in the regression space: whiten the targets so its N(0, I) noise fits them.
    """

    feeds_back = True

    def __init__(self, in_dim: int = 256, out_dim: int = 256, whiten: bool = False,
                 flow: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.whiten = in_dim, out_dim, whiten
        self.proj = nn.Linear(in_dim, out_dim, bias=False)
        self.flow: FlowSampler | None = None
        if flow:
            known = set(inspect.signature(FlowSampler).parameters) - {"dim", "cond_dim"}   # set by the head
            if set(flow) - known:
                raise ValueError(f"regression_head flow: unknown keys {sorted(set(flow) - known)}; expected some of "
                                 f"{sorted(known)}")
            self.flow = FlowSampler(out_dim, in_dim, **flow)
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
        """(...,D_llm) → (...,D_tgt) in the regression space (whitened when `whiten`): the linear point estimate."""
        return self.proj(hidden)

    def loss(self, hidden: Tensor, target: Tensor, objective: str = "mse") -> tuple[dict[str, Tensor], Tensor]:
        """The head's training loss for (P,D_llm) predicting hidden states and their (P,D_tgt) targets in the
        regression space (`normalize`d). Returns the terms of `regression_loss` (with a flow sampler,
        `regression_loss` also holds the flow loss, and `flow_loss` is its reading) and the (P,D_tgt) point
        estimates `regress(hidden)`."""
        pred = self.regress(hidden)
        terms = regression_loss(pred, target, objective)
        if self.flow is not None and len(target):
            flow = self.flow.loss(hidden, target)
            terms["regression_loss"] = terms["regression_loss"] + flow
            terms["flow_loss"] = flow.detach()
        return terms, pred

    def mean(self, hidden: Tensor) -> Tensor:
        """(...,D_llm) → (...,D_tgt) the linear map's point estimate, in the target space."""
        return self.denormalize(self.proj(hidden))

    def forward(self, hidden: Tensor) -> Tensor:
        """(...,D_llm) → (...,D_tgt) in the target space (the decoder's condition space): the point estimate, or
        with a flow sampler a sample (drawn from torch's global generator)."""
        if self.flow is None:
            return self.mean(hidden)
        return self.denormalize(self.flow.sample(hidden))
