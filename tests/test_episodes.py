"""Fast-binding episodes (in-context learning, docs/synthetic_world.md "Episodes"): the generator's bindings and word pools, the exact
prompts the collator writes at k = 0/1/4, the fast-binding metric, the zero-shot VQA share's layout, and the
per-k metric in the stage-2 validation loop."""
from __future__ import annotations

import re

import lightning as L
import numpy as np
import pytest
import torch

from emu_lightning.data.layout.binding import binding_prompt, binding_segments
from emu_lightning.data.layout.fewshot import few_shot_segments, task_of
from emu_lightning.data.layout.sequence import Layout, SequenceCollator
from emu_lightning.data.layout.tokens import IMAGE
from emu_lightning.data.synthetic.episodes import (
    BINDING_KINDS,
    EPISODE_SPLITS,
    BindingEpisodes,
    SyntheticEpisodes,
    category,
    word_pool,
)
from emu_lightning.data.synthetic.scenes import HELDOUT_PAIRS, SyntheticVideos, SyntheticVQA, caption_corpus
from emu_lightning.metrics.binding import BindingAccuracy, binding_correct, first_word

N = 4
B = "[IMG]<image>×N[/IMG]"


def _decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False).replace(IMAGE * N, "<image>×N")


@pytest.fixture(scope="module")
def collate(tokenizer):
    return SequenceCollator(tokenizer, N, max_length=10**6)


def _all_episodes(n: int = 40):
    for split in EPISODE_SPLITS:
        yield from (SyntheticEpisodes(split, n, image_size=16)[i] for i in range(n))
        yield from (BindingEpisodes(split, n, image_size=16)[i] for i in range(n))


def test_bindings_are_consistent_within_an_episode():
    kinds = set()
    for ep in _all_episodes():
        meta, split = ep["episode"], ep["id"].split("-")[3]
        kind, words = meta["kind"], meta["words"]
        kinds.add(kind)
        assert len(set(words.values())) == len(words)                 # one word per category, one category per word
        assert set(words) <= set(word_pool(split))                    # drawn from its split's pool
        assert len(ep["images"]) == len(ep["texts"]) == len(meta["labels"]) == len(meta["objects"])
        for obj, word, text in zip(meta["objects"], meta["labels"], ep["texts"]):
            assert category(obj, kind) == words[word]                 # every image shows its word's category
            assert re.search(rf"\b{word}\.$", text)                   # ... and its sentence names that word
            assert (obj.color, obj.shape) not in HELDOUT_PAIRS
        assert ep["answer"] == meta["labels"][-1] and ep["texts"][-1] == f"{meta['prompt']} {ep['answer']}."
        assert meta["objects"][-1] not in meta["objects"][:-1]        # the question shows a new image
    assert kinds == set(BINDING_KINDS)


def test_training_episodes_are_bursty_and_answerable():
    ds = SyntheticEpisodes("train", 200, image_size=16)
    ways_seen = set()
    for i in range(len(ds)):
        meta = ds[i]["episode"]
        demos = meta["labels"][:-1]
        ways_seen.add(len(meta["words"]))
        assert 1 <= len(demos) <= 8 and set(demos) == set(meta["words"])   # every category shown at least once
        assert meta["labels"][-1] in demos                                   # the query is always answerable
    assert ways_seen == {1, 2, 3}


def test_evaluation_episodes_show_every_category_once_per_round():
    ds = BindingEpisodes("val", 30, image_size=16, ways=2, shots=[0, 1, 2, 4, 8])
    first_shown = 0
    for i in range(len(ds)):
        ep = ds[i]
        demos = ep["episode"]["labels"][:-1]
        assert len(demos) == 8 and ep["episode"]["shots"] == [0, 1, 2, 4, 8]
        assert all(len(set(demos[r:r + 2])) == 2 for r in range(0, 8, 2))   # k >= 2 always shows the query's word
        first_shown += demos[0] == ep["answer"]
    assert 0.2 < first_shown / len(ds) < 0.8                                # k = 1: about half of the time


