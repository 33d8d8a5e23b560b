"""The papers' head (Emu, Emu2; docs/design.md §2, §5): position t regresses the `<image>` at t+1, and generation
feeds each prediction back as the next input (KV-cached, `components.generation`).

Optional noise augmentation after Pasini et al. 2024 ("Continuous Autoregressive Models with Noise
Augmentation Avoid Error Accumulation"): in training, the `<image>` input rows of a regressed image are
perturbed, x + σ·rms(x)·ε with σ ~ U(0, noise_max) drawn per image, so the model learns to predict the next
embedding from inputs as imperfect as the ones it will feed itself; at inference each fed-back row gets
σ = noise_inference. (The paper also conditions on σ; this head does not.)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from components.base import CausalLM
from components.generation import generate_visual_cached, generate_visual_reference
from components.heads.base import ProjectionHead


def _perturb(x: Tensor, sigma: Tensor) -> Tensor:
    """x + σ·rms(x)·ε, row by row: (P,D), (P,) → (P,D)."""
    rms = x.detach().float().pow(2).mean(-1, keepdim=True).sqrt().to(x.dtype)
    return x + sigma[:, None].to(x.dtype) * rms * torch.randn_like(x)


class AutoregressiveHead(ProjectionHead):
    """Next-embedding regression with feedback.

    Args:
        in_dim, out_dim, whiten, flow: see `ProjectionHead` (with `flow`, each fed-back embedding is a sample, as
            in MAR's autoregressive variant).
        noise_max: largest training noise level σ (relative to each row's RMS); 0 = the papers' teacher forcing.
        noise_inference: σ added to each fed-back embedding at generation time.
    """

    feeds_back = True

    def __init__(self, in_dim: int = 256, out_dim: int = 256, whiten: bool = False, noise_max: float = 0.0,
                 noise_inference: float = 0.0, flow: dict[str, Any] | None = None) -> None:
        super().__init__(in_dim, out_dim, whiten, flow)
        if noise_max < 0 or noise_inference < 0:
            raise ValueError(f"noise levels must be ≥ 0; got noise_max={noise_max}, noise_inference={noise_inference}")
        self.noise_max, self.noise_inference = noise_max, noise_inference

    def predicting(self, rows: Tensor) -> Tensor:
        """Position t predicts row t+1: (B,T) rows → (B,T) positions (the last column never predicts)."""
        pos = torch.zeros_like(rows)
        pos[:, :-1] = rows[:, 1:]
        return pos

    def read_inputs(self, embeds: Tensor, rows: Tensor, training: bool) -> Tensor:
        """Teacher forcing: the true rows, perturbed in training when `noise_max` > 0."""
        if not (training and self.noise_max > 0 and rows.any()):
            return embeds
        # One σ per image: a run of `<image>` rows starts where the previous column was not one.
        starts = rows.clone()
        starts[:, 1:] &= ~rows[:, :-1]
        image = starts.flatten().cumsum(0)[rows.flatten()] - 1                     # (P,) image of each row
        sigma = torch.rand(int(starts.sum()), device=embeds.device) * self.noise_max
        out = embeds.clone()
        out[rows] = _perturb(embeds[rows], sigma[image])
        return out

    def generate(self, llm: CausalLM, feedback: Any, embeds: Tensor, mask: Tensor, num_tokens: int,
                 use_cache: bool = True) -> Tensor:
        fed = feedback
        if self.noise_inference > 0:
            fed = lambda p: _perturb(feedback(p), p.new_full((len(p),), self.noise_inference))  # noqa: E731
        loop = generate_visual_cached if use_cache else generate_visual_reference
        return loop(llm, self, fed, embeds, mask, num_tokens)
