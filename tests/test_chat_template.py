"""The chat template and its answer-only loss mask (docs/design.md §2, "Chat"): every template variant decoded and
compared with the conversation's answers, the exact rendered string, and broken templates / masks caught by the check."""
from __future__ import annotations

import pytest
import torch

from emu_lightning.data.layout.chat import (
    EMU2_CHAT_SYSTEM, PRESETS, AnswerMaskError, ChatTemplate, chat_template, check_answer_mask, target_runs,
)  # fmt: skip
from emu_lightning.data.layout.collate import IGNORE
from emu_lightning.data.layout.sequence import Layout, SequenceCollator
from emu_lightning.data.layout.tokens import SpecialIds

N = 4
IMG = torch.zeros(3, 8, 8)


def conversation(turns: int = 2, images: int = 1, video: bool = False) -> dict:
    conv = []
    for t in range(turns):
        marks = "".join("<image>" for _ in range(images)) if t == 0 else ""
        marks = ("<video>\n" if video and t == 0 else "") + marks
        conv += [{"from": "human", "value": f"{marks}\nquestion number {t}: what color is the star?"},
                 {"from": "gpt", "value": ["red", "a small blue star at the top left.", "3"][t % 3]}]
    sample = {"id": f"c{turns}{images}{video}", "images": [IMG] * images, "conversations": conv}
    if video:
        sample["video"] = [IMG] * 8
    return sample


def collate(tok, sample: dict, template: ChatTemplate, max_length: int = 512) -> dict:
    segs = Layout("chat", template=template)(sample)
    doc = {"id": sample["id"], "source": "chat", "segments": segs, "regress": segs.regress, "targets": segs.targets}
    return SequenceCollator(tok, N, max_length)([doc])


def answers(sample: dict) -> list[str]:
    return [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]


VARIANTS = [(name, turns, images, video) for name in PRESETS for turns, images, video in
            [(1, 1, False), (3, 1, False), (2, 2, False), (2, 0, True), (1, 0, False)]]


@pytest.mark.parametrize("name,turns,images,video", VARIANTS)
def test_mask_covers_exactly_each_answer_and_its_eos(tokenizer, name, turns, images, video):
    sample = conversation(turns, images, video)
    batch = collate(tokenizer, sample, PRESETS[name])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    runs = [tokenizer.decode(r, skip_special_tokens=False) for r in target_runs(labels)]
    # Decoded targets: each answer (its first token carries the template's space) then </s>, nothing else.
    assert runs == [" " + a + "</s>" for a in answers(sample)]
    # Every target sits where the label equals the input id (shifted CE reads labels[t] at t).
    assert all(y == i for i, y in zip(ids, labels) if y != IGNORE)
    # Nothing visual and no role marker is ever a target; no image is regressed in chat.
    sid = SpecialIds.from_tokenizer(tokenizer)
    roles = set(tokenizer.convert_tokens_to_ids(["[USER]", "[ASSISTANT]"]))
    assert not ({sid.image, sid.img, sid.img_end, sid.video, sid.bos, *roles} & {y for y in labels if y != IGNORE})
    assert batch["regress_images"].sum() == 0
    assert len(batch["pixel_values"]) == images + (8 if video else 0)   # Layout keeps num_frames (8) frames


def test_rendered_string_is_the_spec_template(tokenizer):
    sample = conversation(turns=2, images=1)
    batch = collate(tokenizer, sample, PRESETS["emu2_chat"])
    text = tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False)
    image = "[IMG]" + "<image>" * N + "[/IMG]"
    want = (f"<s>{EMU2_CHAT_SYSTEM} [USER]: {image}question number 0: what color is the star? [ASSISTANT]: red</s>"
            f"[USER]: question number 1: what color is the star? [ASSISTANT]: a small blue star at the top left.</s>")
    assert text == want


def test_generation_prompt_ends_without_the_space_the_answer_token_carries(tokenizer):
    t = PRESETS["plain"]
    segs = t.segments([("user", [("text", "hi")])], prompt=True)
    assert segs[-1] == ("prompt", " [ASSISTANT]:")
    # The training string tokenizes the answer's first token with its space: the prompt stops right before it.
    run = tokenizer(" [ASSISTANT]: red", add_special_tokens=False)["input_ids"]
    prompt = tokenizer(" [ASSISTANT]:", add_special_tokens=False)["input_ids"]
    assert run[:len(prompt)] == prompt and tokenizer.decode(run[len(prompt):]) == " red"


