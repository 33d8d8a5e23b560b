"""Noise schedulers by name and the classifier-free-guidance sampling loop (docs/design.md §4).

ε = ε_u + s·(ε_c − ε_u): the conditional and the unconditional (null-embedding) predictions are computed
in one doubled batch, as diffusers' pipelines do. Emu1 samples with PNDM 50 steps, CFG 7.5 (10 in-context,
5 for FID); Emu2 with EulerDiscrete (`leading`) 50 steps, CFG 3.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       PNDMScheduler)
from torch import Tensor

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "pndm": PNDMScheduler,
              "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}

# The SD / SDXL schedule (docs/design.md §4): scaled-linear β 0.00085–0.012 over 1000 steps, ε-prediction, and
# their sampler settings: no x0 clipping (latents are not in [-1, 1]), PLMS-only PNDM, `leading` spacing.
SD_SCHEDULE: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                               "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon",
                               "clip_sample": False, "skip_prk_steps": True, "steps_offset": 1,
                               "set_alpha_to_one": False, "timestep_spacing": "leading"}
# Prediction types each sampler implements (diffusers 0.42).
PREDICTION_TYPES = {"ddpm": ("epsilon", "sample", "v_prediction"), "ddim": ("epsilon", "sample", "v_prediction"),
                    "pndm": ("epsilon", "v_prediction"), "euler": ("epsilon", "sample", "v_prediction"),
                    "dpm": ("epsilon", "sample", "v_prediction")}


def make_scheduler(name: str, config: dict[str, Any] | None = None) -> Any:
    """A diffusers scheduler by short name (`ddpm`, `ddim`, `pndm`, `euler`, `dpm`) sharing one train schedule.

    One schedule config serves every sampler: each gets the keys its class accepts. A key no scheduler accepts
    (a typo) and a prediction type the sampler cannot handle are errors.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}")
    cfg = {k: v for k, v in {**SD_SCHEDULE, **(config or {})}.items() if not k.startswith("_")}  # diffusers' own
    known = set().union(*(inspect.signature(c.__init__).parameters for c in SCHEDULERS.values()))
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"noise schedule keys {unknown} are accepted by no scheduler ({sorted(SCHEDULERS)})")
    if cfg["prediction_type"] not in PREDICTION_TYPES[name]:
        raise ValueError(f"sampler {name!r} cannot sample prediction_type={cfg['prediction_type']!r}; it supports "
                         f"{PREDICTION_TYPES[name]}")
    cls = SCHEDULERS[name]
    accepted = inspect.signature(cls.__init__).parameters
    with torch.device("cpu"):  # schedules are small CPU tables, also when a model is built on the meta device
        return cls(**{k: v for k, v in cfg.items() if k in accepted})


Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]   # (x_t, t, cond) -> model output


def guided(denoise: Denoiser, x: Tensor, t: Tensor, cond: Tensor, null: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance in one doubled batch: out_u + scale·(out_c − out_u)."""
    tt = torch.cat([t, t]) if t.ndim else t
    both = denoise(torch.cat([x, x]), tt, torch.cat([null.expand_as(cond), cond]))   # (2B,C,H,W)
    out_u, out_c = both.chunk(2)
    return out_u + scale * (out_c - out_u)


@torch.no_grad()
def sample(denoise: Denoiser, scheduler: Any, cond: Tensor, null: Tensor, shape: tuple[int, ...],
           steps: int = 50, guidance: float = 3.0, generator: torch.Generator | None = None) -> Tensor:
    """Run the reverse process from pure noise; returns the final sample in the diffusion space.

    Args:
        denoise: the UNet as (x_t, t, cond) → output in the scheduler's `prediction_type`.
        scheduler: a diffusers scheduler (its state is reset by `set_timesteps`).
        cond: (B,N,D) visual embeddings; null: (1,N,D) or (B,N,D) unconditional embedding.
        shape: (B,C,H,W) of the sample.
        guidance: CFG scale; 1.0 skips the unconditional branch (identical result, half the work).
        generator: seeds the initial noise (and stochastic schedulers' steps), on the CPU.
    """
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=generator).to(cond) * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        tt = t.to(cond.device).expand(shape[0])
        out = denoise(inp, tt, cond) if guidance == 1.0 else guided(denoise, inp, tt, cond, null, guidance)
        kwargs = {"generator": generator} if takes_generator else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x
