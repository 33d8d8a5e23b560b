"""Instruction data: grounding tokens, SyntheticChat / SyntheticGen, LLaVA conversation JSON."""

from __future__ import annotations

import hashlib
import json
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from emu_lightning.data.layout.grounding import box_bins, box_tokens, grounded, parse_grounded, strip_grounding
from emu_lightning.data.real.captions import BadImage
from emu_lightning.data.real.chat import LlavaConversations
from emu_lightning.data.synthetic.scenes import COLORS, POSITIONS, SyntheticVideos, in_split, render
from emu_lightning.data.synthetic.instruct import SyntheticChat, SyntheticGen, _ChatVideos, object_box, place
from emu_lightning.data.synthetic.text import HELDOUT_PAIRS, loc_phrase, parse_caption

# ---------------------------------------------------------------- grounding


@pytest.mark.parametrize("side", [1.0, 64.0, 448.0])
def test_grounding_round_trip_within_half_a_bin(side):
    rng = np.random.default_rng(0)
    for _ in range(200):
        x1, x2 = sorted(rng.uniform(0, side, 2))
        y1, y2 = sorted(rng.uniform(0, side, 2))
        box = (x1, y1, x2, y2)
        phrase = "a large red circle"
        [(p, back)] = parse_grounded(f"a picture of {grounded(phrase, box, side)} here.", side)
        assert p == phrase
        # Exact bound: round() moves a bin by <= 0.5, i.e. a coordinate by <= side / 448.
        assert np.abs(np.subtract(back, box)).max() <= side / 448 + 1e-9


def test_box_bins_clamp_and_tokens():
    assert box_bins((0.0, 0.0, 1.0, 1.0)) == (0, 0, 224, 224)
    assert box_bins((-0.2, 0.5, 1.3, 0.5)) == (0, 112, 224, 112)
    assert box_bins((16, 32, 48, 64), side=64) == (56, 112, 168, 224)
    assert box_tokens((0.0, 0.25, 0.5, 1.0)) == "<coor><loc000><loc056><loc112><loc224></coor>"
    with pytest.raises(ValueError, match=r"\(0\.5, 0\.0, 0\.2, 1\.0\).*x2 < x1"):
        box_bins((0.5, 0.0, 0.2, 1.0))
    with pytest.raises(ValueError, match=r"y2 < y1"):
        box_bins((0.1, 0.9, 0.2, 0.1))