def test_word_pools_are_disjoint_across_splits_and_from_the_world_vocabulary():
    pools = {s: set(word_pool(s)) for s in EPISODE_SPLITS}
    assert len(pools["train"]) > 3000 and min(len(pools["val"]), len(pools["test"])) > 400
    assert not pools["train"] & pools["val"] and not pools["train"] & pools["test"] and not pools["val"] & pools["test"]
    # Every word the world writes: captions, VQA, stories, vocabulary (the tokenizer corpus), video subtitles and
    # questions, chat and generation instructions, the few-shot and chat prompts, the episodes' own sentences.
    from emu_lightning.data.layout.chat import EMU1_SYSTEM, EMU2_CHAT_SYSTEM
    from emu_lightning.data.synthetic.instruct import SyntheticChat, SyntheticGen

    texts = list(caption_corpus(seed=0, n=2000)) + [EMU1_SYSTEM, EMU2_CHAT_SYSTEM]
    for i in range(60):
        video = SyntheticVideos("train", 60, image_size=16)[i]
        chat = SyntheticChat("train", 60, image_size=16)[i]
        texts += [*video["subtitles"], video["question"], *video["answers"], *chat["answers"],
                  *(turn["value"] for turn in chat["conversations"]),
                  SyntheticGen("train", 60, image_size=16)[i]["instruction"]]
    vqa = SyntheticVQA("val", 1, image_size=16)[0]
    texts += [t for _, t in few_shot_segments("vqa", [vqa], vqa) if isinstance(t, str)]
    for ep in _all_episodes(10):   # their sentences without the episode's words
        texts += [" ".join(x for x in t.split() if x.strip(".") not in ep["episode"]["words"]) for t in ep["texts"]]
    world = set(re.findall(r"[a-z]+", " ".join(texts).lower()))
    assert {"circle", "purple", "size", "move", "question", "picture"} <= world
    for split, pool in pools.items():
        assert not pool & world, (split, sorted(pool & world))


def test_decoded_prompts_at_k0_k1_k4_are_exact(tokenizer, collate):
    for kind, demo, question in [
        ("object", "this is a {}.", "question: what is this? answer: this is a"),
        ("color", "this color is {}.", "question: what color is this? answer: this color is"),
        ("shape", "this shape is a {}.", "question: what shape is this? answer: this shape is a"),
    ]:
        ep = BindingEpisodes("val", 4, image_size=16, kinds=[kind])[3]
        words = ep["episode"]["labels"]
        for k in (0, 1, 4):
            ids, _, images, _ = collate.encode(binding_prompt(ep, k), close=False)
            expected = "<s>" + "".join(B + demo.format(w) for w in words[:k]) + B + question
            assert _decode(tokenizer, ids) == expected and len(images) == k + 1
        # The k-shot prompt is, token for token, a prefix of the training document (layout `binding`).
        full = collate.encode(Layout("binding")(ep))[0]
        prompt = collate.encode(binding_prompt(ep, 8), close=False)[0]
        assert full[:len(prompt)] == prompt
        assert _decode(tokenizer, full[len(prompt):]) == f" {ep['answer']}.</s>"
    # e.g. one whole training document of the object kind:
    ep = BindingEpisodes("val", 4, image_size=16, kinds=["object"], shots=[2])[0]
    w = ep["episode"]["labels"]
    assert _decode(tokenizer, collate.encode(binding_segments(ep))[0]) == (
        f"<s>{B}this is a {w[0]}.{B}this is a {w[1]}.{B}question: what is this? answer: this is a {w[2]}.</s>")


def test_binding_layout_is_inferred_and_never_reorders(collate):
    ep = SyntheticEpisodes("train", 2, image_size=16)[1]
    assert Layout.infer(ep) == "binding"
    orders = set()
    for seed in range(10):
        torch.manual_seed(seed)
        orders.add(tuple(kind for kind, _ in Layout("binding", train=True)(ep)))
    assert orders == {("image", "text") * len(ep["images"])}   # image always before the sentence naming it
    with pytest.raises(ValueError, match="k=9 demonstrations requested, it has 8"):
        binding_prompt(BindingEpisodes("val", 1, image_size=16)[0], 9)


def test_fast_binding_metric_on_hand_written_cases():
    assert binding_correct("dafu.", "dafu") and binding_correct(" dafu", "dafu")
    assert binding_correct("Dafu. this is a kimo.", "dafu") and binding_correct("DAFU", "dafu")   # case
    assert binding_correct("dafu the red one", "dafu") and binding_correct("dafu, again", "dafu")  # extra words
    assert not binding_correct("kimo.", "dafu")                                                    # wrong word
    assert not binding_correct("a dafu", "dafu") and not binding_correct("dafus", "dafu")
    assert not binding_correct("", "dafu") and not binding_correct(". dafu", "dafu")  # after the first period
    assert not binding_correct("\ndafu", "dafu")                                       # after the first line break
    assert first_word("  Kimo, the blue one.") == "kimo"
    metric = BindingAccuracy()
    metric.update(["dafu.", "Kimo", "wug"], ["dafu", "kimo", "dafu"])
    metric.update(["zepa is it"], ["zepa"])
    assert float(metric.compute()) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="2 predictions but 1 bound words"):
        metric.update(["a", "b"], ["a"])


