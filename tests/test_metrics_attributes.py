"""SceneAttributeAccuracy agrees with attribute_accuracy and isolates the held-out color-shape pairs."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from emu_lightning.data.synthetic.scenes import HELDOUT_PAIRS, SyntheticCaptions, attribute_accuracy, describe_scene
from emu_lightning.metrics.attributes import SceneAttributeAccuracy


def _items(split, n=40):
    ds = SyntheticCaptions(split=split, size=n, image_size=32)
    return [ds[i] for i in range(n)]


def test_metric_matches_attribute_accuracy_over_batches():
    items = _items("val")
    caps = [it["captions"][i % 5] if i % 3 else "a small red circle at the top." for i, it in enumerate(items)]
    scenes = [it["scene"] for it in items]
    metric = SceneAttributeAccuracy()
    for k in range(0, len(items), 7):
        metric.update(caps[k:k + 7], scenes[k:k + 7])
    got = metric.compute()
    ref = attribute_accuracy(caps, scenes)
    for k, v in ref.items():
        assert got[k].item() == pytest.approx(v), k
    assert "pair_shape" not in got  # val holds no held-out pair


def test_pair_accuracy_scores_only_heldout_objects():
    items = _items("heldout")
    scenes = [it["scene"] for it in items]
    # Captions right about every ordinary object but naming each held-out object with a wrong shape.
    wrong = {shape: next(s for c, s in HELDOUT_PAIRS if s != shape) for _, shape in HELDOUT_PAIRS}
    caps = [describe_scene(replace(s, objects=tuple(
        replace(o, shape=wrong[o.shape]) if (o.color, o.shape) in HELDOUT_PAIRS else o for o in s.objects)))
        for s in scenes]
    metric = SceneAttributeAccuracy()
    metric.update(caps, scenes)
    out = metric.compute()
    n_pair = sum((o.color, o.shape) in HELDOUT_PAIRS for s in scenes for o in s.objects)
    n_all = sum(len(s.objects) for s in scenes)
    assert 0 < n_pair < n_all
    assert out["pair_shape"].item() == 0.0 and out["pair_color"].item() == 1.0
    assert out["shape"].item() == pytest.approx(1 - n_pair / n_all)
    assert torch.isfinite(out["all"])
