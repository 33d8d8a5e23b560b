"""A per-token flow-matching sampler for visual embeddings (docs/generation_heads.md, "Sampling instead of the
mean").

An ℓ2 head returns the conditional mean of each embedding given the LLM's hidden state; where the target varies
for one caption (an object's exact position and size within its cell), that mean is not the embedding of any
image. MAR (Li et al. 2024, "Autoregressive Image Generation without Vector Quantization") replaces the
regression with a small per-token denoiser conditioned on the hidden state, trained with a diffusion loss, and
*samples* each embedding; BLIP3-o (Chen et al. 2025) trains such a head with flow matching. This module is that
denoiser, trained with rectified-flow matching (Liu et al. 2023; Lipman et al. 2023):

    x_t = (1 − t)·ε + t·x,   ε ~ N(0, I),   t ~ U(0, 1),   loss = ‖v(x_t, t, c) − (x − ε)‖²,

and sampled with `steps` Euler steps from t = 0 to 1, starting from τ·ε (τ = `temperature`; τ < 1 trades
diversity for fidelity, as MAR's temperature does). The network is MAR's `SimpleMLPAdaLN`: residual MLP blocks
whose LayerNorms are shifted, scaled and gated by the sum of a timestep embedding and a linear map of the
condition, with the modulations and the output layer zero-initialised.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(P,) times in [0, 1] → (P,dim) sinusoidal features of 1000·t (the DDPM / DiT convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class _AdaLNBlock(nn.Module):
    """x + gate · MLP(LN(x)·(1 + scale) + shift), with (shift, scale, gate) from the conditioning vector."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class FlowSampler(nn.Module):
    """Per-token velocity network v(x_t, t, c) with its flow-matching loss and Euler sampler.

    Args:
        dim: width of the embeddings it samples (the head's D_tgt).
        cond_dim: width of the condition (the LLM's D_llm).
        width: the MLP's hidden width.
        depth: number of residual AdaLN blocks.
        steps: Euler steps at sampling.
        temperature: scale of the starting noise at sampling.
        repeat: noise draws per target in training (MAR's `diffusion_batch_mul`): cheap variance reduction, since
            the denoiser is small next to the LLM that computed the condition.
    """

    def __init__(self, dim: int, cond_dim: int, width: int = 256, depth: int = 3, steps: int = 20,
                 temperature: float = 1.0, repeat: int = 4) -> None:
        super().__init__()
        if depth < 1 or width < 1 or repeat < 1:
            raise ValueError(f"flow sampler needs depth, width and repeat ≥ 1; got depth={depth}, width={width}, "
                             f"repeat={repeat}")
        self.check_sampling(steps, temperature)
        self.dim, self.width, self.steps, self.temperature, self.repeat = dim, width, steps, temperature, repeat
        self.input = nn.Linear(dim, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.cond = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(_AdaLNBlock(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, dim)
        for layer in (self.out_modulation[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @staticmethod
    def check_sampling(steps: int = 1, temperature: float = 1.0) -> None:
        """The sampling settings' ranges; also for code that sets `steps` / `temperature` after construction."""
        if steps < 1:
            raise ValueError(f"flow sampler steps must be ≥ 1 (0 would return the starting noise); got {steps}")
        if temperature <= 0:
            raise ValueError(f"flow sampler temperature must be > 0 (the scale of the starting noise); "
                             f"got {temperature}")

    def velocity(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """(P,dim) noisy embeddings, (P,) times, (P,cond_dim) conditions → (P,dim) predicted velocity x − ε."""
        y = self.time(timestep_embedding(t, self.width).to(x.dtype)) + self.cond(c)
        h = self.input(x)
        for block in self.blocks:
            h = block(h, y)
        shift, scale = self.out_modulation(y).chunk(2, dim=-1)
        return self.out(self.out_norm(h) * (1 + scale) + shift)

    def loss(self, cond: Tensor, target: Tensor) -> Tensor:
        """Flow-matching loss of (P,dim) targets given their (P,cond_dim) conditions; mean over draws × dims.
        The condition keeps its graph, so the loss trains the LLM that produced it, as MAR's does."""
        if len(target) == 0:
            return cond.sum() * 0.0
        x = target.detach().repeat(self.repeat, 1)                                 # (rP,dim)
        c = cond.repeat(self.repeat, 1)                                            # (rP,cond_dim)
        noise = torch.randn_like(x)
        t = torch.rand(len(x), device=x.device, dtype=x.dtype)
        x_t = (1 - t[:, None]) * noise + t[:, None] * x
        return (self.velocity(x_t, t, c).float() - (x - noise).float()).pow(2).mean()

    @torch.no_grad()
    def sample(self, cond: Tensor, steps: int | None = None, temperature: float | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """(...,cond_dim) conditions → (...,dim) samples, Euler from t = 0 (noise) to t = 1."""
        steps = steps or self.steps
        tau = self.temperature if temperature is None else temperature
        c = cond.reshape(-1, cond.shape[-1])
        x = tau * torch.randn(len(c), self.dim, device=c.device, dtype=c.dtype, generator=generator)
        dt = 1.0 / steps
        for k in range(steps):
            t = torch.full((len(c),), k * dt, device=c.device, dtype=c.dtype)
            x = x + dt * self.velocity(x, t, c)
        return x.reshape(*cond.shape[:-1], self.dim)
