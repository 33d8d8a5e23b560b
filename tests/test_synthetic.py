"""Synthetic shape world: determinism, split disjointness, caption <-> scene round trip, metric honesty."""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from emu_lightning.data.synthetic.scenes import (
    COLORS,
    HELDOUT_PAIRS,
    NUM_FRAMES,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    SyntheticCaptions,
    SyntheticDocuments,
    SyntheticVideos,
    SyntheticVQA,
    attribute_accuracy,
    caption_corpus,
    describe_scene,
    has_heldout_pair,
    make_video_qa,
    parse_caption,
    render,
    sample_scene,
)

N_SPLIT = 3000  # scenes per split compared for disjointness


def _digest(item: dict) -> str:
    """Hash of every image byte plus every text of an item."""
    h = hashlib.sha256()
    images = [item["image"]] if "image" in item else item.get("images", item.get("frames", []))
    for im in images:
        h.update(im.tobytes())
    for key in ("captions", "texts", "subtitles", "question", "answers"):
        h.update(repr(item.get(key)).encode())
    return h.hexdigest()


DATASETS = {
    "captions": SyntheticCaptions,
    "vqa": SyntheticVQA,
    "documents": SyntheticDocuments,
    "videos": SyntheticVideos,
}


@pytest.mark.parametrize("kind", sorted(DATASETS))
def test_same_index_same_bytes_and_seed_changes_them(kind: str) -> None:
    cls = DATASETS[kind]
    a, b = cls("train", 20, seed=3), cls("train", 20, seed=3)
    assert _digest(a[7]) == _digest(b[7])
    assert _digest(a[7]) != _digest(a[8])
    assert _digest(a[7]) != _digest(cls("train", 20, seed=4)[7])
    assert a[7]["id"] != cls("val", 20, seed=3)[7]["id"]


