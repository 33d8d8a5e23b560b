"""Sharding beside the model: FSDP wrap units and activation checkpointing from the components' `block_cls`.

Every component that repeats a block declares it (`encoder.block_cls`: the EVA block, `adapter.block_cls`: the
C-Former's T5 block, `llm.block_cls`: the Llama decoder layer, `unet.block_cls`: the decoder UNet's two, diffusers'
`ResnetBlock2D` and `BasicTransformerBlock`). A block is the unit of sharding (one all-gather
per block in forward and backward) and of activation checkpointing; the recipe names, per part, which parts
recompute their blocks. Two Lightning strategies read that:

- `EmuFSDPStrategy`: Lightning's `FSDPStrategy` (FSDP1, CUDA) with `auto_wrap_policy` = the blocks of every part
  and `activation_checkpointing_policy` = the blocks of the named parts. Frozen and trainable parameters mix in
  the root unit, which `use_orig_params=True` (Lightning's default) allows.
- `EmuModelParallelStrategy`: Lightning's `ModelParallelStrategy` with FSDP2 `fully_shard` per block and once on
  the whole system (`EmuSystem.configure_model` calls `configure_sharding`). Works on CPU with gloo, which is
  how the 2-process tests run. Each step is routed through the system's `forward` so the root unit gathers the
  parameters that sit outside any block (embeddings, `lm_head`, norms, the regression head, learned queries)
  for the whole step, as FSDP1's root does. A model built empty (`--empty_init true`) on several processes is
  sharded on the meta device, and the stage hand-off then gives each rank only its slice of the weights
  (`PartsSystem.configure_model`).

Under any other strategy `configure_sharding` does nothing.
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def block_units(parts: dict[str, nn.Module], names: list[str] | None = None) -> dict[str, list[nn.Module]]:
    """Part name → its block modules (instances of the part's `block_cls`, one class or a tuple of classes), for
    `names` (None = every part). A block nested in another block is not a unit of its own."""
    unknown = sorted(set(names or []) - set(parts))
    if unknown:
        raise ValueError(f"sharding names parts {unknown}, but the system's parts are {sorted(parts)}")
    out = {}
    for name, part in parts.items():
        cls = getattr(part, "block_cls", None)
        if (names is None or name in names) and cls is not None:
            classes = cls if isinstance(cls, tuple) else (cls,)
            blocks = [m for m in part.modules() if type(m) in classes]
            inner = {id(m) for b in blocks for m in b.modules() if m is not b}
            out[name] = [b for b in blocks if id(b) not in inner]
    return out


def _is_one_of(modules: list[nn.Module]):
    ids = {id(m) for m in modules}
    return lambda module: id(module) in ids


class EmuFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP (FSDP1) wrapping each block of every part; activation checkpointing per part.

    Args:
        activation_checkpointing_parts: parts whose blocks recompute activations in backward (e.g. [encoder, llm]).
        **kwargs: `FSDPStrategy` arguments (sharding_strategy, state_dict_type, cpu_offload, ...); its
            `auto_wrap_policy` and `activation_checkpointing_policy` are set here from the parts.
    """

    def __init__(self, activation_checkpointing_parts: list[str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.activation_checkpointing_parts = list(activation_checkpointing_parts or [])

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp.wrap import CustomPolicy

        parts = self.lightning_module.parts
        blocks = [m for ms in block_units(parts).values() for m in ms]
        checkpointed = [m for ms in block_units(parts, self.activation_checkpointing_parts).values() for m in ms]
        # Policies by module identity, not class: a part's blocks are checkpointed only when the recipe names it.
        self.kwargs["auto_wrap_policy"] = CustomPolicy(_is_one_of(blocks))
        self._activation_checkpointing_kwargs = {"check_fn": _is_one_of(checkpointed)} if checkpointed else {}
        counts = ", ".join(f"{k}: {len(v)}" for k, v in block_units(parts).items())
        rank_zero_info(f"FSDP: {len(blocks)} block units ({counts}); "
                       f"activation checkpointing on {self.activation_checkpointing_parts or 'no part'}")
        return super()._setup_model(model)


class EmuModelParallelStrategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` with FSDP2 over the data-parallel mesh, configured per part.

    Args:
        activation_checkpointing_parts: parts whose blocks recompute activations in backward.
        param_dtype: FSDP2 mixed precision: dtype of gathered parameters and compute (`bfloat16`); None = as stored.
        reduce_dtype: dtype of the gradient reduce-scatter (float32 keeps bf16 training exact in the reduction).
        reshard_after_forward: free gathered block parameters after forward (ZeRO-3) or keep them (ZeRO-2).
        **kwargs: `ModelParallelStrategy` arguments (data_parallel_size, tensor_parallel_size,
            save_distributed_checkpoint, process_group_backend, timeout).
    """

    def __init__(self, activation_checkpointing_parts: list[str] | None = None, param_dtype: str | None = None,
                 reduce_dtype: str | None = "float32", reshard_after_forward: bool = True, **kwargs: Any):
        super().__init__(**{"data_parallel_size": "auto", "tensor_parallel_size": 1, **kwargs})
        self.activation_checkpointing_parts = list(activation_checkpointing_parts or [])
        for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name}={value!r}; expected one of {sorted(DTYPES)} or null")
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Data parallel over every process (the parent's "auto" means one replica per node, for 2D parallelism).
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def _through_forward(self, method: str, *args: Any, **kwargs: Any) -> Any:
        # The system is the FSDP2 root: calling it (not the bare method) runs the root's gather / reshard hooks.
        return self._forward_redirection(self.lightning_module, self.lightning_module, method, *args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.train_step_context():
            return self._through_forward("training_step", *args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return self._through_forward("validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return self._through_forward("test_step", *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self._through_forward("predict_step", *args, **kwargs)


def configure_sharding(system: Any) -> None:
    """FSDP2-shard `system` (an `EmuSystem` / `PartsSystem`) when it runs under `EmuModelParallelStrategy`.

    Order (as torchtitan): activation checkpointing wraps the chosen blocks, then `fully_shard` makes each block
    (or its checkpoint wrapper) a unit, then the whole system the root unit holding everything else.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper, apply_activation_checkpointing, checkpoint_wrapper)
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    strategy = system._trainer.strategy if system._trainer is not None else None
    if not isinstance(strategy, ModelParallelStrategy):
        return
    if not isinstance(strategy, EmuModelParallelStrategy):
        raise TypeError(f"{type(strategy).__name__}: use emu_lightning.systems.sharding.EmuModelParallelStrategy, "
                        "which routes each step through the sharded root module")
    if isinstance(system, FSDPModule):
        return  # already sharded (configure_model runs again for validate / test after fit)
    mesh = system.device_mesh["data_parallel"]
    units = block_units(system.parts)
    checkpointed = [m for ms in block_units(system.parts, strategy.activation_checkpointing_parts).values() for m in ms]
    if checkpointed:
        apply_activation_checkpointing(system, checkpoint_wrapper_fn=checkpoint_wrapper,
                                       check_fn=_is_one_of(checkpointed))
    wrapped = {id(m._checkpoint_wrapped_module): m for m in system.modules() if isinstance(m, CheckpointWrapper)}
    mp = MixedPrecisionPolicy(param_dtype=DTYPES.get(strategy.param_dtype),
                              reduce_dtype=DTYPES.get(strategy.reduce_dtype))
    for blocks in units.values():
        for block in blocks:
            fully_shard(wrapped.get(id(block), block), mesh=mesh, mp_policy=mp,
                        reshard_after_forward=strategy.reshard_after_forward)
    fully_shard(system, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    rank_zero_info(f"FSDP2 over {mesh.size()} processes: {', '.join(f'{k} {len(v)} blocks' for k, v in units.items())}"
                   f" + root; activation checkpointing on {strategy.activation_checkpointing_parts or 'no part'}; "
                   f"param dtype {strategy.param_dtype or 'as stored'}")
