"""EVA vision encoder (timm): raw block output for Emu (EVA-01-CLIP-g) and Emu2 (EVA-02-CLIP-E-plus).

Follows docs/design.md §1 / §8: the feature is the raw output of one transformer block (the last by default),
with no final norm, no pooling and no head. Emu1 keeps the CLS token (257 tokens at 224 px); Emu2
drops it (1024 tokens at 448 px) before mean pooling.

Contract: pixels (B,3,H,W), CLIP-normalised -> (B,L,D_enc), L = grid**2 (+1 when the CLS is kept).
Unused trailing blocks, the final norm and the head are pruned so every parameter gets a gradient.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.eva import checkpoint_filter_fn
from torch import Tensor, nn

# Checkpoint keys for parts the encoder never uses (final norm, pooling norm, CLIP head): skipped on load.
_UNUSED_PREFIXES = ("norm.", "fc_norm.", "head.", "attn_pool.")


def load_state_dict_file(path: str) -> dict[str, Tensor]:
    """Read a .safetensors or torch (.pt/.bin/.pth) state dict from a local file, on CPU."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file), device="cpu")
    return torch.load(str(file), map_location="cpu", weights_only=True)


class ConvStem(nn.Module):
    """Convolutional patch embedding: 3×3 stride-2 convolutions (GroupNorm, GELU) down to the patch grid, then a
    1×1 projection to the width (Xiao et al. 2021, "Early Convolutions Help Transformers See Better",
    arXiv:2106.14881). Same input and output as the one-layer patchify convolution it replaces:
    (B,3,H,W) -> (B,D,H/p,W/p), p a power of two.

    From random init it gives a small ViT locality and translation equivariance: trained directly on shape, the
    debug encoder tells shapes apart after ~200 steps instead of ~300 (docs/synthetic_world.md, "How fast the
    debug model learns").
    Only for trunks trained from scratch: released EVA weights have a patchify convolution.
    """

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3, width: int = 32) -> None:
        super().__init__()
        n = patch_size.bit_length() - 1
        if patch_size < 2 or 2**n != patch_size:
            raise ValueError(f"stem='conv' needs a patch_size that is a power of two >= 2, got {patch_size}")
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(n):
            c_out = min(width * 2**i, embed_dim)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       nn.GroupNorm(min(8, c_out), c_out), nn.GELU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, embed_dim, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def sincos_2d(grid: int, dim: int) -> Tensor:
    """(grid², dim) fixed 2-D position table, row-major: the first half of the channels encodes the row, the second
    the column, each as sines and cosines of the index at geometrically spaced frequencies (the 1-D table of
    Vaswani et al. 2017 per axis, as MAE builds its 2-D one)."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs a width divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))    # (dim/4,)
    idx = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")                                   # (g,g) each
    def axis(x: Tensor) -> Tensor:
        angles = x.flatten()[:, None] * freqs[None]                                        # (g²,dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)                              # (g²,dim/2)
    return torch.cat([axis(rows), axis(cols)], dim=1).float()                              # (g²,dim)


class EVAEncoder(nn.Module):
    """timm EVA / EVA-02 trunk that returns one block's raw tokens.

    Args:
        model_name: timm EVA architecture name (e.g. `eva_giant_patch14_clip_224`).
        img_size: Input resolution in pixels (square).
        patch_size: Override of the architecture's patch size; None keeps it.
        depth: Override of the number of blocks; None keeps it.
        embed_dim: Override of the width D_enc; None keeps it.
        num_heads: Override of the number of attention heads; None keeps it.
        mlp_ratio: Override of the MLP hidden width / D_enc; None keeps it (a converted release states its own).
        layer: Which block's output to return, Python-style index (-1 last, -2 penultimate).
        drop_cls: Drop the prefix (CLS) token(s) from the output (Emu2) or keep them (Emu1).
        checkpoint_path: Local timm- or open_clip-format state dict (.safetensors / .pt / .bin); None = random.
        frozen: Freeze at construction (no grads, stays in eval mode).
        stem: `patch` (the ViT's one-layer patchify convolution, as released) or `conv` (a `ConvStem` in its
            place; random init only).
        pos_init: `default` (timm's: N(0, 0.02²), ~30× weaker than the patch embedding at init) or `sincos`
            (fixed-frequency 2-D sine-cosine values, still trainable, as MAE initialises its ViT, He et al. 2022):
            the patch tokens say where they are from the first step. Random init only.
    """

    def __init__(
        self,
        model_name: str = "eva02_tiny_patch14_224",
        img_size: int = 224,
        patch_size: int | None = None,
        depth: int | None = None,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        layer: int = -1,
        drop_cls: bool = False,
        checkpoint_path: str | None = None,
        frozen: bool = False,
        stem: str = "patch",
        pos_init: str = "default",
    ) -> None:
        super().__init__()
        if stem not in ("patch", "conv"):
            raise ValueError(f"EVAEncoder: stem={stem!r}; expected 'patch' or 'conv'")
        if stem == "conv" and checkpoint_path is not None:
            raise ValueError(f"EVAEncoder: stem='conv' cannot load {checkpoint_path}: released EVA weights have a "
                             "patchify stem; use stem='patch' with a checkpoint")
        if pos_init not in ("default", "sincos"):
            raise ValueError(f"EVAEncoder: pos_init={pos_init!r}; expected 'default' or 'sincos'")
        if pos_init == "sincos" and checkpoint_path is not None:
            raise ValueError(f"EVAEncoder: pos_init='sincos' cannot apply to {checkpoint_path}: a checkpoint brings "
                             "its own position embedding; use pos_init='default' with a checkpoint")
        overrides: dict[str, Any] = {"img_size": img_size, "num_classes": 0}
        for key, value in (("patch_size", patch_size), ("depth", depth),
                           ("embed_dim", embed_dim), ("num_heads", num_heads), ("mlp_ratio", mlp_ratio)):
            if value is not None:
                overrides[key] = value
        trunk = timm.create_model(model_name, pretrained=False, **overrides)
        if stem == "conv":  # PatchEmbed runs proj -> flatten -> norm; only proj changes
            conv = trunk.patch_embed.proj
            trunk.patch_embed.proj = ConvStem(conv.kernel_size[0], conv.out_channels, conv.in_channels)
        if pos_init == "sincos" and trunk.pos_embed is not None:
            grid = trunk.patch_embed.grid_size[0]
            with torch.no_grad():   # prefix (CLS) rows stay as drawn; patch rows get the 2-D table
                trunk.pos_embed[:, trunk.num_prefix_tokens:] = sincos_2d(grid, trunk.embed_dim)
        n_blocks = len(trunk.blocks)
        if not -n_blocks <= layer < n_blocks:
            raise ValueError(f"layer {layer} out of range for {model_name} with {n_blocks} blocks")
        self.block_index = layer % n_blocks
        if checkpoint_path is not None:
            self._load(trunk, checkpoint_path)
        # Keep blocks[:block_index+1]; final norm and head are unused (docs/design.md §8: raw block output).
        trunk.prune_intermediate_layers([self.block_index], prune_norm=True, prune_head=True)
        self.trunk = trunk
        self.drop_cls = drop_cls
        self.img_size = img_size
        self.embed_dim: int = trunk.embed_dim
        self.grid: int = trunk.patch_embed.grid_size[0]
        self.num_prefix_tokens: int = trunk.num_prefix_tokens
        self.num_tokens: int = self.grid**2 + (0 if drop_cls else self.num_prefix_tokens)
        self.block_cls: type[nn.Module] = type(trunk.blocks[0])
        self.frozen = False
        if frozen:
            self.freeze()

    @staticmethod
    def _load(trunk: nn.Module, path: str) -> None:
        """Strictly load a local checkpoint (open_clip `visual.*` keys are converted by timm's filter)."""
        raw = load_state_dict_file(path)
        state = checkpoint_filter_fn(raw, trunk)
        state = {k: v for k, v in state.items() if not k.startswith(_UNUSED_PREFIXES)}
        expected = {k for k in trunk.state_dict() if not k.startswith(_UNUSED_PREFIXES)}
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path} does not match {type(trunk).__name__}: "
                               f"missing keys {missing[:20]} ({len(missing)}), "
                               f"unexpected keys {unexpected[:20]} ({len(unexpected)})")
        trunk.load_state_dict(state, strict=False)  # strictness checked above, modulo unused parts

    def freeze(self) -> None:
        """Stop gradients and pin eval mode (dropout / drop-path off) for the rest of training."""
        self.frozen = True
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> EVAEncoder:
        return super().train(mode and not self.frozen)

    def forward(self, pixels: Tensor) -> Tensor:
        """(B,3,H,W) -> (B,L,D_enc) raw tokens of block `layer`, CLS first when kept."""
        (patches, prefix), = self.trunk.forward_intermediates(
            pixels, indices=[self.block_index], norm=False, stop_early=True, output_fmt="NLC",
            intermediates_only=True, return_prefix_tokens=True)
        # patches (B,grid²,D_enc) row-major; prefix (B,num_prefix,D_enc)
        if self.drop_cls or self.num_prefix_tokens == 0:
            return patches
        return torch.cat([prefix, patches], dim=1)  # (B,1+grid²,D_enc)

    @classmethod
    def tiny(cls, **overrides: Any) -> EVAEncoder:
        """Test-size EVA-02: 64 px, patch 8 (8×8 grid), 2 blocks, width 64, 2 heads."""
        args: dict[str, Any] = dict(model_name="eva02_tiny_patch14_224", img_size=64, patch_size=8,
                                    depth=2, embed_dim=64, num_heads=2)
        return cls(**{**args, **overrides})


