"""Edit items of the shape world: a source scene, an edit instruction and the edited target scene.

The synthetic stand-in for Emu2-Gen's in-context generation (Emu2, arXiv:2312.13286, §"in-context generation":
an image in the prompt plus an instruction, and the model draws the changed picture). `SyntheticGen` serves them as
its `edit` kind: the source image is the instruction's reference, at its literal `<image>`, e.g.
"<image> the same shape in blue." (docs/generation_heads.md, "In-context generation: edit items").

Kinds (`EDIT_KINDS`), each changing exactly one thing:
- `recolor`, `reshape`, `move`, `resize`: a one-object source; the instruction says what changes and "the same" for
  the rest ("the same shape in blue.", "the same color, as a star.", "the same object at the top left.",
  "the same object, but small.");
- `add`: a one-object source, plus a second object named in full ("the same picture with a small red circle at the
  top left added.");
- `remove`: a two-object source with different color-shape pairs, minus the one named ("the same picture without
  the red circle.").

Splits: the target lies in the split (`in_split`). Outside `heldout` the source holds no held-out pair either. In
`heldout` the target holds one: made by the edit itself for `recolor`, `reshape` and `add` (a compositional edit:
the source is an ordinary scene), carried over from the source for `move`, `resize` and `remove`.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import NamedTuple

from emu_lightning.data.synthetic.scenes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    in_split,
    place,
)
from emu_lightning.data.synthetic.text import describe_object, has_heldout_pair, loc_phrase

__all__ = ["EDIT_KINDS", "Edit", "make_edit", "place_edit"]

EDIT_KINDS: tuple[str, ...] = ("recolor", "reshape", "move", "resize", "add", "remove")
_MAX_TRIES = 2000   # rejection sampling; a heldout recolor accepts about 1 draw in 6, a val edit 1 in 12
_CARRIES_PAIR = ("move", "resize", "remove")   # heldout: the held-out pair comes from the source


class Edit(NamedTuple):
    """One edit: its kind, both scenes and the instruction that follows the source's ``<image>``."""

    kind: str
    source: Scene
    target: Scene
    text: str


def _obj(rng: random.Random, position: str | None = None) -> Obj:
    return Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)),
               position or rng.choice(POSITIONS))


def _other(rng: random.Random, values, old: str) -> str:
    return rng.choice([v for v in values if v != old])


def _draw(kind: str, rng: random.Random) -> Edit:
    """One candidate edit of ``kind`` (split rules not yet applied)."""
    background = rng.choice(list(BACKGROUNDS))
    old = _obj(rng)
    if kind == "recolor":
        new = replace(old, color=_other(rng, COLORS, old.color))
        text = f"the same shape in {new.color}."
    elif kind == "reshape":
        new = replace(old, shape=_other(rng, SHAPES, old.shape))
        text = f"the same color, as a {new.shape}."
    elif kind == "move":
        new = replace(old, position=_other(rng, POSITIONS, old.position))
        text = f"the same object {loc_phrase(new.position)}."
    elif kind == "resize":
        new = replace(old, size=_other(rng, SIZES, old.size))
        text = f"the same object, but {new.size}."
    elif kind == "add":
        new = _obj(rng, _other(rng, POSITIONS, old.position))
        return Edit(kind, _scene([old], background), _scene([old, new], background),
                    f"the same picture with {describe_object(new)} added.")
    elif kind == "remove":
        keep = _obj(rng, _other(rng, POSITIONS, old.position))
        if (keep.color, keep.shape) == (old.color, old.shape):   # "the red circle" must name one object
            keep = replace(keep, shape=_other(rng, SHAPES, old.shape))
        return Edit(kind, _scene([old, keep], background), _scene([keep], background),
                    f"the same picture without the {old.color} {old.shape}.")
    else:
        raise ValueError(f"edit kind {kind!r}; expected one of {EDIT_KINDS}")
    return Edit(kind, _scene([old], background), _scene([new], background), text)


def _scene(objects: list[Obj], background: str) -> Scene:
    return Scene(tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position))), background)


def _fits(edit: Edit, split: str) -> bool:
    if not in_split(edit.target, split):
        return False
    if split != "heldout":
        return not has_heldout_pair(edit.source.objects)
    # Compositional edits: the held-out pair is the edit's own doing, never in the source.
    return edit.kind in _CARRIES_PAIR or not has_heldout_pair(edit.source.objects)


def make_edit(kind: str, split: str, rng: random.Random) -> Edit:
    """A random edit of ``kind`` whose target lies in ``split`` (rejection-sampled; module docstring for the rules).

    Args:
        kind: one of ``EDIT_KINDS``.
        split: one of ``SPLITS``.
        rng: the item's generator; the same state gives the same edit.
    """
    if kind not in EDIT_KINDS:
        raise ValueError(f"edit kind {kind!r}; expected one of {EDIT_KINDS}")
    for _ in range(_MAX_TRIES):
        edit = _draw(kind, rng)
        if _fits(edit, split):
            return edit
    raise RuntimeError(f"no {split!r} {kind} edit after {_MAX_TRIES} tries")


def place_edit(edit: Edit, seed: int) -> tuple[list, list, int]:
    """Where source and target are drawn: ``(source placed, target placed, noise seed)`` for `render_placed`.

    An object the edit leaves in its cell at its size keeps the source's exact centre, and both images share the
    background noise, so the two renders differ only where the edit acts.
    """
    rng = random.Random(f"emu-synth/edit-render/{seed}")
    source, noise = place(edit.source, rng.getrandbits(32))
    fresh, _ = place(edit.target, rng.getrandbits(32))
    centres = {(o.position, o.size): p[3:] for o, p in zip(edit.source.objects, source)}
    target = [(s, c, z, *centres.get((o.position, o.size), (cx, cy)))
              for o, (s, c, z, cx, cy) in zip(edit.target.objects, fresh)]
    return source, target, noise