class _Recorder:
    """A stand-in system for `infer.Conversation`: records each prompt and replies with the training answer."""

    def __init__(self, template: ChatTemplate, replies: list[str]):
        self.template, self.replies, self.prompts = template, list(replies), []

    def generate_text(self, docs, max_new_tokens, num_beams):
        self.prompts += docs
        return [self.replies.pop(0)]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_inference_chat_prompt_with_two_images_is_the_training_prefix(tokenizer, name):
    """`python -m emu_lightning.inference chat --image a --image b --message ...` asks each turn with exactly the ids
    that precede that answer in training (both image blocks, then the question, then ` [ASSISTANT]:`): an empty
    reply from a two-image prompt is the model's, not the layout's."""
    from emu_lightning.data.layout.tokens import IMAGE
    from emu_lightning.inference import infer

    sample = conversation(turns=2, images=2)
    sample["conversations"][0]["value"] = f"{IMAGE}\n{IMAGE}\nwhich image has more shapes?"   # LLaVA / SyntheticChat
    batch = collate(tokenizer, sample, PRESETS[name])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    starts = [k for k in range(len(labels)) if labels[k] != IGNORE and (k == 0 or labels[k - 1] == IGNORE)]

    convo = infer.Conversation.__new__(infer.Conversation)       # the REPL's state, without a model
    convo.system, convo.max_new_tokens, convo.num_beams = _Recorder(PRESETS[name], answers(sample)), 4, 1
    convo.pending, convo.turns = [("image", IMG), ("image", IMG)], []
    for turn in sample["conversations"][0::2]:
        convo.say(turn["value"].replace(IMAGE, "").strip("\n"))
    collator = SequenceCollator(tokenizer, N, 512)
    asked = [collator.encode(doc, close=False, limit=10**9)[0] for doc in convo.system.prompts]
    assert asked == [ids[:k] for k in starts]
    assert asked[0].count(collator.ids.image) == 2 * N      # both images, in the first turn


def test_template_glued_to_the_answer_is_caught_with_the_decoded_sample(tokenizer):
    glued = ChatTemplate(assistant=" [ASSISTANT]: sm")   # "sm" + answer "all" tokenizes as " small"
    sample = {"id": "glued", "images": [IMG], "conversations": [
        {"from": "human", "value": "<image>what size is it?"}, {"from": "gpt", "value": "all"}]}
    with pytest.raises(AnswerMaskError) as err:
        collate(tokenizer, sample, glued)
    msg = str(err.value)
    assert "'glued'" in msg and "expected targets: ['all</s>']" in msg and "⟦ small</s>⟧" in msg


class LabelsTheRoleMarker(ChatTemplate):
    """A broken renderer: the assistant marker goes into the answer segment, so it would be trained on."""

    def segments(self, turns, prompt=False):
        out = []
        for k, v in super().segments(turns, prompt):
            if k == "prompt" and v == self.assistant:
                continue
            out.append(("answer", self.assistant + v) if k == "answer" else (k, v))
        return out


def test_renderer_that_labels_the_role_marker_is_caught(tokenizer):
    with pytest.raises(AnswerMaskError, match=r"masked targets:   \[' \[ASSISTANT\]: red</s>'"):
        collate(tokenizer, conversation(turns=1), LabelsTheRoleMarker())


@pytest.mark.parametrize("corrupt", ["shift", "drop_eos", "extra_prompt_token"])
def test_corrupted_masks_are_caught(tokenizer, corrupt):
    sample = conversation(turns=2)
    batch = collate(tokenizer, sample, PRESETS["plain"])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    first = next(i for i, y in enumerate(labels) if y != IGNORE)
    if corrupt == "shift":          # the classic off-by-one of masking by a separately tokenized prompt length
        labels = [IGNORE] + labels[:-1]
    elif corrupt == "drop_eos":
        labels[labels.index(SpecialIds.from_tokenizer(tokenizer).eos)] = IGNORE
    else:
        labels[first - 1] = ids[first - 1]
    with pytest.raises(AnswerMaskError):
        check_answer_mask(tokenizer, ids, labels, answers(sample), sample_id="x")