def test_vqa_share_is_the_harness_zero_shot_prompt_plus_the_answer(tokenizer, collate):
    ds = SyntheticVQA("train", 8, image_size=16)
    assert task_of("vqa_zero_shot", ds[0]) == "vqa"
    for i in range(len(ds)):
        s = ds[i]
        trained = collate.encode(Layout("vqa_zero_shot", train=False)(s))[0]
        prompt = collate.encode(few_shot_segments("vqa", [], s), close=False)[0]   # what zero-shot evaluation asks
        answer = s["answers"][0]
        assert _decode(tokenizer, trained) == _decode(tokenizer, prompt) + f" {answer}</s>"
        assert _decode(tokenizer, trained) == (f"<s>{B} based on the picture, answer in one word or phrase. "
                                              f"{s['question']} short answer: {answer}</s>")
        assert trained[:len(prompt)] == prompt                                          # token for token
    torch.manual_seed(0)
    picked = {Layout("vqa_zero_shot")(ds[0])[1][1].rsplit(": ", 1)[1] for _ in range(50)}
    assert picked <= set(ds[0]["answers"])                                              # training: an annotator


def test_episodes_are_deterministic_per_index():
    for cls in (SyntheticEpisodes, BindingEpisodes):
        a, b = cls("val", 5, image_size=16)[2], cls("val", 5, image_size=16)[2]
        assert a["texts"] == b["texts"] and a["episode"] == b["episode"]
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a["images"], b["images"]))
        other = cls("val", 5, image_size=16, seed=1)[2]
        assert other["texts"] != a["texts"]
        assert cls("val", 5, image_size=16)[3]["texts"] != a["texts"]
        with pytest.raises(IndexError, match="index 5 outside"):
            cls("val", 5, image_size=16)[5]
    with pytest.raises(ValueError, match="split='heldout'"):
        SyntheticEpisodes("heldout", 5)
    with pytest.raises(ValueError, match="kinds=\\['size'\\]"):
        BindingEpisodes("val", 5, kinds=["size"])


@pytest.mark.usefixtures("one_thread")
def test_validation_logs_binding_accuracy_per_k(monkeypatch):
    from tests.helpers import IMAGE_SIZE, tiny_stage2, tiny_stage2_datamodule

    system = tiny_stage2(answer_max_new_tokens=3)
    episodes = BindingEpisodes("val", 6, image_size=IMAGE_SIZE, shots=[0, 1, 2, 4])
    dm = tiny_stage2_datamodule(system, val={"binding": episodes}, demos={}, eval_batch_size=6, max_length=192)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=1)
    metrics = trainer.validate(system, datamodule=dm, verbose=False)[0]
    assert {f"binding/binding_acc_k{k}" for k in (0, 1, 2, 4)} <= set(metrics)
    assert all(0.0 <= metrics[f"binding/binding_acc_k{k}"] <= 1.0 for k in (0, 1, 2, 4))
    assert "binding/text_loss" in metrics

    # An oracle that answers with the word the demonstrations gave the query's category (it finds the episode by
    # its query image): 0 at k = 0 by construction, the share whose first demonstration is the query's at k = 1,
    # all from k = 2 (2-way rounds). So the prompt at k carries exactly the first k demonstrations.
    prepared = [dm.prepare_sample(episodes[i]) for i in range(len(episodes))]

    def oracle(prompts, max_new_tokens, num_beams=1):
        out = []
        for segs in prompts:
            ep = next(e for e in prepared if torch.equal(e["images"][-1], segs[-2][1]))
            shown = " ".join(v for kind, v in segs[:-2] if kind == "text")
            out.append(f"{ep['answer'].upper()}." if f" {ep['answer']}." in f" {shown}" else "wug.")
        return out

    monkeypatch.setattr(system, "generate_text", oracle)
    metrics = trainer.validate(system, datamodule=dm, verbose=False)[0]
    first = sum(e["episode"]["labels"][0] == e["answer"] for e in prepared) / len(prepared)
    assert [metrics[f"binding/binding_acc_k{k}"] for k in (0, 1, 2, 4)] == pytest.approx([0.0, first, 1.0, 1.0])
