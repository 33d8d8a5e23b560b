"""Judged in-context edits: did the generated image make the edit, and keep what the edit leaves alone?

An edit (`emu_lightning/data/synthetic/edits.py`) turns a source scene into a target scene by changing one object:
its color, shape, position or size, or by adding or removing it. The frozen scene judge (`SceneClassifier`, the same
per-cell shape / color reading as `SemanticAccuracy`) reads each generated image, and the two scenes say what it
should show:

- the edited object as the target has it (`color`, `shape`, `both`, `position`: drawn in its target cell), over the
  edits that leave an object (all but `remove`); `removed`: its source cell judged empty, over removals;
- `kept`: the facts the edit must not change, over all of them: every untouched object's color and shape in its
  cell, and the edited object's unchanged color / shape (read in its target cell, or in its source cell when the
  target cell is judged empty: an image that failed to move the object can still keep its color) and unchanged
  position.

The judge has no size head, so a `resize` is judged on what it keeps only. Returning the source image scores 0 on
the edited attribute (for `move` and `add`: color, shape and position of the object that should appear) and 1 on
`kept` (docs/generation_heads.md, "In-context generation: edit items").
"""
from __future__ import annotations

from functools import partial

from torch import Tensor

from emu_lightning.data.synthetic.scenes import POSITIONS, SHAPES, Obj, Scene
from emu_lightning.metrics.semantic import COLOR_NAMES, EMPTY, JudgedMetric

_STATES = ("color_hits", "shape_hits", "both_hits", "position_hits", "objects", "removed_hits", "removals",
           "kept_hits", "kept_facts")


def edited_objects(source: Scene, target: Scene) -> tuple[Obj | None, Obj | None, list[Obj]]:
    """``(old, new, untouched)``: the object the edit changes as the source and the target have it (``new`` None
    for a removal, ``old`` None for an addition) and the objects it leaves alone. Raises unless exactly one object
    differs."""
    old, new = set(source.objects) - set(target.objects), set(target.objects) - set(source.objects)
    if len(old) > 1 or len(new) > 1 or not (old or new):
        raise ValueError(f"an edit changes one object; source {source.key()} and target {target.key()} differ in "
                         f"{len(old)} source and {len(new)} target objects")
    untouched = [o for o in source.objects if o in target.objects]
    return next(iter(old), None), next(iter(new), None), untouched


def _reads(shapes: list[int], colors: list[int], o: Obj, cell: int) -> tuple[bool, bool]:
    """Whether the judge's per-cell classes (9 each) show ``o``'s (shape, color) in ``cell``."""
    return shapes[cell] == SHAPES.index(o.shape), colors[cell] == COLOR_NAMES.index(o.color)


class EditAccuracy(JudgedMetric):
    """Per-edit accuracies of generated images against their (target, source) scenes, read by a frozen judge.

    ``compute()`` gives ``color``, ``shape``, ``both``, ``position`` (the edited object in the target; present when
    some edit leaves one), ``removed`` (present when some edit is a removal) and ``kept`` (module docstring). The
    judge stays out of the parameters and ``state_dict`` of a module holding the metric (`JudgedMetric`).

    Args:
        classifier: frozen module mapping (B,3,H,W) in [0,1] to ``{"shape", "color"}`` logits (B,9,7).
        **kwargs: forwarded to ``torchmetrics.Metric``.
    """

    STATES = _STATES

    def update(self, images: Tensor, targets: list[Scene], sources: list[Scene]) -> None:
        """Accumulate (B,3,H,W) images in [0,1] against the B target scenes and the B sources they were edited from."""
        if images.ndim != 4 or not images.shape[0] == len(targets) == len(sources):
            raise ValueError(f"EditAccuracy: images {tuple(images.shape)} vs {len(targets)} targets and "
                             f"{len(sources)} sources; expected one of each per image")
        pred_shape, pred_color = (t.tolist() for t in self.judge(images))     # (B,9) each
        counts = dict.fromkeys(_STATES, 0)
        for shapes, colors, target, source in zip(pred_shape, pred_color, targets, sources):
            old, new, untouched = edited_objects(source, target)
            reads = partial(_reads, shapes, colors)
            kept = []                                                              # one bool per unchanged fact
            for o in untouched:
                kept += reads(o, POSITIONS.index(o.position))
            if new is None:                                                        # a removal: its cell empties
                cell = POSITIONS.index(old.position)
                counts["removed_hits"] += shapes[cell] == EMPTY and colors[cell] == EMPTY
                counts["removals"] += 1
            else:
                cell = POSITIONS.index(new.position)
                shape_ok, color_ok = reads(new, cell)
                counts["color_hits"] += color_ok
                counts["shape_hits"] += shape_ok
                counts["both_hits"] += shape_ok and color_ok
                counts["position_hits"] += shapes[cell] != EMPTY
                counts["objects"] += 1
                if old is not None:
                    # Unchanged attributes of the edited object: in its target cell, else where it was.
                    seen = cell if shapes[cell] != EMPTY else POSITIONS.index(old.position)
                    shape_kept, color_kept = reads(old, seen)
                    kept += [shape_kept] if old.shape == new.shape else []
                    kept += [color_kept] if old.color == new.color else []
                    kept += [shapes[cell] != EMPTY] if old.position == new.position else []
            counts["kept_hits"] += sum(kept)
            counts["kept_facts"] += len(kept)
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + value)

    def compute(self) -> dict[str, Tensor]:
        """``{"color", "shape", "both", "position", "removed", "kept"}`` float32 accuracies, each where defined."""
        if self.objects + self.removals == 0:
            raise ValueError("EditAccuracy has no edits: call update() with images and scenes before compute()")
        out = {}
        if self.objects > 0:
            out |= {k: getattr(self, f"{k}_hits") / self.objects for k in ("color", "shape", "both", "position")}
        if self.removals > 0:
            out["removed"] = self.removed_hits / self.removals
        if self.kept_facts > 0:
            out["kept"] = self.kept_hits / self.kept_facts
        return {k: v.float() for k, v in out.items()}
