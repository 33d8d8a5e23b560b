"""StagePolicy: what a stage trains and at which learning rate (docs/design.md §3), stated once in the recipe.

Freezing, optimizer parameter groups and the trainable-parameter audit all read this one object. A trainable part
may train LoRA factors only (`lora`, Emu-I's setting; `lora.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from emu_lightning.systems.lora import LoraSpec, add_lora


@dataclass
class StagePolicy:
    """Per-stage training policy.

    Args:
        trainable: names of the system's parts that train; every other part is frozen.
        lr: peak learning rate per trainable part (every trainable part needs one).
        weight_decay: AdamW decay for matrices; biases, norms and 1-d parameters get none.
        lora: trainable parts that train LoRA factors only, with their `LoraSpec`
            (`{llm: {r: 16, alpha: 16, dropout: 0.05, target_modules: [q_proj, k_proj, v_proj, o_proj]}}`);
            the rest of such a part is frozen, and an export merges the factors (`lora.merged_state_dict`).
    """

    trainable: list[str] = field(default_factory=lambda: ["encoder", "adapter", "llm"])
    lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.05
    lora: dict[str, LoraSpec] = field(default_factory=dict)

    def check(self, parts: dict[str, nn.Module]) -> None:
        unknown = sorted(set(self.trainable) - set(parts))
        if unknown:
            raise ValueError(f"policy.trainable names {unknown}, but the system's parts are {sorted(parts)}")
        no_lr = [n for n in self.trainable if n not in self.lr]
        if no_lr:
            raise ValueError(f"policy.lr has no learning rate for trainable parts {no_lr}")
        extra = sorted(set(self.lr) - set(self.trainable))
        if extra:
            raise ValueError(f"policy.lr sets a learning rate for {extra}, which policy.trainable freezes")
        unknown = sorted(set(self.lora) - set(parts))
        if unknown:
            raise ValueError(f"policy.lora names {unknown}, but the system's parts are {sorted(parts)}")
        frozen = sorted(set(self.lora) - set(self.trainable))
        if frozen:
            raise ValueError(f"policy.lora adapts {frozen}, which policy.trainable freezes: a LoRA part trains its "
                             f"factors, so list it in trainable (with its lr)")

    def apply(self, parts: dict[str, nn.Module]) -> None:
        """Freeze every part not in `trainable` (requires_grad False; kept in eval mode by the system), and give
        each `lora` part its LoRA layers (only their factors train).

        Other trainable parts are left as built: a component frozen by its own flag stays frozen, and the
        trainable-parameter audit then stops the run rather than silently unfreezing it.
        """
        self.check(parts)
        for name, module in parts.items():
            if name not in self.trainable:
                # eval(): Lightning's fit never calls module.train(), it only restores the modes it found,
                # so a frozen part put in eval here keeps dropout / drop-path off for the whole run.
                module.requires_grad_(False).eval()
        for name, spec in self.lora.items():
            add_lora(parts[name], spec if isinstance(spec, LoraSpec) else LoraSpec(**spec), name)

    def param_groups(self, parts: dict[str, nn.Module]) -> list[dict]:
        """One decay and one no-decay group per trainable part, each tagged with its part name."""
        groups = []
        for name in self.trainable:
            params = [(n, p) for n, p in parts[name].named_parameters() if p.requires_grad]
            decay = [p for n, p in params if p.ndim >= 2]
            no_decay = [p for n, p in params if p.ndim < 2]
            for ps, wd, suffix in ((decay, self.weight_decay, ""), (no_decay, 0.0, ".no_decay")):
                if ps:
                    groups.append({"params": ps, "lr": self.lr[name], "weight_decay": wd, "name": name + suffix})
        return groups
