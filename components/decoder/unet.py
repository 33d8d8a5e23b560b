"""The decoder's denoiser: a plain diffusers `UNet2DConditionModel` plus how visual embeddings condition it.

Emu's decoder is an SD-style UNet whose cross-attention reads the N visual embeddings instead of CLIP text
states (docs/design.md §4): Emu1 re-makes the K/V projections for 5120-d input (32 tokens), Emu2 reads 64×1792
pooled EVA tokens and also feeds their mean as SDXL's `text_embeds` through the added-conditioning path.

Everything outside the UNet is a small, exportable `prepare` step:
- `cond_norm`: LayerNorm without affine on each token, so embeddings of any scale enter cross-attention
  at unit scale (the pooled EVA tokens of a trained encoder have norms in the tens);
- `grid_channels`: optional spatial path for grid adapters (mean-pool): the g×g token grid is projected by
  a 1×1 conv, upsampled (nearest) to the sample size and concatenated to the UNet input, as SD's upscaler
  and inpainting UNets concatenate their image condition. Off (0) in the Emu presets; a debug ablation.
The UNet itself stays plain diffusers, so an exported folder loads with `UNet2DConditionModel.from_pretrained`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from safetensors.torch import load_file
from torch import Tensor, nn

_UNET_FILES = ("config.json",)
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def check_diffusers_folder(folder: str, what: str) -> Path:
    """The folder of a diffusers model (config.json + weights); a missing file is named in the error."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    for name in _UNET_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{what} folder {folder} is missing {name}")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(f"{what} folder {folder} is missing its weights: one of {list(_WEIGHT_FILES)}")
    return path


# Layers a pretrained SD / SDXL UNet may have re-made when the condition differs: cross-attention K/V (its input
# width is the condition's) and SDXL's added-conditioning projection (text_embeds width + 6·256).
REMADE = re.compile(r"(attn2\.to_[kv]\.weight|add_embedding\.linear_1\.weight)$")


def load_unet(folder: str, overrides: dict[str, Any]) -> UNet2DConditionModel:
    """A local diffusers UNet with `overrides` on its config: every tensor loads except the layers whose shape
    the overrides change, which must be cross-attention K/V or the added-conditioning projection and start
    freshly initialised (diffusers' own `ignore_mismatched_sizes` leaves them as uninitialised memory)."""
    path = check_diffusers_folder(folder, "UNet")
    config = {**UNet2DConditionModel.load_config(path), **overrides}
    unet = UNet2DConditionModel.from_config(config)                       # fresh init of every layer
    weights = path / "diffusion_pytorch_model.safetensors"
    state = (load_file(weights) if weights.is_file()
             else torch.load(path / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True))
    own = unet.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"UNet folder {folder}: missing keys {missing[:5]} ({len(missing)}), unexpected keys "
                         f"{unexpected[:5]} ({len(unexpected)})")
    differ = [k for k in own if own[k].shape != state[k].shape]
    wrong = [f"{k} {tuple(state[k].shape)} → {tuple(own[k].shape)}" for k in differ if not REMADE.search(k)]
    if wrong:
        raise ValueError(f"UNet folder {folder}: the config overrides change the shape of {wrong[:3]} "
                         f"({len(wrong)}); only cross-attention K/V and add_embedding.linear_1 may be re-made")
    unet.load_state_dict({k: v for k, v in state.items() if k not in differ}, strict=False)
    return unet


