"""The chat template (docs/design.md §2 "Chat"), the one place the instruction-tuning format lives, and its mask check.

A conversation is rendered as the exact string

    <s>{system} [USER]: {instruction} [ASSISTANT]: {answer}</s>[USER]: {instruction} [ASSISTANT]: {answer}</s>

with images (`[IMG]<image>×N[/IMG]`) and videos (`[VIDEO]` + frame blocks) where the instruction's `<image>` /
`<video>` placeholders stand (LLaVA convention). A generation prompt ends `" [ASSISTANT]:"`, without the space:
the answer's first token carries it, exactly as the training string tokenizes (`": yes"` → `":"`, `" yes"`).

Loss: every answer and the `</s>` that closes it, nothing else (docs/design.md §2, instruction tuning). The template
renders segments `("prompt", str)` (no loss), `("answer", str)` (loss), `("image", x)`, `("video", frames)`;
`SequenceCollator` tokenizes each run of text between visual spans in one call with character offsets, so the
ids are the rendered string's own, and a token is a target when its characters overlap an answer.

Changing the template cannot silently break that mask: `check_answer_mask` decodes every run of target tokens
and compares it with the conversation's answers, read from the sample's assistant turns rather than from the
rendered segments, and
raises `AnswerMaskError` showing the decoded sample (targets in ⟦ ⟧) when they differ. The collator runs it on
every training sequence. E.g. a template ending `"... the answer is"` glues its last word to the answer
(`"isyes"` is one token), and the check names it.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from emu_lightning.data.layout.tokens import EOS, IMAGE

VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDER = re.compile(f"({re.escape(IMAGE)}|{re.escape(VIDEO_PLACEHOLDER)})")

# docs/design.md §5 system messages. Emu1's names the image span literally, as the release's prompt does.
EMU1_SYSTEM = ("You will be presented with an image: [IMG]ImageContent[/IMG]. You will be able to see the image "
               "after I provide it to you. Please answer my questions based on the given image.")
EMU2_CHAT_SYSTEM = "You are a helpful assistant, dedicated to provide concise and efficient answers."


class AnswerMaskError(ValueError):
    """The loss mask of a chat sequence does not cover exactly its assistant answers."""


@dataclass(frozen=True)
class ChatTemplate:
    """Role strings of the chat format; `PRESETS` holds the papers' variants.

    Args:
        system: system message before the first turn ("" = none).
        user: before the first instruction.
        next_user: before each later instruction (the previous answer's `</s>` precedes it).
        assistant: before each answer; a generation prompt ends with it right-stripped.
    """

    system: str = ""
    user: str = " [USER]: "
    next_user: str = "[USER]: "
    assistant: str = " [ASSISTANT]: "

    def __post_init__(self) -> None:
        for field, value in asdict(self).items():
            if EOS in value or _PLACEHOLDER.search(value):
                raise ValueError(f"ChatTemplate.{field}={value!r} contains {EOS!r} or an image/video placeholder: "
                                 f"the template adds `{EOS}` after each answer itself")
        if not self.assistant.strip():
            raise ValueError(f"ChatTemplate.assistant={self.assistant!r} is blank: answers need a role marker")

    def segments(self, turns: list[tuple[str, list]], prompt: bool = False) -> list[tuple[str, Any]]:
        """`[(role, content segments)]` alternating user/assistant → template segments.

        With `prompt`, the turns must end with a user turn and the segments end with the generation prompt.
        """
        _check_turns(turns, prompt)
        out: list[tuple[str, Any]] = [("prompt", self.system)] if self.system else []
        for i, (role, content) in enumerate(turns):
            if role == "user":
                out.append(("prompt", self.user if i == 0 else self.next_user))
                out += [("prompt", v) if k == "text" else (k, v) for k, v in content]
            else:
                text = "".join(v for _, v in content)
                out += [("prompt", self.assistant), ("answer", text + EOS)]
        if prompt:
            out.append(("prompt", self.assistant.rstrip()))
        return [(k, v) for k, v in out if not (k == "prompt" and v == "")]


PRESETS: dict[str, ChatTemplate] = {
    "emu1": ChatTemplate(system=EMU1_SYSTEM),
    "emu2_chat": ChatTemplate(system=EMU2_CHAT_SYSTEM),
    "plain": ChatTemplate(),
}


def chat_template(spec: str | dict | ChatTemplate | None) -> ChatTemplate | None:
    """A preset name, a dict of `ChatTemplate` fields, or a template → the template (None stays None)."""
    if spec is None or isinstance(spec, ChatTemplate):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"chat template {spec!r} is not a preset {sorted(PRESETS)}; give a preset name or a "
                             f"dict of ChatTemplate fields {list(asdict(ChatTemplate()))}")
        return PRESETS[spec]
    unknown = sorted(set(spec) - set(asdict(ChatTemplate())))
    if unknown:
        raise ValueError(f"chat template fields {unknown} are unknown; expected {list(asdict(ChatTemplate()))}")
    return ChatTemplate(**spec)


def _check_turns(turns: list[tuple[str, list]], prompt: bool) -> None:
    roles = [r for r, _ in turns]
    want = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or roles != want or (prompt and roles[-1] != "user") or (not prompt and roles[-1] != "assistant"):
        end = "a user turn (a prompt)" if prompt else "an assistant turn"
        raise ValueError(f"conversation roles {roles}: expected user/assistant alternating from user, ending with {end}")
    for role, content in turns:
        if role == "assistant" and any(k != "text" for k, _ in content):
            raise ValueError("an assistant turn holds an image or video: answers are text only in chat tuning")


def conversation_turns(sample: dict) -> list[tuple[str, list]]:
    """A LLaVA-style sample (`conversations` of human/gpt turns, `images`, optional `video`) → turns whose user
    content has the images and the video where their placeholders stand. Counts must match exactly."""
    images, video = list(sample.get("images", [])), sample.get("video")
    turns, used_images, used_video = [], 0, 0
    for turn in sample["conversations"]:
        role = {"human": "user", "gpt": "assistant"}.get(turn["from"], turn["from"])
        content: list[tuple[str, Any]] = []
        for piece in _PLACEHOLDER.split(turn["value"]):
            if piece == IMAGE:
                if used_images >= len(images):
                    raise ValueError(f"sample {sample.get('id')!r}: more {IMAGE} placeholders than its "
                                     f"{len(images)} images")
                content.append(("image", images[used_images]))
                used_images += 1
            elif piece == VIDEO_PLACEHOLDER:
                if video is None or used_video:
                    raise ValueError(f"sample {sample.get('id')!r}: a {VIDEO_PLACEHOLDER} placeholder without "
                                     f"exactly one video")
                content.append(("video", video))
                used_video += 1
            elif piece:
                content.append(("text", piece.strip("\n") if role == "user" else piece))
        turns.append((role, content))
    if used_images != len(images) or (video is not None and not used_video):
        raise ValueError(f"sample {sample.get('id')!r}: {used_images} {IMAGE} placeholders for {len(images)} images"
                         f", {used_video} {VIDEO_PLACEHOLDER} for {int(video is not None)} video")
    return turns


def target_runs(labels: list[int], ignore: int = -100) -> list[list[int]]:
    """Contiguous runs of target ids in a label row, in order."""
    runs: list[list[int]] = []
    prev = ignore
    for y in labels:
        if y != ignore:
            if prev == ignore:
                runs.append([])
            runs[-1].append(y)
        prev = y
    return runs


def show_targets(tokenizer: Any, ids: list[int], labels: list[int], ignore: int = -100) -> str:
    """The decoded sequence with its target spans in ⟦ ⟧ (runs of `<image>` shortened)."""
    out, open_ = [], False
    for i, y in zip(ids, labels):
        is_target = y != ignore
        if is_target != open_:
            out.append("⟦" if is_target else "⟧")
            open_ = is_target
        out.append(tokenizer.decode([i], skip_special_tokens=False))
    text = "".join(out) + ("⟧" if open_ else "")
    return re.sub(f"(?:{re.escape(IMAGE)}){{3,}}", f"{IMAGE}×…", text)


def _squash(text: str) -> str:
    return "".join(text.split())  # decoders differ in spaces around special tokens; words must not


def check_answer_mask(tokenizer: Any, ids: list[int] | torch.Tensor, labels: list[int] | torch.Tensor,
                      answers: list[str], truncated: bool = False, sample_id: Any = None) -> None:
    """Raise `AnswerMaskError` unless the targets are exactly each answer followed by `</s>`, in order.

    Args:
        tokenizer: the collator's tokenizer.
        ids, labels: one sequence (labels -100 where there is no loss).
        answers: the conversation's assistant answers, from the raw sample.
        truncated: the sequence was cut: the targets may stop early, inside or after an answer.
        sample_id: named in the error.
    """
    ids, labels = [int(i) for i in ids], [int(y) for y in labels]
    runs = [tokenizer.decode(r, skip_special_tokens=False) for r in target_runs(labels)]
    expected = [a + EOS for a in answers]
    got, want = [_squash(r) for r in runs], [_squash(e) for e in expected]
    ok = got == want
    if truncated and not ok and len(got) <= len(want):
        # Cut: the answers before the cut, whole, then a prefix of the one it cut (or nothing at all). A cut inside
        # a multi-byte character decodes to U+FFFD at the end.
        n = len(got)
        ok = n == 0 or (got[:n - 1] == want[:n - 1] and want[n - 1].startswith(got[-1].rstrip("\ufffd")))
    if not ok:
        raise AnswerMaskError(
            f"sample {sample_id!r}: the loss mask does not cover exactly the assistant answers.\n"
            f"  expected targets: {expected}\n  masked targets:   {runs}\n"
            f"  decoded sample (targets in ⟦ ⟧): {show_targets(tokenizer, ids, labels)}\n"
            f"Check the chat template: text glued to an answer (no space or punctuation between them) tokenizes "
            f"together with it.")
