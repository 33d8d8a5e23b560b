"""Stage-2 multimodal sequences (docs/design.md §2): layouts that turn a sample into segments, and their collator.

A *document* is a list of segments, each `("text", str)`, `("image", (3,H,W))` or `("video", [(3,H,W), ...])`.
The collator writes `<s>` + segments + `</s>` with every image as `[IMG]<image>×N[/IMG]` and every video as
`[VIDEO]` (Emu2; Emu1 has none) + one image block per frame; in the release's layout (`spelling="emu2"`,
`spelling.py`) a frame's block is `[IMG][gIMG]×N[/IMG]` instead, the Emu2 release's video placeholder. Which
positions carry which loss:

- cross-entropy: every text token and the closing `</s>`; `<s>`, `[IMG]`, `<image>`, `[gIMG]`, `[/IMG]`, `[VIDEO]`
  and `[PAD]` are never targets (labels -100, docs/design.md §2 "Cross-entropy");
- regression: the system reads it off `input_ids` (the position before each `<image>` or `[gIMG]`, and for Emu1
  before `[/IMG]`), so the collator only says which images regress (`regress_images`, all by default).

Chat documents (`chat.py`) use `("prompt", str)` (no loss) and `("answer", str)` (loss) instead of `text`: each run of
them between visual spans is tokenized as one string with character offsets, and the doc's `targets` (its raw
answers) are checked against the resulting mask (`check_answer_mask`). A layout returns `Segments`, a list that
also says which images regress and, for chat, the answers.

A document longer than `max_length` is cut at a segment boundary or inside a text segment, never inside a
visual span, loses its `</s>`, and is counted in `num_truncated`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from emu_lightning.data.layout.binding import binding_segments
from emu_lightning.data.layout.chat import check_answer_mask, conversation_turns
from emu_lightning.data.layout.collate import IGNORE, image_block, sum_counts
from emu_lightning.data.layout.spelling import respell
from emu_lightning.data.layout.tokens import FRAME, IMAGE, SpecialIds

LAYOUTS = ("pair", "interleaved", "video", "storyboard", "vqa", "text", "chat", "gen", "binding", "vqa_zero_shot")


class Segments(list):
    """A document's segments, plus what the collator needs beyond them.

    Attributes:
        regress: which images the regression loss covers: "all", "last" (Emu2-Gen) or "none" (chat).
        targets: chat only: the assistant answers the loss mask must cover exactly (from the raw sample).
    """

    def __init__(self, items=(), regress: str = "all", targets: list[str] | None = None):
        super().__init__(items)
        self.regress, self.targets = regress, targets


class SkipSample(Exception):
    """A sample that is skipped and counted, never silently dropped (e.g. an undecodable image, a video shorter
    than `num_frames`). `kind` names the count it goes to: `train/skipped/<kind>`."""

    kind = "skipped_sample"


def _coin(p: float) -> bool:
    # torch RNG: seeded per DataLoader worker by `seed_everything(workers=True)`, so runs repeat.
    return bool(torch.rand(()) < p)


def merge_adjacent(texts: list[str]) -> list[tuple[int, str]]:
    """[(first index, text)] with adjacent duplicates merged (YT-Storyboard subtitles, docs/design.md §2)."""
    runs: list[tuple[int, str]] = []
    for i, t in enumerate(texts):
        if not runs or texts[i - 1] != t:
            runs.append((i, t))
    return runs


class Layout:
    """Sample dict → document segments, for one data kind.

    Args:
        kind: one of `LAYOUTS`; `infer(sample)` picks it from the sample's keys when a recipe gives none.
        text_first_p: pairs: probability of `caption → image` (both directions are learned, docs/design.md §2).
        image_first_p: interleaved: probability an image goes before its sentence (Emu2: 0.5).
        num_frames: frames per video; a shorter video raises, or is skipped when `skip_short_videos`.
        skip_short_videos: skip (and count) short videos instead of raising.
        train: training draws a random caption / order; evaluation is deterministic (caption 0, image first).
        template: the chat template (`chat.ChatTemplate`), needed by the `chat` layout only.
    """

    def __init__(self, kind: str, text_first_p: float = 0.5, image_first_p: float = 0.5, num_frames: int = 8,
                 skip_short_videos: bool = False, train: bool = True, template: Any = None):
        if kind not in LAYOUTS:
            raise ValueError(f"layout {kind!r} is not one of {LAYOUTS}")
        if kind == "chat" and template is None:
            raise ValueError("the chat layout needs a chat template (the model's `template`, linked by the CLI)")
        self.kind, self.text_first_p, self.image_first_p = kind, text_first_p, image_first_p
        self.num_frames, self.skip_short_videos, self.train = num_frames, skip_short_videos, train
        self.template = template

    @staticmethod
    def infer(sample: dict) -> str:
        if "conversations" in sample:
            return "chat"
        if "instruction" in sample and "image" in sample:
            return "gen"
        if "frames" in sample:
            return "video"
        if "episode" in sample:
            return "binding"
        if "images" in sample:
            return "interleaved"
        if "question" in sample and "image" in sample:
            return "vqa"
        if "captions" in sample and "image" in sample:
            return "pair"
        if "text" in sample:
            return "text"
        raise ValueError(f"sample {sample.get('id')!r}: keys {sorted(sample)} match no layout in {LAYOUTS}")

    def __call__(self, s: dict) -> Segments:
        segs = getattr(self, f"_{self.kind}")(s)
        return segs if isinstance(segs, Segments) else Segments(segs)

    def _pick(self, options: list[str], what: str, s: dict) -> str:
        if not options:
            raise ValueError(f"sample {s.get('id')!r}: empty {what!r} list")
        return options[int(torch.randint(len(options), ()))] if self.train else options[0]

    def _pair(self, s: dict) -> list:
        segs = [("image", s["image"]), ("text", self._pick(s["captions"], "captions", s))]
        return segs[::-1] if self.train and _coin(self.text_first_p) else segs

    def _interleaved(self, s: dict) -> list:
        images, texts = s["images"], s["texts"]
        where = s.get("image_text_index", list(range(len(images))))
        if len(where) != len(images) or any(not 0 <= w < len(texts) for w in where):
            raise ValueError(f"document {s.get('id')!r}: {len(images)} images but image_text_index {where} "
                             f"for {len(texts)} texts (each image needs one text index in range)")
        segs: list = []
        for i, text in enumerate(texts):
            mine = [("image", im) for im, w in zip(images, where) if w == i]
            before = not self.train or _coin(self.image_first_p)
            segs += [*mine, ("text", text)] if before else [("text", text), *mine]
        return segs

    def _frames(self, s: dict) -> list:
        frames = s["frames"]
        if len(frames) < self.num_frames:
            msg = f"video {s.get('id')!r} has {len(frames)} frames, fewer than num_frames={self.num_frames}"
            raise SkipSample(msg) if self.skip_short_videos else ValueError(msg)
        # Uniform temporal subsampling to num_frames (all of them when equal).
        keep = torch.linspace(0, len(frames) - 1, self.num_frames).round().long().tolist()
        return keep

    def _video(self, s: dict) -> list:
        keep = self._frames(s)
        caption = " ".join(t for _, t in merge_adjacent([s["subtitles"][i] for i in keep]))
        return [("video", [s["frames"][i] for i in keep]), ("text", caption)]

    def _storyboard(self, s: dict) -> list:
        # Frames and subtitles by timestamp, adjacent subtitles merged: frames of a run, then its subtitle.
        keep = self._frames(s)
        subs = [s["subtitles"][i] for i in keep]
        runs = merge_adjacent(subs) + [(len(keep), "")]
        segs: list = []
        for (start, text), (end, _) in zip(runs, runs[1:]):
            segs += [("image", s["frames"][keep[j]]) for j in range(start, end)] + [("text", text)]
        return segs

    def _vqa(self, s: dict) -> list:
        answer = self._pick(s["answers"], "answers", s)
        return [("image", s["image"]), ("text", vqa_text(s["question"], answer))]

    def _vqa_zero_shot(self, s: dict) -> list:
        # The few-shot harness's zero-shot prompt (`fewshot.few_shot_segments`) + the answer: zero-shot evaluation
        # reads exactly what training wrote.
        answer = self._pick(s["answers"], "answers", s)
        return [("image", s["image"]), ("text", f"{vqa_text(s['question'], zero_shot=True)} {answer}")]

    def _binding(self, s: dict) -> list:
        return binding_segments(s)   # fast-binding episodes: each image always before its sentence (binding.py)

    def _text(self, s: dict) -> list:
        return [("text", s["text"])]

    def _chat(self, s: dict) -> Segments:
        # Loss on the answers only (Emu2-Chat: no image loss, docs/design.md §2). A video keeps `num_frames` frames.
        if s.get("video") is not None:
            s = {**s, "video": [s["video"][i] for i in self._frames({**s, "frames": s["video"]})]}
        turns = conversation_turns(s)
        answers = ["".join(v for _, v in content) for role, content in turns if role == "assistant"]
        return Segments(self.template.segments(turns), regress="none", targets=answers)

    def _gen(self, s: dict) -> Segments:
        # Emu2-Gen: instruction (grounding tokens, reference images at its `<image>` placeholders) → the image;
        # only that last image is regressed (docs/design.md §2). A caption pair is a plain text-to-image instruction.
        instruction = s["instruction"] if "instruction" in s else self._pick(s["captions"], "captions", s)
        segs = fill_placeholders(instruction, list(s.get("references", [])), f"sample {s.get('id')!r}: the instruction",
                                 "reference images")
        return Segments([*segs, ("image", s["image"])], regress="last")


def fill_placeholders(text: str, images: list, what: str, given: str = "images") -> list[tuple[str, Any]]:
    """`text` with each `<image>` replaced by the next of `images` → [("text", str) | ("image", x), ...] in order;
    a count mismatch is an error naming `what` (the text) and `given` (the images)."""
    parts = text.split(IMAGE)
    if len(parts) - 1 != len(images):
        raise ValueError(f"{what} has {len(parts) - 1} {IMAGE} placeholders but {len(images)} {given} given")
    segs: list = []
    for i, part in enumerate(parts):
        segs += ([("text", part)] if part else []) + ([("image", images[i])] if i < len(images) else [])
    return segs


def vqa_text(question: str, answer: str | None = None, zero_shot: bool = False) -> str:
    """Emu2's VQA phrasing (docs/design.md §5): ` based on the picture, {q} short answer: {a}`."""
    if zero_shot:
        return f" based on the picture, answer in one word or phrase. {question} short answer:"
    return f" based on the picture, {question} short answer:" + ("" if answer is None else f" {answer}")


