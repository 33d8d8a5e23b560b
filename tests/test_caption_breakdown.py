"""benchmarks/caption_breakdown.py: attribute accuracy split by scene size and object index, on hand-written cases."""
from __future__ import annotations

from benchmarks.caption_breakdown import breakdown
from emu_lightning.data.synthetic.text import Obj, Scene


def test_one_object_scenes_and_later_objects_are_scored_apart():
    one = Scene(objects=(Obj(shape="circle", color="red", size="small", position="top left"),), background="gray")
    two = Scene(objects=(Obj(shape="square", color="blue", size="large", position="top"),
                         Obj(shape="star", color="green", size="small", position="bottom right")), background="gray")
    captions = ["a small red square in the top left corner.",                                   # shape wrong
                "a large blue square at the top and a small green star in the bottom right corner.",   # all right
                "a large blue square at the top."]                                          # second object missing
    table = breakdown(captions, [one, two, two])
    assert table["1/0"] == {"color": 1.0, "shape": 0.0, "size": 1.0, "position": 1.0, "all": 0.0, "n": 1}
    assert table["2/0"] == {"color": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0, "all": 1.0, "n": 2}
    assert table["2/1"] == {"color": 0.5, "shape": 0.5, "size": 0.5, "position": 0.5, "all": 0.5, "n": 2}
    assert list(table) == ["1/0", "2/0", "2/1"]