def test_truncated_conversation_keeps_a_prefix_of_the_answers(tokenizer):
    sample = conversation(turns=3)
    full = collate(tokenizer, sample, PRESETS["plain"])
    cut_at = int((full["labels"][0] != IGNORE).nonzero()[3]) + 1   # inside the second answer
    batch = collate(tokenizer, sample, PRESETS["plain"], max_length=cut_at)
    assert int(batch["num_truncated"]) == 1 and batch["input_ids"].shape[1] == cut_at
    runs = [tokenizer.decode(r) for r in target_runs(batch["labels"][0].tolist())]
    assert runs[0] == " red</s>" and " a small blue star at the top left.</s>".startswith(runs[1])


def test_placeholder_counts_and_roles_are_checked(tokenizer):
    layout = Layout("chat", template=PRESETS["plain"])
    two = conversation(images=2)
    two["images"] = [IMG]
    with pytest.raises(ValueError, match="more <image> placeholders than its 1 images"):
        layout(two)
    none = conversation(images=0)
    none["images"] = [IMG]
    with pytest.raises(ValueError, match="0 <image> placeholders for 1 images"):
        layout(none)
    flipped = conversation()
    flipped["conversations"] = flipped["conversations"][::-1]
    with pytest.raises(ValueError, match="alternating from user"):
        layout(flipped)


def test_template_spec_errors():
    assert chat_template("emu1") is PRESETS["emu1"]
    assert chat_template({"system": "be brief."}).system == "be brief."
    with pytest.raises(ValueError, match="not a preset"):
        chat_template("llava")
    with pytest.raises(ValueError, match=r"fields \['sep'\] are unknown"):
        chat_template({"sep": "###"})
    with pytest.raises(ValueError, match="adds `</s>` after each answer itself"):
        ChatTemplate(assistant=" [ASSISTANT]: </s>")
    with pytest.raises(ValueError, match="needs a chat template"):
        Layout("chat")


def test_conversation_cut_before_its_first_answer_is_accepted_and_a_cut_gen_document_regresses_nothing(tokenizer):
    sample = conversation(turns=2)
    full = collate(tokenizer, sample, PRESETS["plain"])
    first_target = int((full["labels"][0] != IGNORE).nonzero()[0])
    batch = collate(tokenizer, sample, PRESETS["plain"], max_length=first_target)   # cut before any answer
    assert int(batch["num_truncated"]) == 1 and (batch["labels"] == IGNORE).all()
    # A gen document whose target image does not fit: its reference must not take the image loss.
    segs = Layout("gen", train=False)({"id": "g", "instruction": "a picture of <image> and more words here",
                                        "references": [IMG], "image": IMG})
    doc = {"id": "g", "source": "gen", "segments": segs, "regress": segs.regress}
    cut = SequenceCollator(tokenizer, N, 20)([doc])
    whole = SequenceCollator(tokenizer, N, 200)([doc])
    assert int(cut["num_truncated"]) == 1 and len(cut["pixel_values"]) == 1 and not cut["regress_images"].any()
    assert whole["regress_images"].tolist() == [False, True]


def test_chat_video_keeps_num_frames():
    sample = conversation(turns=1, images=0, video=True)
    segs = Layout("chat", num_frames=4, template=PRESETS["plain"])(sample)
    (video,) = [v for k, v in segs if k == "video"]
    assert len(video) == 4


def test_layouts_can_name_evaluation_sets(tokenizer):
    from emu_lightning.data.modules.multimodal import MultimodalDataModule
    from emu_lightning.data.synthetic.scenes import SyntheticCaptions
    from emu_lightning.data.synthetic.instruct import SyntheticGen

    caps = SyntheticCaptions("val", size=2, image_size=32)
    dm = MultimodalDataModule(train={"gen": SyntheticGen("train", size=4, image_size=32)}, val={"coco": caps},
                              test={"plain": caps}, layouts={"coco": "gen"}, demos={}, image_size=32, batch_size=2,
                              tokenizer=tokenizer, num_image_tokens=N)
    (val,), (test,) = dm.val_dataloader(), dm.test_dataloader()
    vb, tb = next(iter(val)), next(iter(test))
    assert vb["layout"] == "gen" and vb["regress_images"].tolist() == [True, True]     # caption → image
    assert tb["layout"] == "pair"                                                       # not named: inferred
    with pytest.raises(ValueError, match=r"layouts names \['nope'\]"):
        MultimodalDataModule(train={"gen": SyntheticGen("train", size=4, image_size=32)}, val={}, test={}, demos={},
                             layouts={"nope": "gen"}, tokenizer=tokenizer, num_image_tokens=N)
