"""In-context edit items (`SyntheticGen` kind `edit`, `data/synthetic/edits.py`) and their judged metric
(`metrics/edit.py`): exact instructions, one changed attribute, determinism, held-out pairs in heldout targets only,
and `EditAccuracy` on hand-made generators read by an oracle judge."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

from emu_lightning.data.synthetic.instruct import EDIT_KINDS, SyntheticGen
from emu_lightning.data.synthetic.scenes import HELDOUT_PAIRS, POSITIONS, Obj, Scene
from emu_lightning.data.synthetic.text import has_heldout_pair
from emu_lightning.metrics.edit import EditAccuracy, edited_objects
from emu_lightning.metrics.semantic import EMPTY, scene_targets

SIDE = 48


def _items(kind: str, split: str = "train", n: int = 16, seed: int = 0) -> list[dict]:
    ds = SyntheticGen(split, n, image_size=SIDE, seed=seed, edit_p=1.0, edits=[kind])
    return [ds[i] for i in range(n)]


# ---------------------------------------------------------------- data

PINNED = {   # SyntheticGen(split, 1, edit_p=1.0, edits=[kind])[0]["instruction"], seed 0
    ("recolor", "train"): "<image> the same shape in yellow.",
    ("reshape", "train"): "<image> the same color, as a square.",
    ("move", "train"): "<image> the same object on the right.",
    ("resize", "train"): "<image> the same object, but small.",
    ("add", "train"): "<image> the same picture with a small yellow triangle at the top left added.",
    ("remove", "train"): "<image> the same picture without the blue star.",
    ("recolor", "heldout"): "<image> the same shape in purple.",
    ("move", "heldout"): "<image> the same object in the center.",
}


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edit_instruction_strings(kind):
    for (k, split), text in PINNED.items():
        if k == kind:
            assert SyntheticGen(split, 1, image_size=SIDE, edit_p=1.0, edits=[kind])[0]["instruction"] == text
    for it in _items(kind):
        old, new, _ = edited_objects(it["source_scene"], it["scene"])
        want = {"recolor": lambda: f"<image> the same shape in {new.color}.",
                "reshape": lambda: f"<image> the same color, as a {new.shape}.",
                "move": lambda: f"<image> the same object {_loc(new.position)}.",
                "resize": lambda: f"<image> the same object, but {new.size}.",
                "add": lambda: f"<image> the same picture with a {new.size} {new.color} {new.shape} "
                               f"{_loc(new.position)} added.",
                "remove": lambda: f"<image> the same picture without the {old.color} {old.shape}."}[kind]()
        assert it["instruction"] == want and it["kind"] == "edit" and it["edit"] == kind
        assert len(it["references"]) == 1 and it["instruction"].count("<image>") == 1


def _loc(position: str) -> str:
    from emu_lightning.data.synthetic.text import loc_phrase

    return loc_phrase(position)


def _cell_mask(positions: set[str]) -> np.ndarray:
    """Pixels of the given grid cells (an object never leaves its cell)."""
    mask = np.zeros((SIDE, SIDE), bool)
    for p in positions:
        row, col = divmod(POSITIONS.index(p), 3)
        mask[row * SIDE // 3:(row + 1) * SIDE // 3 + 1, col * SIDE // 3:(col + 1) * SIDE // 3 + 1] = True
    return mask


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_target_differs_from_source_in_exactly_the_edited_attribute(kind):
    changed = {"recolor": {"color"}, "reshape": {"shape"}, "move": {"position"}, "resize": {"size"}}
    for it in _items(kind):
        source, target = it["source_scene"], it["scene"]
        old, new, untouched = edited_objects(source, target)
        assert source.background == target.background
        if kind in changed:
            assert len(source.objects) == len(target.objects) == 1 and not untouched
            diff = {f for f in ("shape", "color", "size", "position") if getattr(old, f) != getattr(new, f)}
            assert diff == changed[kind], (it["id"], old, new)
        elif kind == "add":
            assert old is None and untouched == list(source.objects) and len(target.objects) == 2
        else:
            assert new is None and list(target.objects) == untouched and len(source.objects) == 2
            assert [(o.color, o.shape) for o in source.objects].count((old.color, old.shape)) == 1
        # Same placement and noise for what the edit leaves alone: pixels change only in the edited cells.
        delta = np.asarray(it["references"][0], np.int16) != np.asarray(it["image"], np.int16)
        cells = {o.position for o in (old, new) if o is not None}
        assert delta.any() and not (delta.any(-1) & ~_cell_mask(cells)).any(), it["id"]


def test_edits_are_deterministic_and_leave_other_items_unchanged():
    a, b = _items("recolor", "val", 4), _items("recolor", "val", 4)
    for x, y in zip(a, b):
        assert x["instruction"] == y["instruction"] and x["image"].tobytes() == y["image"].tobytes()
        assert x["references"][0].tobytes() == y["references"][0].tobytes() and x["source_scene"] == y["source_scene"]
    other = _items("recolor", "val", 4, seed=1)
    assert [x["source_scene"] for x in a] != [x["source_scene"] for x in other]
    mixed, plain = SyntheticGen("train", 24, image_size=SIDE, edit_p=0.5), SyntheticGen("train", 24, image_size=SIDE)
    kinds = [mixed[i]["kind"] for i in range(24)]
    assert "edit" in kinds and set(kinds) - {"edit"}
    for i, k in enumerate(kinds):   # the edit coin has its own RNG: every other item is edit_p=0's, byte for byte
        if k != "edit":
            assert mixed[i]["image"].tobytes() == plain[i]["image"].tobytes()
            assert mixed[i]["instruction"] == plain[i]["instruction"]


def test_edit_p_zero_keeps_gen_items_byte_identical():
    """Pinned from SyntheticGen before edit items existed: recipes without edit_p read the same bytes."""
    h = hashlib.sha256()
    for kw in ({}, {"grounded_p": 0.5, "subject_p": 0.5}):
        ds = SyntheticGen("train", 12, 32, 0, **kw)
        for i in range(12):
            it = ds[i]
            h.update(it["image"].tobytes())
            for r in it["references"]:
                h.update(r.tobytes())
            h.update(repr((it["instruction"], it["boxes"], it["kind"], it["scene"])).encode())
    assert h.hexdigest() == "62c4fcefde153476c6adecc124e94b03cda2b7daf0054888144720fee26ca1c5"


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_heldout_pairs_only_in_heldout_targets(kind):
    for split in ("train", "val", "test"):
        for it in _items(kind, split, 12):
            assert not has_heldout_pair(it["scene"].objects) and not has_heldout_pair(it["source_scene"].objects)
    for it in _items(kind, "heldout", 12):
        assert has_heldout_pair(it["scene"].objects), it["id"]
        if kind in ("recolor", "reshape", "add"):   # compositional: the edit makes the pair
            assert not has_heldout_pair(it["source_scene"].objects), it["id"]
            _, new, _ = edited_objects(it["source_scene"], it["scene"])
            assert (new.color, new.shape) in HELDOUT_PAIRS


def test_edit_arguments_are_checked():
    with pytest.raises(ValueError, match="edits=\\['blur'\\]"):
        SyntheticGen("train", 4, edits=["blur"])
    with pytest.raises(ValueError, match="edit_p=1.5"):
        SyntheticGen("train", 4, edit_p=1.5)


# ---------------------------------------------------------------- metric


def _key(image: torch.Tensor) -> bytes:
    return (image * 255).round().to(torch.uint8).numpy().tobytes()


class Oracle(nn.Module):
    """A judge that reads every image it was shown exactly: a table from image bytes to its scene."""

    def __init__(self, pairs) -> None:
        super().__init__()
        self.table = {_key(im): scene for im, scene in pairs}

    def forward(self, images):
        shape, color = scene_targets([self.table[_key(im)] for im in images])
        one_hot = lambda t: nn.functional.one_hot(t, EMPTY + 1).float()  # noqa: E731
        return {"shape": one_hot(shape), "color": one_hot(color)}


def _pixels(images) -> torch.Tensor:
    return torch.stack([pil_to_tensor(im) for im in images]).float() / 255


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_metric_scores_a_perfect_generator_one_and_the_source_zero_on_the_edit(kind):
    items = _items(kind, n=6)
    targets, sources = [it["scene"] for it in items], [it["source_scene"] for it in items]
    made, shown = _pixels([it["image"] for it in items]), _pixels([it["references"][0] for it in items])
    judge = Oracle([*zip(made, targets), *zip(shown, sources)])
    perfect = EditAccuracy(judge)
    perfect.update(made, targets, sources)
    out = perfect.compute()
    assert set(out) == ({"removed", "kept"} if kind == "remove" else {"color", "shape", "both", "position", "kept"})
    assert all(v.item() == 1.0 for v in out.values()), out
    lazy = EditAccuracy(judge)   # a "generator" that returns the source unchanged
    lazy.update(shown, targets, sources)
    out = {k: v.item() for k, v in lazy.compute().items()}
    zero = {"recolor": {"color", "both"}, "reshape": {"shape", "both"}, "resize": set(), "remove": {"removed"},
            "move": {"color", "shape", "both", "position"}, "add": {"color", "shape", "both", "position"}}[kind]
    assert {k for k, v in out.items() if v == 0.0} == zero and all(out[k] == 1.0 for k in set(out) - zero), out
    assert out["kept"] == 1.0


def test_metric_exact_counts_on_a_half_done_move():
    source = Scene((Obj("star", "blue", "small", "left"),), "gray")
    target = Scene((Obj("star", "blue", "small", "right"),), "gray")
    drawn = Scene((Obj("star", "green", "small", "right"),), "gray")     # moved, but recolored on the way
    image = torch.rand(1, 3, 16, 16)
    metric = EditAccuracy(Oracle([(image[0], drawn)]))
    metric.update(image, [target], [source])
    out = {k: v.item() for k, v in metric.compute().items()}
    assert out == {"color": 0.0, "shape": 1.0, "both": 0.0, "position": 1.0, "kept": 0.5}
    with pytest.raises(ValueError, match="2 source and 2 target objects"):
        two = Scene((Obj("star", "red", "small", "left"), Obj("circle", "red", "small", "right")), "gray")
        edited_objects(two, Scene((Obj("star", "blue", "small", "left"), Obj("cross", "red", "small", "right"))))
    with pytest.raises(ValueError, match="1 targets and 2 sources"):
        metric.update(image, [target], [source, source])


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_keeps_the_judge_out_of_parameters():
    holder = nn.Module()
    holder.metric = EditAccuracy(nn.Conv2d(3, 3, 1))
    assert list(holder.parameters()) == [] and not any("weight" in k for k in holder.state_dict())
    with pytest.raises(ValueError, match="no edits"):
        holder.metric.compute()