def test_determinism_across_processes() -> None:
    """A fresh interpreter (new str-hash salt) must produce byte-identical items."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r});"
        "from test_synthetic import DATASETS, _digest;"
        "print(' '.join(_digest(DATASETS[k]('val', 10, seed=1)[5]) for k in sorted(DATASETS)))"
    )
    env = {"PYTHONHASHSEED": "12345"}  # a different salt for Python's str hash
    root = Path(__file__).parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root, env=env
    )
    out = proc.stdout.split()
    assert out == [_digest(DATASETS[k]("val", 10, seed=1)[5]) for k in sorted(DATASETS)]


def test_item_contract() -> None:
    item = SyntheticCaptions("test", 5, image_size=48)[2]
    assert set(item) == {"id", "image", "captions", "scene"}
    assert item["image"].mode == "RGB" and item["image"].size == (48, 48)
    assert len(item["captions"]) >= 5 and len(set(item["captions"])) == len(item["captions"])
    with pytest.raises(IndexError, match=r"index 5 outside \[0, 5\)"):
        SyntheticCaptions("test", 5)[5]
    with pytest.raises(ValueError, match="split='dev'"):
        SyntheticCaptions("dev")


def test_splits_disjoint_and_heldout_pairs() -> None:
    keys = {s: {sample_scene(s, i).key() for i in range(N_SPLIT)} for s in ("train", "val", "test")}
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    assert all(len(k) > N_SPLIT // 3 for k in keys.values())  # a real stream, not one repeated scene
    seen_pairs = {(c, s) for ks in keys.values() for key in ks for _, c, s, _ in key}
    assert not seen_pairs & set(HELDOUT_PAIRS)
    assert len(seen_pairs) == len(COLORS) * len(SHAPES) - len(HELDOUT_PAIRS)  # everything else is covered
    heldout = [sample_scene("heldout", i) for i in range(500)]
    assert all(has_heldout_pair(s.objects) for s in heldout)
    assert {(o.color, o.shape) for s in heldout for o in s.objects} >= set(HELDOUT_PAIRS)


def test_heldout_pairs_cover_each_color_and_shape_at_most_twice() -> None:
    for i, vocab in ((0, COLORS), (1, SHAPES)):
        counts = [sum(p[i] == w for p in HELDOUT_PAIRS) for w in vocab]
        assert max(counts) <= 2 and sum(counts) == len(HELDOUT_PAIRS)


def test_scene_validation_names_field() -> None:
    with pytest.raises(ValueError, match="Obj.color='pink'"):
        Obj("circle", "pink", "large", "center")
    a, b = Obj("circle", "red", "large", "center"), Obj("star", "blue", "small", "top left")
    with pytest.raises(ValueError, match="row-major"):
        Scene((a, b))


def test_captions_parse_back_to_scene() -> None:
    ds = SyntheticCaptions("train", 300)
    for i in range(300):
        item = ds[i]
        for caption in item["captions"]:
            mentions = parse_caption(caption)
            parsed = [tuple(m[k] for k in ("size", "color", "shape", "position")) for m in mentions]
            assert parsed == list(item["scene"].key()), caption


def test_parse_caption_partial_and_synonyms() -> None:
    parsed = parse_caption("there is a big violet circle in the middle and a star")
    assert parsed == [
        {"size": "large", "color": "purple", "shape": "circle", "position": "center"},
        {"size": None, "color": None, "shape": "star", "position": None},
    ]
    assert parse_caption("a picture of nothing at all.") == []


def _scenes(n: int = 200) -> list[Scene]:
    return [sample_scene("val", i) for i in range(n)]


def test_attribute_accuracy_perfect_captions() -> None:
    scenes = _scenes()
    for caption_idx in range(5):
        caps = [SyntheticCaptions("val", 200)[i]["captions"][caption_idx] for i in range(0, 200, 10)]
        acc = attribute_accuracy(caps, scenes[::10])
        assert acc == {"color": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0, "all": 1.0, "count": 1.0}


def test_attribute_accuracy_penalises_wrong_shapes_and_missing_objects() -> None:
    scenes = _scenes()
    rng = random.Random(0)
    def other_shape(o: Obj) -> Obj:
        return replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape]))

    wrong = [Scene(tuple(other_shape(o) for o in sc.objects), sc.background) for sc in scenes]
    acc = attribute_accuracy([f"this image shows {describe_scene(w)}." for w in wrong], scenes)
    assert acc["shape"] == 0.0 and acc["all"] == 0.0
    assert acc["color"] == acc["size"] == acc["position"] == acc["count"] == 1.0
    # Only the first object named: later objects count as wrong, and the count is off.
    first_only = [f"a picture of {describe_scene(Scene(sc.objects[:1]))}." for sc in scenes]
    acc = attribute_accuracy(first_only, scenes)
    n_first = len(scenes) / sum(len(sc.objects) for sc in scenes)
    assert acc["all"] == pytest.approx(n_first)
    assert acc["count"] == pytest.approx(sum(len(sc.objects) == 1 for sc in scenes) / len(scenes))
    with pytest.raises(ValueError, match="2 captions for 3 scenes"):
        attribute_accuracy(["a", "b"], scenes[:3])


def test_vqa_answers_and_disagreement() -> None:
    ds = SyntheticVQA("train", 400)
    items = [ds[i] for i in range(400)]
    assert set(items[0]) == {"id", "image", "question", "answers", "scene"}
    assert all(len(it["answers"]) == 10 for it in items)
    answers = [a for it in items for a in it["answers"]]
    majority_share = sum(max(it["answers"].count(a) for a in it["answers"]) for it in items) / len(answers)
    assert 0.8 < majority_share < 0.95  # mostly agreement, some (~12%) disagreement
    kinds = {it["question"].split()[0] + " " + it["question"].split()[1] for it in items}
    assert {"what color", "what shape", "how many", "where is", "is there"} <= kinds
    for it in items:  # the majority answer is right
        majority = max(set(it["answers"]), key=it["answers"].count)
        if it["question"] == "how many shapes are there?":
            assert majority == str(len(it["scene"].objects))
        elif it["question"].startswith("what color is the"):
            assert majority in {o.color for o in it["scene"].objects}


def test_documents_and_videos() -> None:
    docs = SyntheticDocuments("train", 50)
    for i in range(50):
        d = docs[i]
        assert 2 <= len(d["images"]) == len(d["texts"]) <= 5
        assert all(im.size == (64, 64) for im in d["images"])
        assert d["texts"][1].startswith("then ")
    vids = SyntheticVideos("val", 10, image_size=32)
    v = vids[3]
    assert len(v["frames"]) == len(v["subtitles"]) == NUM_FRAMES
    assert v["frames"][0].size == (32, 32) and v["frames"][0].tobytes() != v["frames"][-1].tobytes()
    assert "moves" in v["subtitles"][0] and v["subtitles"][0] == v["subtitles"][3]
    held = SyntheticVideos("heldout", 20)
    assert all(any(f"{c} {s}" in held[i]["subtitles"][0] for c, s in HELDOUT_PAIRS) for i in range(20))


# sha256 of the 8 frames' bytes then repr(subtitles), seed 0, 64 px, computed before video QA existed:
# adding the question must not move a single draw of the clip.
VIDEO_DIGESTS = {
    "train": ["da6962760ddc73ac8680bc5e841e56570f554885c83d7ef3304475f9811d7069",
              "e7f179cd3cdb743e46b31ffe048242e52c81b4c69ded51f28cedd09f28244ea9",
              "0fa2e893751135714c5ea40bf98f3637cfaf6d348d849da24cd3f7138bcc325d",
              "43c167c2195e36fa57e29bbe84f6fb4805046f2ee47984f68b9775f72f19da69"],
    "heldout": ["d3a9f148eaeab14032ef4c292c5a596e0b20e6f0ef0c60ec334132e6e0cc5bfe",
                "2f0b5f3ef7d189530028edee4bfb32a039e28b22790ba1ecd3ab8f4400b411d3",
                "fbf359a68d00f2882c2b792a068b27c389c6fd870674c32b276432b4e4451555",
                "13784c6cf88fb19bb33366a2a54e5e9f29eb5bb8144e946354239e1f45ac99c4"],
}  # fmt: skip
_MOTION_WORD = {"to the right": "right", "to the left": "left", "up": "up", "down": "down"}
_CLAUSE = re.compile(r"the (\w+) (\w+) (\w+) moves (to the right|to the left|up|down)")


@pytest.mark.parametrize("split", sorted(VIDEO_DIGESTS))
def test_video_frames_and_subtitles_unchanged_by_qa(split: str) -> None:
    ds = SyntheticVideos(split, 10)
    for i, expected in enumerate(VIDEO_DIGESTS[split]):
        item, h = ds[i], hashlib.sha256()
        for frame in item["frames"]:
            h.update(frame.tobytes())
        h.update(repr(item["subtitles"]).encode())
        assert h.hexdigest() == expected, f"{split} item {i}"


def _segments(subtitles: list[str]) -> list[list[tuple[str, str, str, str]]]:
    """Per segment, the ``(size, color, shape, direction)`` clauses of its subtitle."""
    return [[(z, c, s, _MOTION_WORD[m]) for z, c, s, m in _CLAUSE.findall(subtitles[t])]
            for t in (0, NUM_FRAMES - 1)]  # fmt: skip


def _expected_answer(question: str, segments: list[list[tuple[str, str, str, str]]]) -> str:
    """The answer read off the subtitles; asserts the question's description fits exactly one object."""
    if question == "how many shapes are moving?":
        return str(len(segments[0]))
    if m := re.fullmatch(r"which way does the (\w+) (\w+) (\w+) move (first|at the end)\?", question):
        k = 0 if m[4] == "first" else 1
        hits = [c[3] for c in segments[k] if c[:3] == (m[1], m[2], m[3])]
    elif m := re.fullmatch(r"what color is the moving (\w+)\?", question):
        hits = [c[1] for c in segments[0] if c[2] == m[1]]
    elif m := re.fullmatch(r"what color is the (\w+) that moves (to the right|to the left|up|down) "
                           r"(first|at the end)\?", question):  # fmt: skip
        k = 0 if m[3] == "first" else 1
        hits = [c[1] for c in segments[k] if c[2] == m[1] and c[3] == _MOTION_WORD[m[2]]]
    else:
        raise AssertionError(f"unexpected question {question!r}")
    assert len(hits) == 1, f"{question!r} fits {len(hits)} objects of {segments}"
    return hits[0]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_video_qa_answers_follow_the_motion(split: str) -> None:
    ds = SyntheticVideos(split, 300, image_size=16)
    items = [ds[i] for i in range(300)]
    assert set(items[0]) == {"id", "frames", "subtitles", "question", "answers"}
    questions = [it["question"] for it in items]
    for prefix in ("which way does", "what color is the moving", "how many shapes"):  # every kind occurs
        assert any(q.startswith(prefix) for q in questions), prefix
    for kind, when in (("which way", "first?"), ("which way", "at the end?"), ("what color", "first?"),
                       ("what color", "at the end?")):  # fmt: skip
        assert any(q.startswith(kind) and q.endswith(when) for q in questions), (kind, when)
    vocab = {"right", "left", "up", "down", "1", "2", "one", "two", *COLORS, "violet"}
    for it in items:
        assert len(it["answers"]) == 10 and set(it["answers"]) <= vocab
        majority = max(set(it["answers"]), key=it["answers"].count)
        assert majority == _expected_answer(it["question"], _segments(it["subtitles"])), it["question"]


