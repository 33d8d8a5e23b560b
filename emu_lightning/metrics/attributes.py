"""Attribute accuracy on synthetic scenes as a torchmetrics Metric.

Per ground-truth object: is its color / shape / size / position (and all four) named right by the generated
caption; `count`: the caption mentions as many objects as the scene has. `pair_*` restricts the score to
objects whose color-shape pair is one of `HELDOUT_PAIRS` (never seen in training): a held-out scene also
holds ordinary objects, so only these figures measure compositional generalisation. Sums are tensor
states, so the metric syncs across processes.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from emu_lightning.data.synthetic.scenes import HELDOUT_PAIRS, Scene, object_hits, parse_caption

OBJECT_ATTRS = ("color", "shape", "size", "position", "all")
PAIR_ATTRS = ("color", "shape", "all")


class SceneAttributeAccuracy(Metric):
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name, n in (("hits", len(OBJECT_ATTRS)), ("pair_hits", len(PAIR_ATTRS))):
            self.add_state(name, torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("objects", "pair_objects", "count_ok", "captions"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, captions: list[str], scenes: list[Scene]) -> None:
        for caption, scene in zip(captions, scenes, strict=True):
            for obj, hit in zip(scene.objects, object_hits(caption, scene)):
                self.hits += torch.tensor([hit[k] for k in OBJECT_ATTRS], dtype=torch.float64, device=self.device)
                self.objects += 1
                if (obj.color, obj.shape) in HELDOUT_PAIRS:
                    self.pair_hits += torch.tensor([hit[k] for k in PAIR_ATTRS], dtype=torch.float64,
                                                   device=self.device)
                    self.pair_objects += 1
            self.count_ok += len(parse_caption(caption)) == len(scene.objects)
            self.captions += 1

    def compute(self) -> dict[str, Tensor]:
        out = {k: (self.hits[i] / self.objects).float() for i, k in enumerate(OBJECT_ATTRS)}
        out["count"] = (self.count_ok / self.captions).float()
        if self.pair_objects > 0:  # only sets with held-out pairs report them
            out |= {f"pair_{k}": (self.pair_hits[i] / self.pair_objects).float() for i, k in enumerate(PAIR_ATTRS)}
        return out