class SequenceCollator:
    """Documents → a right-padded stage-2 batch.

    Args:
        tokenizer: from `emu_lightning.data.layout.tokenizer.load_tokenizer`.
        num_image_tokens: N `<image>` tokens per image or frame.
        max_length: longest sequence; longer documents are cut at a span boundary and counted.
        video_token: start each video with `[VIDEO]` (Emu2) or not (Emu1).
        spelling: the platform's layout ("platform": grounding as `<p>`, `<coor>`, `<loc…>`, video frames at
            `<image>`) or the release's ("emu2": its own rows, `<phrase>`, `<object>`, `<patch_index_…>`, and video
            frames at `[gIMG]`, which the tokenizer must have: a converted Emu2's; `spelling.py`).
    """

    def __init__(self, tokenizer: Any, num_image_tokens: int, max_length: int = 256, video_token: bool = True,
                 spelling: str = "platform"):
        self.tok, self.ids = tokenizer, SpecialIds.from_tokenizer(tokenizer)
        self.block = image_block(self.ids, num_image_tokens)
        self.max_length, self.video_token, self.spelling = max_length, video_token, spelling
        respell("", spelling)                                               # an unknown spelling fails here
        self.frame_block = self.block                                       # a video frame's block
        if spelling == "emu2":
            if self.ids.frame is None:
                raise ValueError(f"spelling 'emu2' writes video frames at {FRAME}, which the tokenizer lacks "
                                 "(the release's layout needs a converted Emu2's tokenizer)")
            self.frame_block = [self.ids.img, *[self.ids.frame] * num_image_tokens, self.ids.img_end]

    def encode(self, segments: list[tuple[str, Any]], close: bool = True, limit: int | None = None
               ) -> tuple[list[int], list[int], list[Tensor], bool]:
        """Segments → (ids, labels, images in reading order, truncated), `<s>` first, `</s>` last when `close`."""
        limit = limit or self.max_length
        close = close and not (segments and segments[-1][0] == "answer")  # a chat answer ends with its own </s>
        ids, labels, images = [self.ids.bos], [IGNORE], []
        for kind, value in _text_runs(segments):
            if kind in ("run", "text"):
                # Pretraining text is all targets; a chat run is one tokenization of the rendered string, whose
                # answers are the targets.
                if kind == "run":
                    toks, targets = self._encode_run(value)
                else:
                    toks = targets = self.tok(respell(value, self.spelling), add_special_tokens=False)["input_ids"]
                room = limit - len(ids) - int(close)
                ids += toks[:room]
                labels += targets[:room]
                if len(toks) > room:
                    return ids, labels, images, True
                continue
            frames = value if kind == "video" else [value]
            block = self.frame_block if kind == "video" else self.block
            span = ([self.ids.video] if kind == "video" and self.video_token else []) + block * len(frames)
            if len(ids) + len(span) + int(close) > limit:  # never cut inside a visual span
                return ids, labels, images, True
            ids += span
            labels += [IGNORE] * len(span)
            images += frames
        if close:
            ids.append(self.ids.eos)
            labels.append(self.ids.eos)
        return ids, labels, images, False

    def _encode_run(self, pieces: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """`[("prompt"|"answer", text)]` → ids of the joined text and labels: the id where a token's characters
        overlap an answer, else -100 (a token straddling prompt and answer is a target; `check_answer_mask`
        rejects it unless the prompt side is whitespace)."""
        text, spans = "", []
        for kind, piece in pieces:
            piece = respell(piece, self.spelling)
            if kind == "answer":
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [i if any(a < e and s < b for s, e in spans) else IGNORE
                  for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
        return enc["input_ids"], labels

    def __call__(self, docs: list[dict]) -> dict[str, Any]:
        """`docs`: `{"id", "source", "segments", "regress": "all" | "last" | "none" (default "all")}` each, plus the
        samples read past before it (`"skipped": {kind: n}`, summed into the batch's `skipped`)."""
        seqs, labels, images, regress, truncated = [], [], [], [], 0
        for d in docs:
            x, y, ims, cut = self.encode(d["segments"])
            if d.get("targets") is not None:   # chat: the mask must be exactly the answers (chat.py)
                answers = [respell(t, self.spelling) for t in d["targets"]]
                check_answer_mask(self.tok, x, y, answers, cut, d.get("id"))
            seqs.append(x)
            labels.append(y)
            images += ims
            mode = d.get("regress", "all")
            # "last" means the document's last image: if the cut dropped it, nothing of this document regresses.
            kept_last = len(ims) == sum(len(v) if k == "video" else 1 for k, v in d["segments"] if k in ("image", "video"))
            regress += [mode == "all" or (mode == "last" and kept_last and i == len(ims) - 1) for i in range(len(ims))]
            truncated += cut
        sources = sorted({d["source"] for d in docs})
        input_ids, mask = pad(seqs, self.ids.pad)
        label_t, _ = pad(labels, IGNORE)
        return {
            "input_ids": input_ids,                                                     # (B,T)
            "attention_mask": mask,                                                     # (B,T)
            "labels": label_t,                                                          # (B,T) CE targets
            "pixel_values": torch.stack(images) if images else torch.zeros(0, 3, 1, 1),  # (n_images,3,H,W)
            "regress_images": torch.tensor(regress, dtype=torch.bool),                 # (n_images,)
            "source_index": torch.tensor([sources.index(d["source"]) for d in docs]),  # (B,)
            "source_names": sources,
            "ids": [d["id"] for d in docs],
            "num_truncated": torch.tensor(truncated),
            "skipped": sum_counts(d.get("skipped") or {} for d in docs),                # {kind: n} read past
        }


def _text_runs(segments: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Consecutive chat text segments (`prompt`, `answer`) merged into one `("run", [(kind, text), ...])`."""
    out: list[tuple[str, Any]] = []
    for kind, value in segments:
        if kind in ("prompt", "answer"):
            if out and out[-1][0] == "run":
                out[-1][1].append((kind, value))
            else:
                out.append(("run", [(kind, value)]))
        else:
            out.append((kind, value))
    return out


def pad(seqs: list[list[int]], value: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Lists of ids → (B,T) tensor padded with `value` (right, or left for generation prompts) and its mask."""
    T = max(map(len, seqs))
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        out[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
    return out, mask