def test_parse_grounded_both_orders_and_strip():
    a, b = (0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.9, 1.0)
    text = f"a picture of {grounded('a red circle', a)} and {box_tokens(b)}<p>a blue star</p>."
    parsed = parse_grounded(text)
    assert [p for p, _ in parsed] == ["a red circle", "a blue star"]
    assert np.allclose(parsed[1][1], b, atol=1 / 448 + 1e-9)
    assert strip_grounding(text) == "a picture of a red circle and a blue star."
    assert parse_grounded("no grounding here") == []


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("<p>x</p><coor><loc001><loc002><loc003></coor>", "<coor><loc001><loc002><loc003></coor>"),
        ("<p>x</p><coor><loc001><loc002><loc003><loc004><loc005></coor>", "5 loc tokens"),
        ("<p>x</p><coor><loc001><loc002><loc003><loc225></coor>", "<loc225>"),
        ("<p>x</p><coor><loc001><loc002><loc003><loc04></coor>", "<loc04>"),
        ("<p>x</p><coor><loc010><loc002><loc003><loc004></coor>", "x2 < x1"),
        ("<p>x</p><coor><loc001><loc002>hi<loc003><loc004></coor>", "stray text 'hi'"),
        ("<p>x</p><coor><loc001><loc002><loc003><loc004>", "stray '<coor>'"),
        ("a <coor><loc001><loc002><loc003><loc004></coor> alone", "has no adjacent phrase"),
        ("<p>lonely</p> text", "<p>lonely</p>"),
    ],
)
def test_parse_grounded_malformed_names_substring(text, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_grounded(text)


# ---------------------------------------------------------------- SyntheticChat

_WHERE = {loc_phrase(p): p for p in POSITIONS}


def _vqa_oracle(question: str, scene) -> str:
    """The answer to a `make_vqa` question, recomputed from the scene alone."""
    objs = scene.objects
    if question == "how many shapes are there?":
        return str(len(objs))
    if m := re.fullmatch(r"what color is the (\w+) (.+)\?", question):
        [o] = [o for o in objs if o.shape == m[1] and o.position == _WHERE[m[2]]]
        return o.color
    if m := re.fullmatch(r"what shape is (.+)\?", question):
        [o] = [o for o in objs if o.position == _WHERE[m[1]]]
        return o.shape
    if m := re.fullmatch(r"is the (\w+) (\w+) (.+) large or small\?", question):
        [o] = [o for o in objs if (o.color, o.shape, o.position) == (m[1], m[2], _WHERE[m[3]])]
        return o.size
    if m := re.fullmatch(r"where is the (\w+) (\w+) (\w+)\?", question):
        [o] = [o for o in objs if (o.size, o.color, o.shape) == (m[1], m[2], m[3])]
        return o.position
    m = re.fullmatch(r"is there a (\w+) (\w+)\?", question)
    return "yes" if any((o.color, o.shape) == (m[1], m[2]) for o in objs) else "no"


def _compare_oracle(question: str, first, second) -> str:
    if question == "which image has more shapes?":
        n1, n2 = len(first.objects), len(second.objects)
        return "the first" if n1 > n2 else "the second" if n2 > n1 else "neither"
    if m := re.fullmatch(r"is there a (\w+) (\w+) in both images\?", question):
        has = [any((o.color, o.shape) == (m[1], m[2]) for o in s.objects) for s in (first, second)]
        return "yes" if all(has) else "no"
    m = re.fullmatch(r"what color is the (\w+) in the (first|second) image\?", question)
    [o] = [o for o in (first if m[2] == "first" else second).objects if o.shape == m[1]]
    return o.color


def _image_bytes(item: dict) -> list[bytes]:
    return [im.tobytes() for im in item["images"] + item.get("video", [])]


def test_chat_deterministic_and_placeholders_match_images():
    ds = SyntheticChat("train", 60, image_size=32, seed=3)
    tasks = set()
    for i in range(60):
        a, b = ds[i], ds[i]
        assert _image_bytes(a) == _image_bytes(b) and a["conversations"] == b["conversations"]
        assert a["answers"] == b["answers"] and len(a["answers"]) == 10
        tasks.add(a["task"])
        turns = a["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        human = [t["value"] for t in turns if t["from"] == "human"]
        assert sum(h.count("<image>") for h in human) == len(a["images"])
        assert human[0].count("<image>") == len(a["images"])  # all in the first human turn
        assert sum(h.count("<video>") for h in human) == (a["task"] == "video")
        assert len(a["scenes"]) == len(a["images"])
        assert all(im.size == (32, 32) and im.mode == "RGB" for im in a["images"])
    assert tasks == {"vqa", "describe", "count", "compare", "video"}
    assert _image_bytes(SyntheticChat("train", 60, 32, seed=4)[0]) != _image_bytes(ds[0])


def test_chat_answers_match_the_scene():
    ds = SyntheticChat("train", 80, image_size=32, seed=0, kinds=["vqa", "count", "compare", "describe"])
    checked = 0
    for i in range(80):
        item = ds[i]
        turns = item["conversations"]
        pairs = [(turns[k]["value"].split("\n")[-1], turns[k + 1]["value"]) for k in range(0, len(turns), 2)]
        if item["task"] == "compare":
            assert item["scenes"][0].key() != item["scenes"][1].key()
            for q, a in pairs:
                assert a == _compare_oracle(q, *item["scenes"]), (item["id"], q)
        else:
            if item["task"] == "describe":  # a caption naming every object, then an optional VQA turn
                assert len(parse_caption(pairs[0][1])) == len(item["scenes"][0].objects)
                pairs = pairs[1:]
            for q, a in pairs:
                assert a == _vqa_oracle(q, item["scenes"][0]), (item["id"], q)
        if item["task"] == "vqa":
            assert len({q for q, _ in pairs}) == len(pairs)  # no repeated question
        last = turns[-1]["value"]
        assert sum(x == last for x in item["answers"]) >= 7  # the annotators' majority is the gpt answer
        checked += len(pairs)
    assert checked > 60


def test_chat_images_render_their_scenes():
    ds = SyntheticChat("val", 10, image_size=32, seed=1, kinds=["count"])
    item = ds[2]
    rng = ds._rng(2)
    rng.choice(ds.kinds)
    assert item["images"][0].tobytes() == render(item["scenes"][0], 32, rng.getrandbits(32)).tobytes()


def test_chat_splits_disjoint_and_heldout():
    for split in ("train", "test", "heldout"):
        ds = SyntheticChat(split, 30, image_size=32, seed=0, kinds=["vqa", "compare"])
        for i in range(30):
            item = ds[i]
            assert all(in_split(s, split) for s in item["scenes"]), (split, i)
            text = " ".join(t["value"] for t in item["conversations"])
            if split != "heldout":  # absent-object questions never name a held-out pair outside heldout
                assert not any(f"{c} {s}" in text for c, s in HELDOUT_PAIRS), text
    train = {s.key() for i in range(30) for s in SyntheticChat("train", 30, 32, kinds=["compare"])[i]["scenes"]}
    test = {s.key() for i in range(30) for s in SyntheticChat("test", 30, 32, kinds=["compare"])[i]["scenes"]}
    assert not train & test


def test_chat_video_items_are_synthetic_videos_clips():
    ds = SyntheticChat("train", 12, image_size=32, seed=0, kinds=["video"])
    clips = _ChatVideos("train", 12, 32, 0)
    for i in range(12):
        item, clip = ds[i], clips[i]
        assert item["images"] == [] and len(item["video"]) == 8
        assert [f.tobytes() for f in item["video"]] == [f.tobytes() for f in clip["frames"]]
        q = item["conversations"][0]["value"]
        assert q.startswith("<video>\n") and item["answers"] == clip["answers"]
        a, q = item["conversations"][1]["value"], q.split("\n", 1)[1]
        first, last = clip["subtitles"][0], clip["subtitles"][-1]
        if q == "how many shapes are moving?":
            assert int(a) == first.count(" moves ")
        elif m := re.fullmatch(r"which way does the (.+) move (first|at the end)\?", q):
            sub = first if m[2] == "first" else last
            assert re.search(rf"the {m[1]} moves (to the )?{a}\b", sub), (q, a, sub)
        else:
            assert f" {a} " in first, (q, a, first)
    # Same code, another stream: chat clips are not SyntheticVideos' own clips.
    assert ds[0]["video"][0].tobytes() != SyntheticVideos("train", 12, 32, 0)[0]["frames"][0].tobytes()


def test_synthetic_videos_bytes_unchanged():
    """Pinned before this module existed: SyntheticVideos (reused by SyntheticChat) must not drift."""
    h = hashlib.sha256()
    ds = SyntheticVideos("train", 4, 32, 0)
    for i in range(4):
        item = ds[i]
        for frame in item["frames"]:
            h.update(frame.tobytes())
        h.update(repr((item["subtitles"], item["question"], item["answers"])).encode())
    assert h.hexdigest() == "aa96758346b0044d6ce0f4d84073185fd3d11cbf2d337f19f56dd1c59e5305bf"


# ---------------------------------------------------------------- SyntheticGen


def test_place_reproduces_render_bytes():
    from emu_lightning.data.synthetic.scenes import render_placed, sample_scene

    for i in range(20):
        scene = sample_scene("train", i, 0)
        placed, noise = place(scene, seed=i * 7)
        assert render_placed(placed, scene.background, 48, noise).tobytes() == render(scene, 48, i * 7).tobytes()


def _color_mask(image: Image.Image, color: str) -> np.ndarray:
    arr = np.asarray(image, dtype=np.int16)
    return np.abs(arr - np.array(COLORS[color])).max(-1) <= 24  # noise is +-6; edges blend away


def test_gen_boxes_contain_object_pixels():
    side = 64
    ds = SyntheticGen("train", 40, image_size=side, seed=0)
    tight = 0
    for i in range(40):
        item = ds[i]
        for color in {o.color for o in item["scene"].objects}:
            ys, xs = np.nonzero(_color_mask(item["image"], color))
            boxes = [np.array(b) * side for p, b in item["boxes"] if f" {color} " in p]
            inside = np.zeros(len(xs), bool)
            for x1, y1, x2, y2 in boxes:  # pixel [x, x+1) must overlap the box grown by 1 px
                inside |= (xs + 1 >= x1 - 1) & (xs <= x2 + 1) & (ys + 1 >= y1 - 1) & (ys <= y2 + 1)
            assert inside.all(), (item["id"], color)
            if len(boxes) == 1 and len(xs):  # and the box is tight: colour reaches within 2 px of each side
                x1, y1, x2, y2 = boxes[0]
                assert abs(xs.min() - x1) <= 2 and abs(xs.max() + 1 - x2) <= 2, (item["id"], color)
                assert abs(ys.min() - y1) <= 2 and abs(ys.max() + 1 - y2) <= 2, (item["id"], color)
                tight += 1
    assert tight > 40


def test_gen_instructions_by_kind():
    ds = SyntheticGen("train", 60, image_size=32, seed=0)
    kinds = set()
    for i in range(60):
        item = ds[i]
        kinds.add(item["kind"])
        text = item["instruction"]
        assert item["image"].tobytes() == ds[i]["image"].tobytes()
        assert [p for p, _ in item["boxes"]] == [f"a {o.size} {o.color} {o.shape}" for o in item["scene"].objects]
        assert text.count("<image>") == len(item["references"])
        if item["kind"] == "t2i":
            assert "<p>" not in text and "<coor>" not in text and item["references"] == []
        elif item["kind"] == "grounded":
            parsed = parse_grounded(text)
            assert [p for p, _ in parsed] == [p for p, _ in item["boxes"]]
            for (_, got), (_, want) in zip(parsed, item["boxes"]):
                assert np.abs(np.subtract(got, want)).max() <= 1 / 448 + 1e-9
            assert not any(w in strip_grounding(text) for w in ("top", "bottom", "center", " left", " right"))
        else:
            [(phrase, got)] = parse_grounded(text)
            assert phrase == "this shape" and "<image> <p>this shape</p>" in text
            [ref] = item["references"]
            j = [np.abs(np.subtract(got, b)).max() <= 1 / 448 + 1e-9 for _, b in item["boxes"]].index(True)
            obj = item["scene"].objects[j]
            ys, xs = np.nonzero(_color_mask(ref, obj.color))  # the object alone, centred
            x1, y1, x2, y2 = np.array(object_box(obj.shape, obj.size, 0.5, 0.5)) * 32
            assert len(xs) > 4 and xs.min() >= x1 - 1 and xs.max() + 1 <= x2 + 1
            assert ys.min() >= y1 - 1 and ys.max() + 1 <= y2 + 1
    assert kinds == {"t2i", "grounded", "subject"}
    assert any("<coor>" in ds[i]["instruction"].split("<p>")[0] for i in range(60) if ds[i]["kind"] == "grounded")


# ---------------------------------------------------------------- LlavaConversations


def _write(tmp_path, records, images=("a.png", "b.png")):
    for name in images:
        Image.new("RGB", (20, 10), (200, 10, 10)).save(tmp_path / name)
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(records))
    return path


def test_llava_good_file(tmp_path):
    records = [
        {"id": "r0", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "sure?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "r1", "image": ["a.png", "b.png"], "conversations": [
            {"from": "user", "value": "compare"}, {"from": "assistant", "value": "same"}]},
        {"id": 7, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ]  # fmt: skip
    ds = LlavaConversations(str(_write(tmp_path, records)), str(tmp_path), image_size=16)
    assert len(ds) == 3
    a, b, c = ds[0], ds[1], ds[2]
    assert a["answers"] == ["yes"] and a["task"] == "llava" and a["images"][0].size == (16, 16)
    assert [t["from"] for t in b["conversations"]] == ["human", "gpt"]
    assert b["conversations"][0]["value"] == "<image>\n<image>\ncompare"  # LLaVA convention: prepended
    assert len(b["images"]) == 2 and c["images"] == [] and c["id"] == "7"
    assert LlavaConversations(str(tmp_path / "chat.json"), str(tmp_path))[0]["images"][0].size == (20, 10)


def _turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


@pytest.mark.parametrize(
    ("records", "fragments"),
    [
        ({"id": "x"}, ["top level is a dict", "expected a list"]),
        ([{"id": "r0", "image": "a.png"}], ["record 0", "'r0'", "'conversations'"]),
        ([{"id": "r0", "conversations": []}], ["record 0", "'conversations' is []", "non-empty"]),
        ([{"id": "r0", "conversations": _turns(("human", "q"), ("bot", "a"))}],
         ["conversations[1]", "'from' is 'bot'", "'human', 'user', 'gpt', 'assistant'"]),
        ([{"id": "r0", "conversations": _turns(("gpt", "a"), ("human", "q"))}],
         ["conversations[0]", "'from' is 'gpt'", "must be 'human'", "alternate"]),
        ([{"id": "r0", "conversations": _turns(("human", "q"), ("human", "q2"))}],
         ["conversations[1]", "must be 'gpt'"]),
        ([{"id": "r0", "conversations": _turns(("human", "q"), ("gpt", "a"), ("human", "q"))}],
         ["ends with a 'human' turn"]),
        ([{"id": "ok", "conversations": _turns(("human", "q"), ("gpt", "a"))},
          {"id": "r1", "image": ["a.png", "b.png"], "conversations": _turns(("human", "<image> q"), ("gpt", "a"))}],
         ["record 1", "'r1'", "1 <image> placeholder", "2 image(s)", "'a.png', 'b.png'"]),
        ([{"id": "r0", "conversations": _turns(("human", "<image> q"), ("gpt", "a"))}],
         ["1 <image> placeholder", "0 image(s)"]),
        ([{"id": "r0", "image": 3, "conversations": _turns(("human", "q"), ("gpt", "a"))}],
         ["field 'image' is 3", "expected a path"]),
    ],
)  # fmt: skip
def test_llava_bad_records_name_the_problem(tmp_path, records, fragments):
    path = _write(tmp_path, records)
    with pytest.raises(ValueError) as err:
        LlavaConversations(str(path), str(tmp_path))
    assert str(path) in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_llava_missing_and_undecodable_images(tmp_path):
    records = [{"id": "r0", "image": "gone.png", "conversations": _turns(("human", "q"), ("gpt", "a"))}]
    with pytest.raises(FileNotFoundError, match=r"gone\.png.*'r0'"):
        LlavaConversations(str(_write(tmp_path, records)), str(tmp_path))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    records = [{"id": "r1", "image": "bad.png", "conversations": _turns(("human", "q"), ("gpt", "a"))}]
    ds = LlavaConversations(str(_write(tmp_path, records)), str(tmp_path))
    with pytest.raises(BadImage, match=r"bad\.png.*does not decode"):
        ds[0]


def test_llava_empty_and_undecodable_images_are_listed_at_start_up(tmp_path):
    """Before training, not hours in: every referenced file is checked for size and a sample for a readable header;
    the bad ones are listed once (a file two records share too), and each read of one is a counted skip."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    records = [{"id": f"r{i}", "image": name, "conversations": _turns(("human", "q"), ("gpt", "a"))}
               for i, name in enumerate(["a.png", "empty.png", "bad.png", "bad.png"])]
    path = _write(tmp_path, records)
    with pytest.warns(UserWarning, match=r"2 bad image file\(s\) listed in .*chat\.json") as record:
        ds = LlavaConversations(str(path), str(tmp_path))
    (listing,) = [str(w.message) for w in record if "bad image file" in str(w.message)]
    assert f"empty (0 bytes): {tmp_path / 'empty.png'}" in listing
    assert f"does not decode (UnidentifiedImageError): {tmp_path / 'bad.png'}" in listing
    assert listing.count("bad.png") == 1 and "a.png" not in listing
    assert len(ds) == 4 and ds[0]["images"][0].size == (20, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # check_files=False: not listed (reads still skip)
        LlavaConversations(str(path), str(tmp_path), check_files=False)
