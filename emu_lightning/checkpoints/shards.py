"""Full-size weights without holding them twice: sharded safetensors, read through mmap into parts built empty.

A 37B Emu2 is 74 GB in bf16. Built the ordinary way, a process holds the randomly initialised parts and then the
loaded checkpoint beside them: about twice the model. Instead:
- `save_sharded` writes Hugging Face's layout, `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
  (`huggingface_hub.split_torch_state_dict_into_shards`), so no single file or write buffer is the whole model;
- `read_sharded` maps every shard (`safetensors.torch.load_file` mmaps the file: a tensor's bytes are read from
  disk when first touched, as page cache, not copied into the process);
- `empty_init()` builds parts with their parameters on the meta device (no memory; buffers such as RoPE tables stay
  real: `accelerate.init_empty_weights(include_buffers=False)`, as transformers' own loading does), and the stage
  hand-off (`handoff.load_parts`) then *assigns* the mapped tensors to such a part (`load_state_dict(assign=True)`):
  the parameters are the file's pages, nothing is copied;
- `materialize` then gives what the checkpoint did not hold (a fresh regression head, fresh LoRA factors) real
  memory and its own initialisation, as Lightning's `ModelParallelStrategy` and torchtitan do for meta-device init:
  `to_empty` + the module's `reset_parameters()` (peft's `reset_lora_parameters` for LoRA factors: A Kaiming, B = 0),
  and names every tensor that has neither. Under FSDP2 on several processes the hand-off and `materialize` run after
  the sharding (`PartsSystem.configure_model`): each rank assigns only its slice of each mapped tensor
  (`handoff.local_shard`) and initialises the fresh parts on its shards (docs/scale.md, "Full-size loading").

`main.py … --empty_init true` builds the recipe's model this way (`EmuCLI`, docs/converting.md "Full-size weights").
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

INDEX = "model.safetensors.index.json"


def save_sharded(state: dict[str, Tensor], folder: str | Path, max_shard_size: int | str = "2GB") -> Path:
    """Write `state` as safetensors shards of at most `max_shard_size` plus their index (one file and no index when
    it fits in one); returns the path to load: the index, or the single file."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for name, keys in split.filename_to_tensors.items():
        save_file({k: state[k].contiguous() for k in keys}, str(out / name))
    if not split.is_sharded:
        return out / next(iter(split.filename_to_tensors))
    (out / INDEX).write_text(json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename},
                                        indent=1))
    return out / INDEX


def read_sharded(path: str | Path) -> dict[str, Tensor]:
    """The state of a safetensors file, a shard index, or a folder holding either; every file is memory-mapped."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / INDEX if (path / INDEX).is_file() else next(iter(sorted(path.glob("*.safetensors"))), path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors weights at {path}")
    if path.suffix != ".json":
        return load_file(str(path), device="cpu")
    weight_map = json.loads(path.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path}: a JSON file without a `weight_map`: not a shard index")
    state: dict[str, Tensor] = {}
    for name in sorted(set(weight_map.values())):
        state.update(load_file(str(path.parent / name), device="cpu"))
    if state.keys() != weight_map.keys():
        raise ValueError(f"{path}: the shards hold {len(state)} tensors but the index lists {len(weight_map)}")
    return state


@contextmanager
def empty_init() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (shapes only); buffers stay real. Load them with
    `handoff.load_parts` (which assigns to a part on meta) before use."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def meta_tensors(module: nn.Module) -> list[str]:
    """Names of the module's parameters and buffers that are still on the meta device (not loaded)."""
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


def _own_meta(module: nn.Module) -> list[str]:
    return [n for n, t in chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
            if t.is_meta]


@torch.no_grad()
def materialize(parts: dict[str, nn.Module], device: str | torch.device = "cpu") -> dict[str, list[str]]:
    """Give every tensor of `parts` still on the meta device (what a hand-off into an empty build did not load)
    memory on `device` and its module's own initialisation: peft's `reset_lora_parameters` for a LoRA layer's
    factors (as peft initialises them: A Kaiming-uniform, B = 0), else the module's `reset_parameters()`.

    Returns part → the modules initialised (`regression_head.proj (Linear)`), for the log.

    Raises:
        ValueError: naming every part and tensor left on meta because its module has no `reset_parameters()`
            (e.g. transformers' `LlamaRMSNorm`): such a part must be loaded (init_from + handoff) or built normally.
    """
    from emu_lightning.systems.lora import lora_layers

    done: dict[str, list[str]] = {}
    stuck: list[str] = []
    for part, module in parts.items():
        for name, layer in lora_layers(module).items():
            for adapter in layer.lora_A:
                factors = (layer.lora_A[adapter], layer.lora_B[adapter])
                if any(_own_meta(f) for f in factors):
                    for f in factors:
                        f.to_empty(device=device)
                    layer.reset_lora_parameters(adapter, True)
                    done.setdefault(part, []).append(f"{part}.{name}.lora_{{A,B}}.{adapter}")
        for name, sub in module.named_modules():
            meta, where = _own_meta(sub), ".".join(filter(None, (part, name)))
            if not meta:
                continue
            sub.to_empty(device=device, recurse=False)   # memory; left uninitialised only where the run stops below
            if not callable(getattr(sub, "reset_parameters", None)):
                stuck += [f"{where}.{t}" for t in meta]
                continue
            sub.reset_parameters()
            done.setdefault(part, []).append(f"{where} ({type(sub).__name__})")
    if stuck:
        # (materialised first all the same: Lightning's teardown after this error cannot move meta tensors)
        raise ValueError(f"{len(stuck)} tensors are still on the meta device (built empty, not in init_from, and "
                         f"their module has no reset_parameters()): {stuck[:8]}; parts "
                         f"{sorted({s.split('.')[0] for s in stuck})}. Load them (init_from + "
                         "model.init_args.handoff) or run without --empty_init")
    return done
