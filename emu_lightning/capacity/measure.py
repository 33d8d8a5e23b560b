"""What the capacity model is checked against: the bytes of live tensors through a training step, and the FLOPs
`torch.utils.flop_counter.FlopCounterMode` counts. Works on any device (the CPU included, where no allocator
statistics exist); on CUDA, `torch.cuda.max_memory_allocated` measures the same and more (the allocator's rounding).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Within the mode, the bytes of every tensor storage an op creates, until it is freed; `peak` is the most
    alive at once. Storages that exist before (`existing`: weights, gradients, optimizer states, the batch) are
    not counted, so `peak` is what the step adds on top of its states. Views share their base's storage."""

    def __init__(self, existing: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, Any] = {t.untyped_storage()._cdata: None for t in existing}

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._alive.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._alive:
                    nbytes = storage.nbytes()
                    self._alive[key] = weakref.finalize(storage, self._free, key, nbytes)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


def state_tensors(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[Tensor]:
    """Weights, buffers, gradients and optimizer states of `module`: the step's states."""
    out = [*module.parameters(), *module.buffers(), *(p.grad for p in module.parameters() if p.grad is not None)]
    if optimizer is not None:
        out += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor) and v.dim()]
    return out


def nbytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages among `tensors`."""
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())


def measure_step(loss_fn: Callable[[], Tensor], module: nn.Module, optimizer: torch.optim.Optimizer,
                 extra: Iterable[Tensor] = ()) -> dict[str, int]:
    """One warm-up step (the optimizer allocates its moments; gradients stay allocated, zeroed, as the capacity
    model counts them), then one measured step: {"states": bytes of weights + buffers + gradients + moments,
    "activations": the most bytes the step adds at once, "total"}. `extra` = the batch's tensors."""
    def step() -> None:
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    step()
    states = state_tensors(module, optimizer)
    with LiveBytes([*states, *extra]) as live:
        step()
    return {"states": nbytes(states), "activations": live.peak, "total": nbytes(states) + live.peak}


def count_flops(loss_fn: Callable[[], Tensor], module: nn.Module) -> int:
    """Matrix-product FLOPs of one forward + backward, attention included: the math SDPA backend runs so that the
    counter sees Q·Kᵀ and A·V (it has no formula for the CPU flash kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        loss_fn().backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()
