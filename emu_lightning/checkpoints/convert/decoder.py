"""Released visual decoders → our `VisualDecoderUNet` (docs/design.md §4).

Both releases ship a plain diffusers `UNet2DConditionModel` folder (`Emu1/models/pipeline.py`: `unet/`, called with
`encoder_hidden_states` = the (B,32,5120) regressed embeddings; `Emu2/emu/diffusion.py` + `conf/diffusion_config/unet`:
SDXL-style, `cross_attention_dim` 1792, `added_cond_kwargs` = {`text_embeds`: mean of the 64 tokens, `time_ids`:
original size + crop + target size}). Our `VisualDecoderUNet(pooled=…, cond_norm=False)` is that UNet called the same
way, so the folder loads in place (`pretrained`, strictly: every key, every shape); the converter checks it, maps
every key (`<key>` → `unet.unet.<key>` in a `DecoderSystem`) and writes the recipe overlay. `decoder_export.py`
writes a trained one back as a diffusers folder: the released layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from diffusers import UNet2DConditionModel

from components.decoder.unet import VisualDecoderUNet, check_diffusers_folder
from emu_lightning.checkpoints.convert.common import ConversionError

TOKENS = {"emu1": 32, "emu2": 64}


def _released_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    weights = folder / "diffusion_pytorch_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = torch.load(folder / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def convert_decoder(release: str, src: str, dst: str, num_tokens: int | None = None) -> Path:
    """Check a released UNet folder against our decoder and write `DST/decoder.yaml` + `DST/conversion.json`.

    Args:
        release: `emu1` (SD1.5-style, cross-attention on 32 × 5120) or `emu2` (SDXL-style, 64 × 1792 + mean).
        src: the released diffusers UNet folder (config.json + diffusion_pytorch_model.*).
        dst: output folder.
        num_tokens: conditioning tokens per image (default 32 for Emu1, 64 for Emu2).
    """
    if release not in TOKENS:
        raise ConversionError(f"release must be one of {sorted(TOKENS)}, got {release!r}")
    folder = check_diffusers_folder(src, "released UNet")
    config = UNet2DConditionModel.load_config(folder)
    pooled = config.get("addition_embed_type") == "text_time"
    if pooled != (release == "emu2"):
        raise ConversionError(f"{src}: addition_embed_type={config.get('addition_embed_type')!r}; the {release} "
                              f"decoder {'uses' if release == 'emu2' else 'has no'} SDXL's text_time conditioning")
    cond_dim = config["cross_attention_dim"]
    if pooled and config["projection_class_embeddings_input_dim"] != cond_dim + 6 * config["addition_time_embed_dim"]:
        raise ConversionError(f"{src}: projection_class_embeddings_input_dim="
                              f"{config['projection_class_embeddings_input_dim']}, but text_embeds = the mean token "
                              f"({cond_dim}) + 6 time ids × {config['addition_time_embed_dim']} needs "
                              f"{cond_dim + 6 * config['addition_time_embed_dim']}")
    spec = {"class_path": "components.decoder.unet.VisualDecoderUNet",
            "init_args": {"cond_dim": cond_dim, "num_tokens": num_tokens or TOKENS[release],
                          "pretrained": str(folder.resolve()), "pooled": pooled, "cond_norm": False,
                          "image_size": config["sample_size"] * 8}}
    if pooled:   # VisualDecoderUNet's default (256) would otherwise override the folder's and re-make add_embedding
        spec["init_args"]["unet"] = {"addition_time_embed_dim": config["addition_time_embed_dim"]}
    with torch.device("meta"):
        own = UNet2DConditionModel.from_config(config).state_dict()
    released = _released_shapes(folder)
    missing, unexpected = sorted(set(own) - set(released)), sorted(set(released) - set(own))
    shapes = [k for k in own.keys() & released.keys() if tuple(own[k].shape) != released[k]]
    if missing or unexpected or shapes:
        raise ConversionError(f"{src}: not the UNet its config describes: missing {missing[:5]} ({len(missing)}), "
                              f"unexpected {unexpected[:5]} ({len(unexpected)}), shapes differ {shapes[:5]}")
    out = Path(dst).resolve()
    out.mkdir(parents=True, exist_ok=True)
    note = (f"# Released {release} decoder UNet {folder} (loaded in place, strictly) by "
            f"python -m emu_lightning.checkpoints.convert decoder; stack after recipes/{release}/decoder.yaml.\n")
    (out / "decoder.yaml").write_text(note + yaml.safe_dump({"model": {"init_args": {"unet": spec}}}, sort_keys=False))
    plan = {k: f"unet.unet.{k}" for k in released}
    (out / "conversion.json").write_text(json.dumps({"release": f"{release}_decoder", "source": str(folder),
                                                     "keys": plan}, indent=1))
    return out


def build_decoder(folder: str) -> VisualDecoderUNet:
    """Our decoder from a converted folder's `decoder.yaml` (real weights, loaded strictly)."""
    spec = yaml.safe_load((Path(folder) / "decoder.yaml").read_text())["model"]["init_args"]["unet"]
    return VisualDecoderUNet(**spec["init_args"])