class VisualDecoderUNet(nn.Module):
    """Denoiser ε/x0/v(x_t, t | visual embeddings).

    Args:
        cond_dim: width of the visual embeddings (Emu1 5120, Emu2 1792); must equal the UNet's
            `cross_attention_dim`.
        num_tokens: N embeddings per image (a square for `grid_channels`).
        pretrained: local diffusers UNet folder (SD1.5 / SDXL `unet/`); None = build from `unet` kwargs.
            Its cross-attention K/V are re-made for `cond_dim` (Emu1: 768 → 5120; Emu2: 2048 → 1792), and for
            `pooled` SDXL's add-embedding input (2816 → cond_dim + 6·256); every other tensor must load.
        pooled: Emu2: also condition on the mean token via SDXL's added conditioning (`text_time`).
        cond_norm: LayerNorm (no affine) on each embedding before the UNet.
        grid_channels: channels of the spatial grid path (0 = off).
        unet: `UNet2DConditionModel` kwargs (sample_size, block_out_channels, ...).
        image_size: output image side, for the pooled path's default `time_ids` (None = the UNet's sample_size).
    """

    def __init__(self, cond_dim: int, num_tokens: int, pretrained: str | None = None, pooled: bool = False,
                 cond_norm: bool = True, grid_channels: int = 0, unet: dict[str, Any] | None = None,
                 image_size: int | None = None) -> None:
        super().__init__()
        self.cond_dim, self.num_tokens, self.pooled, self.grid_channels = cond_dim, num_tokens, pooled, grid_channels
        kwargs = dict(unet or {})
        kwargs.setdefault("cross_attention_dim", cond_dim)
        if pooled:  # SDXL's added conditioning: text_embeds (D) + 6 time ids × 256 (docs/design.md §4)
            kwargs.setdefault("addition_embed_type", "text_time")
            kwargs.setdefault("addition_time_embed_dim", 256)
            kwargs["projection_class_embeddings_input_dim"] = cond_dim + 6 * kwargs["addition_time_embed_dim"]
        if pretrained is not None:
            self.unet = load_unet(pretrained, kwargs)
        else:
            self.unet = UNet2DConditionModel(**kwargs)
        if self.unet.config.addition_embed_type == "text_time" and not pooled:
            raise ValueError("the UNet has SDXL's added conditioning (addition_embed_type='text_time'): "
                             "set pooled: true so it receives text_embeds and time_ids")
        width = self.unet.config.cross_attention_dim
        if width != cond_dim:
            raise ValueError(f"conditioning width {cond_dim} does not match the UNet's cross_attention_dim {width}")
        self.norm = nn.LayerNorm(cond_dim, elementwise_affine=False) if cond_norm else nn.Identity()
        if grid_channels:
            side = math.isqrt(num_tokens)
            if side * side != num_tokens:
                raise ValueError(f"grid_channels needs a square token grid; got num_tokens={num_tokens}")
            self.grid_proj = nn.Conv2d(cond_dim, grid_channels, 1)
        self.sample_channels = self.unet.config.in_channels - grid_channels
        self.image_size = image_size or self.unet.config.sample_size
        # The UNet repeats two blocks, as SD training shards it: the residual conv block and the transformer
        # block (self-, cross-attention, FF) of each Transformer2DModel; both are FSDP / checkpointing units.
        self.block_cls: tuple[type[nn.Module], ...] = (ResnetBlock2D, BasicTransformerBlock)

    @property
    def sample_size(self) -> int:
        return self.unet.config.sample_size

    def check_condition(self, cond: Tensor) -> None:
        if cond.ndim != 3:
            raise ValueError(f"the decoder condition must be (B,N,D) embeddings; got shape {tuple(cond.shape)}")
        if cond.shape[-1] != self.cond_dim:
            raise ValueError(f"conditioning width {cond.shape[-1]} does not match the UNet's cross_attention_dim "
                             f"{self.cond_dim}")
        if cond.shape[1] != self.num_tokens:
            raise ValueError(f"decoder expects {self.num_tokens} conditioning tokens, got {cond.shape[1]}")

    def forward(self, sample: Tensor, timestep: Tensor, cond: Tensor, time_ids: Tensor | None = None) -> Tensor:
        """(B,C,H,W) noisy sample, (B,) or () timestep, (B,N,D) embeddings → (B,C,H,W) model output."""
        self.check_condition(cond)
        states = self.norm(cond)                                            # (B,N,D)
        if self.grid_channels:
            B, N, D = states.shape
            side = math.isqrt(N)
            grid = self.grid_proj(states.transpose(1, 2).reshape(B, D, side, side))  # (B,G,g,g)
            sample = torch.cat([sample, F.interpolate(grid, size=sample.shape[-2:], mode="nearest")], dim=1)
        added = None
        if self.pooled:
            if time_ids is None:  # (orig h, orig w, crop top, crop left, target h, target w): uncropped squares
                s = float(self.image_size)
                time_ids = sample.new_tensor([s, s, 0.0, 0.0, s, s]).expand(sample.shape[0], 6)
            added = {"text_embeds": states.mean(dim=1), "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=states, added_cond_kwargs=added).sample
