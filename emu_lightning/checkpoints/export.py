"""Export a trained Emu model (encoder + adapter + LLM + regression head + tokenizer) to a plain folder.

    python -m emu_lightning.checkpoints.export <run dir> <out folder> [--ckpt <checkpoint>]

The folder needs neither Lightning nor this platform's training code to use:

    emu_config.json            # each part's class_path + init_args, target space, N, chat template if any
    encoder.safetensors        # EVA trunk (the blocks up to the feature layer; no final norm / head)
    adapter.safetensors        # C-Former or mean-pool projector
    regression_head.safetensors
    llm/                       # transformers LlamaForCausalLM (config.json + model.safetensors), vocab resized
    tokenizer/                 # tokenizer.json + tokenizer_config.json

`load_exported(folder)` rebuilds `EmuModel`, a plain `nn.Module` whose `forward` gives the logits and the
regression head's outputs of the trained system exactly; `llm/` alone loads with
`LlamaForCausalLM.from_pretrained`. A part trained with `policy.lora` is written merged (peft's merge): the folder
holds plain parts. (The visual decoder has its own export: `decoder_export.py`.)
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from components.llm.llama import LlamaLM
from components.multimodal import scatter_visual
from emu_lightning.data.layout.tokenizer import load_tokenizer
from emu_lightning.data.layout.tokens import SpecialIds
from emu_lightning.systems.lora import lora_layers, merged_state_dict

PARTS = ("encoder", "adapter", "regression_head")
_WEIGHT_PATHS = ("checkpoint_path", "pretrained_path", "pretrained")   # replaced by the exported weights


def export_model(system: nn.Module, folder: str | Path, specs: dict[str, dict]) -> Path:
    """Write `system`'s parts to `folder` (see the module docstring).

    Args:
        system: a trained `Stage2System` (or any system with encoder, adapter, llm, tokenizer; the head is
            optional).
        folder: output folder (created).
        specs: part → `{"class_path", "init_args"}` that built it: a run's `config.yaml` `model.init_args.<part>`.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    parts = [p for p in PARTS if hasattr(system, p)]
    missing = [p for p in parts if p not in specs]
    if missing:
        raise ValueError(f"specs has no class_path / init_args for parts {missing} (given: {sorted(specs)})")
    config: dict[str, Any] = {"parts": {}, "target_space": getattr(system, "target_space", None),
                              "num_image_tokens": system.adapter.num_tokens}
    if getattr(system, "template", None) is not None:   # a chat-tuned model keeps its chat template
        config["chat_template"] = dataclasses.asdict(system.template)
    for name in parts:
        spec = copy.deepcopy(specs[name])
        spec["init_args"] = {k: v for k, v in spec.get("init_args", {}).items() if k not in _WEIGHT_PATHS}
        config["parts"][name] = spec
        state = {k: v.detach().cpu().contiguous() for k, v in merged_state_dict(getattr(system, name)).items()}
        save_file(state, str(out / f"{name}.safetensors"))
    save_llm(system.llm, out / "llm")
    system.tokenizer.save_pretrained(str(out / "tokenizer"))
    (out / "emu_config.json").write_text(json.dumps(config, indent=2))
    return out


def save_llm(llm: LlamaLM, folder: Path) -> None:
    """`llm`'s transformers model as a plain `LlamaForCausalLM` folder; `policy.lora` factors merged (peft's merge,
    `merged_state_dict`), so `from_pretrained` needs no peft."""
    if not lora_layers(llm.model):
        llm.model.save_pretrained(str(folder), safe_serialization=True)
        return
    with torch.device("meta"):
        plain = type(llm.model)(llm.model.config)                  # the same architecture, no LoRA layers
    plain.load_state_dict(merged_state_dict(llm.model), strict=True, assign=True)
    plain.save_pretrained(str(folder), safe_serialization=True)


def _build(spec: dict) -> nn.Module:
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


class EmuModel(nn.Module):
    """The exported model outside Lightning: image → encoder → adapter → `<image>` rows → LLM → logits and
    regressed visual embeddings."""

    def __init__(self, encoder: nn.Module, adapter: nn.Module, llm: LlamaLM, regression_head: nn.Module | None,
                 tokenizer: Any, target_space: str | None):
        super().__init__()
        self.encoder, self.adapter, self.llm, self.regression_head = encoder, adapter, llm, regression_head
        self.tokenizer, self.ids, self.target_space = tokenizer, SpecialIds.from_tokenizer(tokenizer), target_space

    def encode_images(self, pixels: Tensor) -> Tensor:
        """(n,3,H,W) → (n,N,D_llm)."""
        return self.adapter(self.encoder(pixels))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor) -> dict[str, Tensor]:
        """(B,T) ids with `<image>` runs, (B,T) mask, (n,3,H,W) images in reading order → logits (B,T,V),
        hidden (B,T,D_llm) and, with a head, `regression` (B,T,D_tgt): the next visual embedding at each position."""
        visual = self.encode_images(pixel_values) if len(pixel_values) else pixel_values.new_zeros(
            0, self.adapter.num_tokens, self.llm.hidden_dim)
        embeds = scatter_visual(self.llm.embed(input_ids), input_ids, visual, self.ids.visual)   # (B,T,D_llm)
        hidden, _ = self.llm(embeds, attention_mask)
        out = {"hidden": hidden, "logits": self.llm.logits(hidden)}
        if self.regression_head is not None:
            out["regression"] = self.regression_head(hidden)
        return out


def load_exported(folder: str | Path) -> EmuModel:
    """Rebuild an exported folder as `EmuModel` (eval mode); every weight must match its part exactly."""
    folder = Path(folder)
    config = json.loads((folder / "emu_config.json").read_text())
    parts = {}
    for name, spec in config["parts"].items():
        module = _build(spec)
        state = load_file(str(folder / f"{name}.safetensors"))
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(f"{folder / f'{name}.safetensors'} does not match {spec['class_path']}: missing keys "
                               f"{result.missing_keys[:20]} ({len(result.missing_keys)}), unexpected keys "
                               f"{result.unexpected_keys[:20]} ({len(result.unexpected_keys)})")
        parts[name] = module
    llm = LlamaLM(pretrained_path=str(folder / "llm"))
    tokenizer = load_tokenizer(str(folder / "tokenizer"))
    return EmuModel(parts["encoder"], parts["adapter"], llm, parts.get("regression_head"), tokenizer,
                    config.get("target_space")).eval()


def main(argv: list[str] | None = None) -> None:
    import yaml

    from emu_lightning.inference.pipelines import load_system

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--ckpt", default=None, help="checkpoint (default: <run dir>/checkpoints/last.ckpt)")
    args = p.parse_args(argv)
    system = load_system(args.run_dir, args.ckpt)
    model_args = yaml.safe_load((args.run_dir / "config.yaml").read_text())["model"]["init_args"]
    out = export_model(system, args.out, {p: model_args[p] for p in PARTS if p in model_args})
    print(f"exported {type(system).__name__} to {out}")


if __name__ == "__main__":
    main()
