"""One stage-2 training step per GPU: memory by kind and phase, FLOPs, time, the largest micro-batch that fits.

Memory per GPU = states + activations + what the sharding gathers:
- states (per parameter): weights (4 bytes under fp32 and bf16-mixed, whose master weights stay float32; 2 under
  bf16-true), gradients of what trains (float32 under fp32 and bf16-mixed, which FSDP reduces in bf16 and keeps as
  a float32 shard), AdamW's two moments (the weights' dtype); FULL_SHARD divides all three by the world size;
- replicated (no FSDP): one weight matrix's fresh gradient before it is added into `.grad`, and under bf16-mixed
  autocast's bf16 copy of every trainable weight (cached for the step);
- gathered (FSDP): the unit being computed and the one prefetched (2 × the largest block, in the compute dtype), the
  root unit (everything outside a block: embeddings, `lm_head`, norms, adapter projection, head), which FSDP1 keeps
  gathered from forward to backward, and one block's unsharded gradient before its reduce-scatter;
- activations (per sample × micro-batch, `costs.py`): the largest of four phases: the frozen encoder's `no_grad`
  forward; the end of forward (everything saved, the step's locals, the logits); the cross-entropy backward; the
  backward of a checkpointed block (what is still saved, one block recomputed, its input / output gradients).
Gradients are counted for the whole step (an upper bound: they appear during backward).
Not modelled: the CUDA context, NCCL buffers and allocator fragmentation (`headroom` in `fit`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from emu_lightning.capacity import costs
from emu_lightning.systems.sharding import block_units

# precision → (bytes of stored weights, gradients, each AdamW moment, gathered / computed weights, activations)
PRECISION = {"32-true": (4, 4, 4, 4, 4), "32": (4, 4, 4, 4, 4), "bf16-mixed": (4, 4, 4, 2, 2),
             "16-mixed": (4, 4, 4, 2, 2), "bf16-true": (2, 2, 2, 2, 2)}


@dataclass
class Workload:
    """One sample: `tokens` T (after padding), `images` n through the encoder, `regressed` P positions."""

    tokens: int
    images: float
    regressed: float

    @classmethod
    def of_batch(cls, system, batch: dict) -> Workload:
        """A collated stage-2 batch's sample, averaged over its rows: every `<image>` row of a regressed image is
        regressed (the papers' autoregressive head), and under `target_space='adapter'` its `[/IMG]` too."""
        rows, T = batch["input_ids"].shape
        regressed = int(batch["regress_images"].sum())
        per_image = system.num_image_tokens + (system.target_space == "adapter" and system.regression_head.feeds_back)
        return cls(tokens=T, images=len(batch["pixel_values"]) / rows, regressed=regressed * per_image / rows)


@dataclass
class Layout:
    """How the step runs: `world` GPUs, FSDP FULL_SHARD or replicated, the checkpointed parts, the precision."""

    world: int = 1
    fsdp: bool = False
    checkpointed: list[str] = field(default_factory=list)
    precision: str = "32-true"

    def __post_init__(self) -> None:
        if self.precision not in PRECISION:
            raise ValueError(f"precision={self.precision!r}; the planner knows {sorted(PRECISION)}")
        if self.world < 1:
            raise ValueError(f"world={self.world}; expected at least 1 GPU")


@dataclass
class Step:
    """A planned step, per GPU, for a micro-batch of `batch` samples (bytes and FLOPs)."""

    batch: int
    params: dict[str, dict[str, int]]
    weights: float
    grads: float
    optimizer: float
    gathered: float
    activations_per_sample: float
    activations: float
    phases: dict[str, float]
    flops_per_sample: dict[str, float]
    recompute_flops_per_sample: float

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.optimizer + self.gathered

    @property
    def total(self) -> float:
        return self.states + self.activations


def _numel(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def part_costs(system, work: Workload, a: int) -> tuple[dict[str, costs.PartCost], float]:
    """Part name → its per-sample cost ("llm" split into layers and "llm_root"); and the cross-entropy backward
    bytes. Raises for a system whose parts the model does not know."""
    trains = set(system.policy.trainable)
    enc, adapter, llm, reg = system.encoder, system.adapter, system.llm, getattr(system, "regression_head", None)
    if reg is None or "encoder" in trains:
        raise ValueError(f"{type(system).__name__}: the planner models stage-2 systems (frozen encoder, a regression "
                         f"head); this one trains {sorted(trains)}")
    out = {}
    known = {costs.EVAEncoder: "encoder", costs.MeanPoolProjector: "adapter", costs.CFormer: "adapter",
             costs.LlamaLM: "llm", costs.ProjectionHead: "regression_head"}
    for name, part in (("encoder", enc), ("adapter", adapter), ("llm", llm), ("regression_head", reg)):
        if not any(isinstance(part, cls) for cls, role in known.items() if role == name):
            raise ValueError(f"{name}: the planner has no cost model for {type(part).__name__}; it knows "
                             f"{sorted(c.__name__ for c, r in known.items() if r == name)}")
    out["encoder"] = costs.eva(enc, work.images, a)
    if isinstance(adapter, costs.CFormer):
        out["adapter"] = costs.cformer(adapter, work.images, enc.num_tokens, a, "adapter" in trains)
    else:
        out["adapter"] = costs.meanpool(adapter, work.images, a, "adapter" in trains)
    out["llm"], out["llm_root"] = costs.llama(llm, work.tokens, a, "llm" in trains, "adapter" in trains)
    out["regression_head"] = costs.head(reg, work.regressed, a, "regression_head" in trains)
    return out, costs.cross_entropy_backward(llm, work.tokens)


def plan_step(system, work: Workload, layout: Layout, batch: int = 1) -> Step:
    """The memory and FLOPs of one training step of `system` (built on any device, meta included)."""
    w_b, g_b, m_b, c_b, a = PRECISION[layout.precision]
    parts = system.parts
    params = {name: {"total": _numel(p), "trainable": _numel(p, True)} for name, p in parts.items()}
    P = sum(v["total"] for v in params.values())
    P_t = sum(v["trainable"] for v in params.values())
    shard = layout.world if layout.fsdp else 1
    weights, grads, optimizer = w_b * P / shard, g_b * P_t / shard, 2 * m_b * P_t / shard
    units = block_units(parts)
    if layout.fsdp:
        biggest = max((_numel(b) for blocks in units.values() for b in blocks), default=0)
        biggest_trained = max((_numel(b) for name, blocks in units.items() if name in system.policy.trainable
                               for b in blocks), default=0)
        root = P - sum(_numel(b) for blocks in units.values() for b in blocks)
        gathered = c_b * (2 * biggest + root + biggest_trained)
    else:
        # A weight's new gradient before it is added into its `.grad`; under bf16-mixed autocast's bf16 copy of
        # every trainable weight, cached for the step.
        matrices = [m.weight.numel() for m in system.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
        gathered = g_b * max(matrices, default=0) + (2 * P_t if layout.precision in ("bf16-mixed", "16-mixed") else 0)
    c, ce_backward = part_costs(system, work, a)
    ac = set(layout.checkpointed)
    unknown = ac - set(parts)
    if unknown:
        raise ValueError(f"checkpointed parts {sorted(unknown)} are not parts of {type(system).__name__} "
                         f"({sorted(parts)})")
    kept = {k: (v.boundary if k in ac else v.saved) for k, v in c.items()}
    saved = sum(kept.values())
    local = sum(v.locals for v in c.values())
    phases = {"encoder_forward": c["encoder"].transient,
              "forward_end": saved + local + c["llm_root"].transient,
              "loss_backward": saved + ce_backward}
    for name in sorted(k for k in ac if c.get(k) and c[k].block):
        # Backward reaches this part's blocks once the loss and head are done: their saved rows are freed; one
        # block is recomputed and its activation gradients are live.
        phases[f"{name}_block_backward"] = (saved - kept["llm_root"] - kept["regression_head"] + c[name].block
                                            + c[name].grad_rows)
    per_sample = max(phases.values())
    flops = {k: v.fwd_flops + v.bwd_flops for k, v in c.items()}
    flops["llm"] += flops.pop("llm_root")
    recompute = sum(c[k].fwd_flops for k in ac if k in c)
    return Step(batch=batch, params=params, weights=weights, grads=grads, optimizer=optimizer, gathered=gathered,
                activations_per_sample=per_sample, activations=batch * per_sample,
                phases={k: batch * v for k, v in phases.items()}, flops_per_sample=flops,
                recompute_flops_per_sample=recompute)


def largest_batch(system, work: Workload, layout: Layout, memory: float, headroom: float = 0.1,
                  limit: int = 4096) -> int:
    """The largest micro-batch whose planned memory fits in `memory` bytes less `headroom` (a fraction kept for
    the CUDA context, communication buffers and fragmentation); 0 when not even one sample fits."""
    budget = memory * (1 - headroom)
    one = plan_step(system, work, layout, 1)
    if one.total > budget:
        return 0
    return min(limit, int((budget - one.states) // one.activations_per_sample))