def test_video_qa_is_deterministic_and_unambiguous() -> None:
    a, b = SyntheticVideos("val", 20, image_size=16), SyntheticVideos("val", 20, image_size=16)
    assert [(a[i]["question"], a[i]["answers"]) for i in range(20)] == [
        (b[i]["question"], b[i]["answers"]) for i in range(20)
    ]
    # Twin objects: no which-way question (their description is shared); colour only by a distinct motion.
    objs, directions = [("circle", "red", "small")] * 2, [["up", "left"], ["down", "left"]]
    seen = {make_video_qa(objs, directions, random.Random(s))[0] for s in range(200)}
    assert seen == {"how many shapes are moving?", "what color is the circle that moves up first?",
                    "what color is the circle that moves down first?"}  # fmt: skip
    # Same shape and motion throughout, different colours: no colour question picks one star out.
    objs, directions = [("star", "red", "small"), ("star", "blue", "small")], [["up", "up"], ["up", "up"]]
    seen = {make_video_qa(objs, directions, random.Random(s))[0] for s in range(100)}
    assert seen == {"how many shapes are moving?", "which way does the small red star move first?",
                    "which way does the small red star move at the end?",
                    "which way does the small blue star move first?",
                    "which way does the small blue star move at the end?"}  # fmt: skip
    with pytest.raises(ValueError, match="2 objects but 1 direction lists"):
        make_video_qa(objs, directions[:1], random.Random(0))


def test_render_sizes_and_colors_visible() -> None:
    """A large object covers clearly more pixels of its colour than a small one."""
    def pixels(size: str) -> int:
        im = render(Scene((Obj("square", "red", size, "center"),), "dark"), 64, seed=0)
        return sum(1 for r, g, b in im.getdata() if r > 150 and g < 90 and b < 90)

    assert pixels("large") > 2.3 * pixels("small") > 0


def test_caption_corpus_covers_vocabulary_and_bounds_length() -> None:
    texts = list(caption_corpus(n=50))
    words = set(" ".join(texts).replace(",", " ").replace(".", " ").replace("?", " ").split())
    for vocab in (SHAPES, COLORS, SIZES):
        assert set(vocab) <= words
    assert {w for p in POSITIONS for w in p.split()} <= words
    assert max(len(t.split()) for t in texts) <= 48 and max(len(t) for t in texts) <= 260
