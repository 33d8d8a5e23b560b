"""Attribute accuracy on synthetic scenes as a torchmetrics Metric: the fraction of ground-truth objects whose
color / shape / size / position (and all four) a generated caption names right, plus `count` (the caption
mentions as many objects as the scene has). Sums are tensor states, so it syncs across processes."""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from emu_lightning.data.synthetic import Scene, attribute_accuracy

OBJECT_ATTRS = ("color", "shape", "size", "position", "all")


class SceneAttributeAccuracy(Metric):
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("hits", torch.zeros(len(OBJECT_ATTRS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("objects", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count_ok", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("captions", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, captions: list[str], scenes: list[Scene]) -> None:
        for caption, scene in zip(captions, scenes, strict=True):
            acc = attribute_accuracy([caption], [scene])  # per-object fractions of this one scene
            n = len(scene.objects)
            self.hits += torch.tensor([acc[k] * n for k in OBJECT_ATTRS], dtype=torch.float64, device=self.hits.device)
            self.objects += n
            self.count_ok += acc["count"]
            self.captions += 1

    def compute(self) -> dict[str, Tensor]:
        out = {k: (self.hits[i] / self.objects).float() for i, k in enumerate(OBJECT_ATTRS)}
        out["count"] = (self.count_ok / self.captions).float()
        return out
