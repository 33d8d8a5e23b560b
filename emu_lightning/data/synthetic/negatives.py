"""Hard negative captions for contrastive training on synthetic scenes (NegCLIP, Yuksekgonul et al. 2023,
"When and why vision-language models behave like bags-of-words", arXiv:2210.01936).

In a batch of 64 scenes, colours and positions alone tell nearly every caption apart, so an in-batch contrastive
loss barely needs shape. A caption of the same scene with one object's shape changed differs from the true one in
shape only: ranking the true caption above it needs the image's shapes (docs/encoder_pretraining.md).
"""
from __future__ import annotations

import random
from dataclasses import replace

from emu_lightning.data.synthetic.text import HELDOUT_PAIRS, SHAPES, Scene, make_captions


def shape_swapped(scene: Scene, rng: random.Random) -> Scene:
    """`scene` with one object's shape changed to another; never into a held-out colour-shape pair (training text
    must not name one)."""
    i = rng.randrange(len(scene.objects))
    obj = scene.objects[i]
    shapes = [s for s in SHAPES if s != obj.shape and (obj.color, s) not in HELDOUT_PAIRS]
    objects = (*scene.objects[:i], replace(obj, shape=rng.choice(shapes)), *scene.objects[i + 1:])
    return replace(scene, objects=objects)


def shape_negative_captions(scenes: list[Scene], rng: random.Random) -> list[str]:
    """One caption per scene of its shape-swapped twin, in a random frame and form like the references."""
    return [make_captions(shape_swapped(s, rng), rng, n=1)[0] for s in scenes]
