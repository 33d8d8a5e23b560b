"""Export a trained visual decoder (docs/design.md §4) as a folder that plain diffusers loads, and load it back.

    folder/
      unet/                      UNet2DConditionModel.save_pretrained (safetensors; the EMA weights by default)
      scheduler/                 the sampling scheduler (`system.sampler`) on the training schedule
      vae/                       AutoencoderKL.save_pretrained (latent space only)
      emu_condition.json         everything outside the UNet: how embeddings condition it, sampling defaults
      emu_condition.safetensors  `null_embedding` (1,N,D) and, with a grid path, `grid_proj.{weight,bias}`

To sample with diffusers alone: states = layer_norm(cond) when `cond_norm` (no affine, `cond_norm_eps`);
ε = unet(x, t, encoder_hidden_states=states) (plus `added_cond_kwargs` {text_embeds: states.mean(1),
time_ids: [S, S, 0, 0, S, S]} when `pooled`, S = `image_size`); CFG ε_u + s(ε_c − ε_u) with the null
embedding as the unconditional input; latents / `vae.config.scaling_factor` → VAE decode; image = (x+1)/2.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import diffusers
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from components.decoder.sampling import make_scheduler, sample
from components.decoder.space import LatentSpace, PixelSpace
from components.decoder.unet import VisualDecoderUNet
from emu_lightning.systems.decoder import DecoderSystem

FORMAT_VERSION = 1
META, TENSORS = "emu_condition.json", "emu_condition.safetensors"


@torch.no_grad()
def export_decoder(system: DecoderSystem, folder: str | Path, use_ema: bool = True, overwrite: bool = False) -> Path:
    """Write `system`'s decoder to `folder` (layout in the module docstring); returns the folder.

    Everything is written to a temporary sibling folder first and renamed into place at the end, so a
    crash never leaves a half-written export under `folder`.

    Args:
        use_ema: export the EMA weights when the system keeps an EMA (the weights `decode` samples with).
        overwrite: replace an existing `folder`; otherwise an existing one raises.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    denoiser: VisualDecoderUNet = system.denoiser(use_ema)
    N, D = denoiser.num_tokens, denoiser.cond_dim
    null = system.null_embedding(torch.zeros(1, N, D, device=system.device))            # (1,N,D)
    latent = isinstance(system.space, LatentSpace)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "cond_dim": D, "num_tokens": N, "condition": system.condition_kind,
        "null_condition": system.null_kind, "cond_norm": isinstance(denoiser.norm, nn.LayerNorm),
        "cond_norm_eps": getattr(denoiser.norm, "eps", None), "grid_channels": denoiser.grid_channels,
        "pooled": denoiser.pooled, "image_size": denoiser.image_size, "output_size": system.image_size,
        "space": "latent" if latent else "pixel", "prediction_type": system.prediction_type,
        "sampler": system.sampler, "sample_steps": system.sample_steps, "guidance_scale": system.guidance_scale,
        "ema": denoiser is system.ema,
    }
    tensors = {"null_embedding": null.float().cpu().contiguous()}
    if denoiser.grid_channels:
        tensors |= {f"grid_proj.{k}": v.cpu().contiguous() for k, v in denoiser.grid_proj.state_dict().items()}

    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        denoiser.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        make_scheduler(system.sampler, system.schedule).save_pretrained(tmp / "scheduler")
        if latent:
            system.space.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(tensors, str(tmp / TENSORS))
        if folder.exists():  # rename(2) cannot replace a non-empty folder: move the old one aside first
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class ExportedDecoder(nn.Module):
    """A decoder rebuilt from an export folder alone: (B,N,D) embeddings → (B,3,S,S) images in [0,1].

    Attributes: `unet` (a `VisualDecoderUNet` around the folder's plain diffusers UNet), `space`,
    `scheduler`, `null` (1,N,D) and `meta` (the json).
    """

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        folder = Path(folder)
        for name in ("unet", "scheduler", META, TENSORS):
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder} is not a decoder export: {name} is missing")
        self.meta = meta = json.loads((folder / META).read_text())
        if meta["format_version"] != FORMAT_VERSION:
            raise ValueError(f"{folder}: export format {meta['format_version']}, this code reads {FORMAT_VERSION}")
        tensors = load_file(str(folder / TENSORS))
        self.unet = VisualDecoderUNet(meta["cond_dim"], meta["num_tokens"], pretrained=str(folder / "unet"),
                                      pooled=meta["pooled"], cond_norm=meta["cond_norm"],
                                      grid_channels=meta["grid_channels"], image_size=meta["image_size"])
        if meta["grid_channels"]:
            self.unet.grid_proj.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items()
                                                 if k.startswith("grid_proj.")}, strict=True)
        self.space = LatentSpace(pretrained=str(folder / "vae")) if meta["space"] == "latent" else PixelSpace()
        scheduler_cls = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        self.scheduler = getattr(diffusers, scheduler_cls).from_pretrained(folder / "scheduler")
        self.register_buffer("null", tensors["null_embedding"])                          # (1,N,D)
        self.requires_grad_(False).eval()

    # The surface `EmuImagePipeline` uses, shared with `DecoderSystem` (which also has the encoder).
    @property
    def condition_kind(self) -> str:
        return self.meta["condition"]

    @property
    def device(self) -> torch.device:
        return self.null.device

    def null_embedding(self, like: Tensor) -> Tensor:
        return self.null.to(like)

    @torch.no_grad()
    def decode(self, cond: Tensor, guidance: float | None = None, steps: int | None = None,
               generator: torch.Generator | None = None, null: Tensor | None = None,
               sampler: str | None = None) -> Tensor:
        """(B,N,D) embeddings → (B,3,S,S) images in [0,1]; defaults are the exported sampling settings
        (`sampler`: another scheduler by short name, on the exported schedule)."""
        self.unet.check_condition(cond)
        shape = (len(cond), self.space.channels, self.unet.sample_size, self.unet.sample_size)
        guidance = self.meta["guidance_scale"] if guidance is None else guidance
        scheduler = self.scheduler if sampler is None else make_scheduler(sampler, dict(self.scheduler.config))
        z = sample(self.unet, scheduler, cond, (self.null if null is None else null).to(cond), shape,
                   steps or self.meta["sample_steps"], guidance, generator)
        return ((self.space.decode(z) + 1) / 2).clamp(0, 1)


def load_exported_decoder(folder: str | Path) -> ExportedDecoder:
    """An `ExportedDecoder` on the CPU (move it with `.to(device)`)."""
    return ExportedDecoder(folder)
