"""Stage-2 data: layouts, truncation at span boundaries, bad documents and videos, the per-step source mixture,
few-shot prompt construction and demonstration selection, real-format sources through the datamodule."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from emu_lightning.data.layout.fewshot import few_shot_segments, first_answer, random_demos, rices_demos
from emu_lightning.data.modules.mixture import SourceMixture, step_counts
from emu_lightning.data.layout.sequence import Layout, SequenceCollator, SkipSample
from emu_lightning.data.layout.tokens import IMAGE
from tests.helpers import tiny_stage2, tiny_stage2_datamodule

N = 4


def _img():
    return torch.zeros(3, 8, 8)


def _decode(tok, ids) -> str:
    text = tok.decode(ids, skip_special_tokens=False)
    return text.replace(IMAGE * N, "<image>×N")


@pytest.fixture(scope="module")
def collate(tokenizer):
    return SequenceCollator(tokenizer, N, max_length=64)


def test_layouts_of_each_kind(tokenizer, collate):
    def show(segs, video_token=True):
        c = SequenceCollator(tokenizer, N, 512, video_token)
        return _decode(tokenizer, c.encode(segs)[0])

    pair = Layout("pair", train=False)({"id": "p", "image": _img(), "captions": ["a red circle.", "x"]})
    assert show(pair) == "<s>[IMG]<image>×N[/IMG]a red circle.</s>"
    torch.manual_seed(0)
    orders = {Layout("pair")({"id": "p", "image": _img(), "captions": ["c."]})[0][0] for _ in range(40)}
    assert orders == {"image", "text"}  # both directions are trained
    doc = Layout("interleaved", train=False)({"id": "d", "images": [_img(), _img()], "texts": ["one.", "two."]})
    assert show(doc) == "<s>[IMG]<image>×N[/IMG]one.[IMG]<image>×N[/IMG]two.</s>"
    video = {"id": "v", "frames": [_img()] * 8, "subtitles": ["up."] * 4 + ["down."] * 4}
    vid = Layout("video", num_frames=4, train=False)(video)
    assert show(vid) == "<s>[VIDEO]" + "[IMG]<image>×N[/IMG]" * 4 + "up. down.</s>"
    assert show(vid, video_token=False) == "<s>" + "[IMG]<image>×N[/IMG]" * 4 + "up. down.</s>"  # Emu1
    story = Layout("storyboard", num_frames=8, train=False)(video)
    assert show(story) == "<s>" + "[IMG]<image>×N[/IMG]" * 4 + "up." + "[IMG]<image>×N[/IMG]" * 4 + "down.</s>"


def test_interleaved_document_whose_images_and_markers_disagree_names_it():
    bad = {"id": "doc-42", "images": [_img(), _img()], "texts": ["a.", "b."], "image_text_index": [0, 5]}
    with pytest.raises(ValueError, match="doc-42.*2 images"):
        Layout("interleaved")(bad)
    with pytest.raises(ValueError, match="doc-43"):
        Layout("interleaved")({"id": "doc-43", "images": [_img()] * 3, "texts": ["a."], "image_text_index": [0]})


def test_over_long_document_is_cut_at_a_span_boundary_and_counted(tokenizer):
    c = SequenceCollator(tokenizer, N, max_length=20)
    segs = [("image", _img()), ("text", "one."), ("image", _img()), ("text", "two."), ("image", _img())]
    batch = c([{"id": "d", "source": "s", "segments": segs}, {"id": "e", "source": "s", "segments": segs[:2]}])
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert len(ids) <= 20 and int(batch["num_truncated"]) == 1
    assert ids.count(c.ids.img) == ids.count(c.ids.img_end) == ids.count(c.ids.image) // N  # whole spans only
    assert ids[-1] != c.ids.eos and len(batch["pixel_values"]) == ids.count(c.ids.img) + 1
    short = batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist()
    assert short[-1] == c.ids.eos


def test_short_video_raises_or_is_skipped_and_counted(tokenizer):
    short = {"id": "clip-7", "frames": [_img()] * 3, "subtitles": ["a."] * 3}
    with pytest.raises(ValueError, match="clip-7.*3 frames.*num_frames=4"):
        Layout("video", num_frames=4)(short)
    with pytest.raises(SkipSample):
        Layout("video", num_frames=4, skip_short_videos=True)(short)
    ok = {"id": "clip-8", "frames": [_img()] * 4, "subtitles": ["b."] * 4}
    stream = SourceMixture({"v": [short, ok, short, ok]}, {"v": 2},
                           {"v": Layout("video", num_frames=4, skip_short_videos=True)}, prepare=lambda x: x)
    step = next(iter(stream))
    skipped = sum(d["skipped"].get("skipped_sample", 0) for d in step)
    assert [d["id"] for d in step] == ["clip-8", "clip-8"] and skipped >= 1
    assert SequenceCollator(tokenizer, N, 128)(step)["skipped"] == {"skipped_sample": skipped}


def test_step_counts_by_largest_remainder():
    assert step_counts({"a": 0.5, "b": 0.25, "c": 0.25}, 16) == {"a": 8, "b": 4, "c": 4}
    assert step_counts({"a": 12800, "b": 6400, "c": 3200}, 7) == {"a": 4, "b": 2, "c": 1}
    assert sum(step_counts({"a": 1, "b": 1, "c": 1}, 10).values()) == 10
    with pytest.raises(ValueError, match=r"\['c'\] get 0 of batch_size=4"):
        step_counts({"a": 100, "b": 100, "c": 1}, 4)


def test_mixture_takes_each_sources_count_every_step_deterministically():
    sources = {"a": [{"id": f"a{i}", "text": "x"} for i in range(10)], "b": [{"id": f"b{i}", "text": "y"} for i in range(3)]}
    layouts = {n: Layout("text") for n in sources}

    def steps(seed):
        it = iter(SourceMixture(sources, {"a": 3, "b": 2}, layouts, prepare=lambda x: x, seed=seed))
        return [[d["id"] for d in next(it)] for _ in range(4)]

    first = steps(0)
    assert all([i[0] for i in s] == ["a"] * 3 + ["b"] * 2 for s in first)
    assert first == steps(0) and first != steps(1)
    a_ids = [i for s in first for i in s if i.startswith("a")][:10]
    assert sorted(a_ids) == sorted(f"a{i}" for i in range(10))  # one pass is a permutation: no repeats


def test_few_shot_vqa_prompt_layout(tokenizer):
    demo = lambda q, a: {"image": _img(), "question": q, "answers": [a] * 7 + ["no"] * 3}  # noqa: E731
    query = {"image": _img(), "question": "what color is it?", "answers": ["red"] * 10}
    segs = few_shot_segments("vqa", [demo("is it big?", "yes"), demo("how many?", "2")], query)
    text = _decode(tokenizer, SequenceCollator(tokenizer, N, 512).encode(segs, close=False)[0])
    block = "[IMG]<image>×N[/IMG]"
    assert text == (f"<s>{block} based on the picture, is it big? short answer: yes. "
                    f"{block} based on the picture, how many? short answer: 2. "
                    f"{block} based on the picture, what color is it? short answer:")
    zero = few_shot_segments("vqa", [], query)
    assert zero[-1][1] == " based on the picture, answer in one word or phrase. what color is it? short answer:"
    cap = few_shot_segments("caption", [{"image": _img(), "captions": ["a dog."]}], {"image": _img()})
    assert [k for k, _ in cap] == ["image", "text", "image"] and cap[1][1] == "a dog."
    vid = few_shot_segments("videoqa", [], {"frames": [_img()] * 2, "question": "which way?"})
    assert vid[0][0] == "video" and "based on the video" in vid[1][1]
    assert first_answer("yes. [garbage") == "yes" and first_answer(" red\nmore") == "red"


def test_random_demos_are_seeded_and_nested_and_rices_puts_the_nearest_last():
    a, b = random_demos(100, 8, "q1"), random_demos(100, 8, "q1")
    assert a == b and len(set(a)) == 8 and random_demos(100, 2, "q1") == a[:2] and random_demos(100, 8, "q2") != a
    pool = torch.eye(5)                                   # pool item i points along axis i
    query = torch.tensor([[0.1, 0.2, 0.0, 0.9, 0.5]])    # nearest: 3, then 4, then 1
    assert rices_demos(query, pool, 3).tolist() == [[1, 4, 3]]


def _write_real(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / name)
    doc = {"text_list": ["first.", "second."], "image_info": [
        {"image_name": "b.png", "matched_text_index": 1}, {"image_name": "a.png", "matched_text_index": 0}]}
    (tmp_path / "docs.jsonl").write_text(json.dumps(doc) + "\n" + json.dumps({**doc, "id": "d2"}) + "\n")
    (tmp_path / "v1").mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (0, 60 * i, 0)).save(tmp_path / "v1" / f"{i:03d}.png")
    (tmp_path / "videos.jsonl").write_text(json.dumps({"id": "v1", "frames": "v1", "caption": "it moves."}) + "\n")


def test_real_format_sources_through_the_datamodule(tmp_path):
    from emu_lightning.data.real.interleaved import Mmc4Documents, VideoFolder

    _write_real(tmp_path)
    system = tiny_stage2("meanpool")
    train = {"mmc4": Mmc4Documents(str(tmp_path / "docs.jsonl"), str(tmp_path)),
             "videos": VideoFolder(str(tmp_path), str(tmp_path / "videos.jsonl"))}
    dm = tiny_stage2_datamodule(system, train=train, weights={"mmc4": 2, "videos": 1}, layouts={}, batch_size=3)
    assert dm.layout_kinds == {"mmc4": "interleaved", "videos": "video"}
    batch = next(iter(dm.train_dataloader()))
    assert batch["source_names"] == ["mmc4", "videos"] and batch["source_index"].tolist() == [0, 0, 1]
    assert batch["pixel_values"].shape[0] == 2 + 2 + 4   # two 2-image documents and one 4-frame video
    losses, per_source = system.losses(batch)
    assert set(per_source) == {"mmc4", "videos"} and torch.isfinite(losses["loss"])


def test_datamodule_checks_source_names(tmp_path):
    system = tiny_stage2("meanpool")
    with pytest.raises(ValueError, match="weights name"):
        tiny_stage2_datamodule(system, weights={"pairs": 1})
    with pytest.raises(ValueError, match="layouts names"):
        tiny_stage2_datamodule(system, layouts={"nope": "video"})
