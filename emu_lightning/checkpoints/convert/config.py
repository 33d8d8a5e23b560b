"""The release's config files (`--config`): the sizes the weights cannot give, and the sizes they must agree with.

Attention head counts are not in any weight shape, so the converters take them from a flag (`--vision-heads`,
`--llm-heads`, `--t5-heads`) or from the config files the release ships beside its weights (docs/converting.md):
- a transformers LLaMA `config.json` (`Emu1/models/llama_config/config.json`, `Emu2/emu/conf/llama_config/config.json`
  in baaivision/Emu): `num_attention_heads`, `hidden_size`, `num_hidden_layers`, `intermediate_size`,
  `max_position_embeddings`, `rms_norm_eps`, `rope_theta` when present;
- an Emu model config with a `vision_cfg` block (`Emu1/models/Emu-14B.json`; Emu2 keeps the same fields in the
  Python dataclass `Emu2/emu/conf/emu_conf.py` `CLIPVisionCfg`, which may be written out as JSON): `width`,
  `head_width` (heads = width / head_width, as `Emu1/models/model.py` and `Emu2/emu/emu.py` compute them), `layers`,
  `image_size`, `patch_size`, Emu2's `n_query`, and Emu1's `vladapter_cfg.n_causal`;
- a T5 config (`"model_type": "t5"`; Emu1's C-Former is t5-base, `Emu1/models/causal_former.py`): `num_heads`,
  `d_model`, `num_decoder_layers`, `d_ff`.

A flag given together with a config that states the same number must agree with it; every size a config states
is checked against the weights. Each error names the flag or the file and field, and both numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from emu_lightning.checkpoints.convert.common import ConversionError

# our name → field, per kind of config file
LLAMA = {"llm_heads": "num_attention_heads", "llm_hidden": "hidden_size", "llm_layers": "num_hidden_layers",
         "llm_ffn": "intermediate_size", "llm_positions": "max_position_embeddings", "llm_norm_eps": "rms_norm_eps",
         "rope_theta": "rope_theta"}
VISION = {"vision_width": "width", "vision_layers": "layers", "image_size": "image_size", "patch_size": "patch_size",
          "n_query": "n_query"}
T5 = {"t5_heads": "num_heads", "t5_width": "d_model", "t5_layers": "num_decoder_layers", "t5_ffn": "d_ff"}


@dataclass(frozen=True)
class Stated:
    """One number a config file states, and where: `origin` reads like `config.json: num_attention_heads`."""

    value: float
    origin: str


def read_configs(paths: list[str] | tuple[str, ...]) -> dict[str, Stated]:
    """Every size the given config files state, by our name (`llm_heads`, `vision_heads`, `image_size`, ...).

    A file that states none of the known fields, or two files that state one size differently, is an error."""
    stated: dict[str, Stated] = {}
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--config {path}: no such file (a release config JSON, e.g. "
                                    f"llama_config/config.json)")
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"--config {path}: not JSON ({e})") from e
        found = _fields(cfg, p.name)
        if not found:
            raise ConversionError(f"--config {path}: none of the known fields (a LLaMA config's num_attention_heads, "
                                  f"an Emu config's vision_cfg, a T5 config's num_heads); top-level keys: "
                                  f"{sorted(cfg)[:20] if isinstance(cfg, dict) else type(cfg).__name__}")
        for name, s in found.items():
            if name in stated and stated[name].value != s.value:
                raise ConversionError(f"--config: {stated[name].origin} = {stated[name].value:g} but "
                                      f"{s.origin} = {s.value:g}")
            stated[name] = s
    return stated


def _fields(cfg: object, name: str) -> dict[str, Stated]:
    if not isinstance(cfg, dict):
        return {}
    out: dict[str, Stated] = {}
    if cfg.get("model_type") == "t5":
        out.update({ours: Stated(cfg[f], f"{name}: {f}") for ours, f in T5.items() if f in cfg})
    elif "num_attention_heads" in cfg:
        out.update({ours: Stated(cfg[f], f"{name}: {f}") for ours, f in LLAMA.items() if f in cfg})
    vision = cfg.get("vision_cfg")
    if isinstance(vision, dict):
        out.update({ours: Stated(vision[f], f"{name}: vision_cfg.{f}") for ours, f in VISION.items() if f in vision})
        if "width" in vision and "head_width" in vision:
            out["vision_heads"] = Stated(vision["width"] // vision["head_width"],
                                         f"{name}: vision_cfg.width / head_width = {vision['width']} / "
                                         f"{vision['head_width']}")
        adapter = cfg.get("vladapter_cfg")
        if isinstance(adapter, dict) and "n_causal" in adapter:
            out["n_causal"] = Stated(adapter["n_causal"], f"{name}: vladapter_cfg.n_causal")
    return out


def choose(flag: str, given: int | None, stated: dict[str, Stated], name: str, default: int,
           why: str) -> tuple[int, str]:
    """A head count: the flag, else the config, else the release's default; and where it came from (for errors).

    `why` names the default (`LLaMA-33B`). A flag and a config that disagree is an error naming both."""
    s = stated.get(name)
    if given is not None:
        if s is not None and int(s.value) != given:
            raise ConversionError(f"{flag} {given} disagrees with --config {s.origin} = {s.value:g}")
        return given, f"{flag} {given}"
    if s is not None:
        return int(s.value), f"--config {s.origin} = {s.value:g}"
    return default, f"the default {flag} {default} ({why}; pass {flag} or --config)"


def agree(stated: dict[str, Stated], measured: dict[str, tuple[float, str]], source: str) -> None:
    """Every size a config states must be the one the weights have: `measured` maps our name → (value, what shows
    it: a weight key's shape, or a fixed property of our components)."""
    bad = [f"{stated[n].origin} = {stated[n].value:g} but {where} is {v:g}"
           for n, (v, where) in measured.items() if n in stated and stated[n].value != v]
    if bad:
        raise ConversionError(f"{source}: --config disagrees with the weights: " + "; ".join(bad))
