"""Inference from the command line: caption, VQA, chat, image generation and blending from a trained model.

    python -m emu_lightning.inference caption  --ckpt <model> --image a.png [b.png ...]
    python -m emu_lightning.inference vqa      --ckpt <model> --image a.png --question "what color is the circle?"
    python -m emu_lightning.inference chat     --ckpt <model> [--image a.png ...] [--message "..." ...]
    python -m emu_lightning.inference generate --ckpt <model> --decoder <decoder run> --prompt "a red circle" [--image ref.png]
    python -m emu_lightning.inference blend    --decoder <decoder run> --image a.png --image b.png

`<model>` is a run directory (`config.yaml` + `checkpoints/last.ckpt`), a `.ckpt` file of such a run (`--config`
names its config.yaml when it does not sit in `<run>/checkpoints/`), or a folder written by
`python -m emu_lightning.checkpoints.export`. Outputs go to `--out` (default `infer_out/`): `<command>.jsonl` with one JSON
line per answer, and PNG files for images. Prompts follow docs/design.md §5: a chat-tuned model (`ChatSystem`) is
asked in its own template; a stage-2 model gets the Emu2 zero-shot VQA prompt; a stage-1 model only captions.
`chat` is a REPL when standard input is a terminal and no `--message` is given (an empty line or EOF ends it);
otherwise each `--message` (or each non-blank line of standard input) is one user turn, the images go into
the first.
In `generate`, each `<image>` in the prompt is replaced by the next `--image` (in-context / subject-driven).
`--decoder` is a decoder run (directory or `.ckpt`) or, for `generate`, a folder written by
`emu_lightning.checkpoints.decoder_export` (a plain diffusers UNet; it has no encoder, so `blend` needs the run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from emu_lightning.data.layout.chat import PRESETS  # noqa: E402
from emu_lightning.data.layout.fewshot import CAPTION_INSTRUCTION  # noqa: E402  (Emu-I's, docs/design.md §5)
from emu_lightning.data.modules.captions import image_transform  # noqa: E402
from emu_lightning.data.real.images import open_rgb  # noqa: E402
from emu_lightning.data.layout.sequence import fill_placeholders, vqa_text  # noqa: E402
from emu_lightning.data.layout.tokens import IMAGE  # noqa: E402

COMMANDS = ("caption", "vqa", "chat", "generate", "blend")


def read_image(path: str | Path) -> Image.Image:
    """An RGB image from `path`, or an error naming the file and what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image not found: {p}")
    try:
        return open_rgb(p)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{p} is not a readable image ({err})") from None


def load_model(path: str | Path, config: str | Path | None = None, tokenizer: str | None = None) -> Any:
    """A trained system in eval mode from a run directory, a `.ckpt` file or an exported folder (module docstring)."""
    from emu_lightning.inference.pipelines import load_system

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p} (expected a run directory, a .ckpt file or an exported "
                                f"folder)")
    if p.is_dir() and (p / "emu_config.json").is_file():
        return load_exported_system(p, tokenizer)
    if p.is_dir():   # a run directory: its last checkpoint, with its own config unless --config names another
        return load_system(config or p, p / "checkpoints" / "last.ckpt", tokenizer=tokenizer)
    config = Path(config) if config else p.parent.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no config.yaml for {p}: looked for {config}; pass --config <run>/config.yaml")
    return load_system(config, p, tokenizer=tokenizer)


def load_exported_system(folder: Path, tokenizer: str | None = None) -> Any:
    """An exported folder (`emu_lightning.checkpoints.export`) as a `Stage2System` / `ChatSystem` for generation."""
    from emu_lightning.checkpoints.export import load_exported
    from emu_lightning.systems.instruct import ChatSystem
    from emu_lightning.systems.policy import StagePolicy
    from emu_lightning.systems.stage2 import Stage2System

    config = json.loads((folder / "emu_config.json").read_text())
    model = load_exported(folder)
    tok_path = tokenizer or str(folder / "tokenizer")
    kwargs = dict(encoder=model.encoder, adapter=model.adapter, llm=model.llm, tokenizer=tok_path,
                  regression_head=model.regression_head, target_space=config.get("target_space") or "pooled",
                  policy=StagePolicy(trainable=[], lr={}))
    vocab = model.llm.vocab_size
    system = (ChatSystem(template=config["chat_template"], **kwargs) if config.get("chat_template") is not None
              else Stage2System(**kwargs))
    if model.llm.vocab_size != vocab:
        raise ValueError(f"tokenizer {tok_path} has {model.llm.vocab_size} tokens but the exported LLM in {folder} "
                         f"has {vocab} embedding rows: use the tokenizer the model was trained with")
    return system.eval()


def _template(system: Any):
    return getattr(system, "template", None) or PRESETS["plain"]


def _prepare(system: Any, images: list[Image.Image]) -> list[torch.Tensor]:
    transform = image_transform(system.encoder.img_size)
    return [transform(im) for im in images]


def caption(system: Any, images: list[Image.Image], max_new_tokens: int, num_beams: int) -> list[str]:
    from emu_lightning.systems.instruct import ChatSystem
    from emu_lightning.systems.stage1 import Stage1System

    pixels = _prepare(system, images)
    if isinstance(system, Stage1System):
        from emu_lightning.data.layout.collate import image_block

        prompt = torch.tensor([[system.ids.bos, *image_block(system.ids, system.num_image_tokens)]] * len(pixels))
        return system.caption(torch.stack(pixels), prompt, num_beams)
    if isinstance(system, ChatSystem):
        docs = [_template(system).segments([("user", [("image", x), ("text", CAPTION_INSTRUCTION)])], prompt=True)
                for x in pixels]
    else:
        docs = [[("image", x)] for x in pixels]
    return system.generate_text(docs, max_new_tokens, num_beams)


def answer(system: Any, image: Image.Image, question: str, max_new_tokens: int, num_beams: int) -> str:
    from emu_lightning.systems.instruct import ChatSystem
    from emu_lightning.systems.stage2 import Stage2System

    if not isinstance(system, Stage2System):
        raise ValueError(f"{type(system).__name__} is a captioner: vqa needs a stage-2 or chat-tuned model")
    (x,) = _prepare(system, [image])
    if isinstance(system, ChatSystem):
        doc = _template(system).segments([("user", [("image", x), ("text", question)])], prompt=True)
    else:
        doc = [("image", x), ("text", vqa_text(question, zero_shot=True))]
    return system.generate_text([doc], max_new_tokens, num_beams)[0]


class Conversation:
    """A growing chat: user turns (the first holds the images) and the model's answers."""

    def __init__(self, system: Any, images: list[Image.Image], max_new_tokens: int, num_beams: int):
        from emu_lightning.systems.stage2 import Stage2System

        if not isinstance(system, Stage2System):
            raise ValueError(f"{type(system).__name__} is a captioner: chat needs a chat-tuned (or stage-2) model")
        self.system, self.max_new_tokens, self.num_beams = system, max_new_tokens, num_beams
        self.pending = [("image", x) for x in _prepare(system, images)]
        self.turns: list[tuple[str, list]] = []

    def say(self, message: str) -> str:
        self.turns.append(("user", [*self.pending, ("text", message)]))
        self.pending = []
        doc = _template(self.system).segments(self.turns, prompt=True)
        reply = self.system.generate_text([doc], self.max_new_tokens, self.num_beams)[0]
        self.turns.append(("assistant", [("text", reply)]))   # rendered as in training: " [ASSISTANT]: " + reply
        return reply


def load_decoder(path: str | Path, config: str | Path | None = None) -> Any:
    """A visual decoder in eval mode: a decoder run (directory or `.ckpt`) or a `decoder_export` folder."""
    from emu_lightning.checkpoints.decoder_export import META, load_exported_decoder
    from emu_lightning.systems.decoder import DecoderSystem

    if (Path(path) / META).is_file():                           # an `export_decoder` folder (plain diffusers UNet)
        return load_exported_decoder(path)
    decoder = load_model(path, config)
    if not isinstance(decoder, DecoderSystem):
        raise ValueError(f"decoder {path} holds a {type(decoder).__name__}, not a visual decoder run")
    return decoder


def _decoder_pipeline(args: argparse.Namespace, generator: Any = None):
    from emu_lightning.inference.pipelines import EmuImagePipeline

    if not args.decoder:
        raise ValueError(f"{args.command} needs --decoder <decoder run directory, .ckpt or export folder>")
    return EmuImagePipeline(load_decoder(args.decoder, args.decoder_config), generator)


def _save_images(images: torch.Tensor, out: Path, stem: str) -> list[str]:
    from emu_lightning.inference.pipelines import to_pil

    paths = []
    for i, im in enumerate(to_pil(images)):
        path = out / f"{stem}_{i:03d}.png"
        im.save(path)
        paths.append(str(path))
    return paths


def run(args: argparse.Namespace) -> list[dict]:
    """Execute one command; returns the JSON rows it wrote to `<out>/<command>.jsonl`."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = [read_image(p) for p in args.image or []]
    rows: list[dict] = []
    if args.command == "blend":
        if len(images) != 2:
            raise ValueError(f"blend takes exactly two --image, got {len(images)}")
        blended = _decoder_pipeline(args).blend(images[0], images[1], args.alphas, args.guidance, args.steps,
                                                seed=args.seed)
        paths = _save_images(blended, out, "blend")
        rows = [{"alpha": a, "image": p} for a, p in zip(args.alphas, paths)]
    else:
        if not args.ckpt:
            raise ValueError(f"{args.command} needs --ckpt <run directory, .ckpt file or exported folder>")
        system = load_model(args.ckpt, args.config, args.tokenizer)
        if args.command == "caption":
            if not images:
                raise ValueError("caption needs at least one --image")
            caps = caption(system, images, args.max_new_tokens, args.num_beams)
            rows = [{"image": p, "caption": c} for p, c in zip(args.image, caps)]
        elif args.command == "vqa":
            if len(images) != 1 or not args.question:
                raise ValueError("vqa needs one --image and --question")
            rows = [{"image": args.image[0], "question": args.question,
                     "answer": answer(system, images[0], args.question, args.max_new_tokens, args.num_beams)}]
        elif args.command == "chat":
            rows = _chat(system, images, args)
        else:
            from emu_lightning.systems.stage2 import Stage2System

            if not isinstance(system, Stage2System):
                raise ValueError(f"{type(system).__name__} is a captioner: generate needs a stage-2, gen- or chat-tuned "
                                 f"model (one with a regression head)")
            doc = [x for _, x in fill_placeholders(args.prompt, images, "--prompt", "--image")]
            generated = _decoder_pipeline(args, system).in_context([doc], args.guidance, args.steps, seed=args.seed)
            rows = [{"prompt": args.prompt, "images": args.image or [], "image": p}
                    for p in _save_images(generated, out, "generate")]
    with (out / f"{args.command}.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def _chat(system: Any, images: list[Image.Image], args: argparse.Namespace) -> list[dict]:
    convo = Conversation(system, images, args.max_new_tokens, args.num_beams)
    interactive = not args.message and sys.stdin.isatty()
    messages = iter(args.message) if args.message else None
    rows = []
    while True:
        if messages is not None:
            message = next(messages, None)
        else:
            try:
                message = input("you> ") if interactive else sys.stdin.readline()
            except EOFError:
                message = None
            if message is None or (not interactive and message == ""):    # EOF
                break
            message = message.strip()
            if not message and not interactive:                            # a blank piped line: no turn
                continue
        if not message:
            break
        reply = convo.say(message)
        print(f"emu> {reply}" if interactive else reply, flush=True)
        rows.append({"user": message, "assistant": reply})
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emu_lightning.inference", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--ckpt", help="run directory, .ckpt file or exported folder of the model")
    p.add_argument("--config", help="config.yaml of the run, when --ckpt is a .ckpt outside <run>/checkpoints/")
    p.add_argument("--tokenizer", help="tokenizer folder, overriding the run's (must match the checkpoint)")
    p.add_argument("--image", action="append", help="input image (repeat for several)")
    p.add_argument("--question", help="vqa: the question")
    p.add_argument("--message", action="append", help="chat: a user turn (repeat); none = REPL or stdin lines")
    p.add_argument("--prompt", default="", help=f"generate: the instruction; each {IMAGE} takes the next --image")
    p.add_argument("--decoder", help="generate / blend: visual decoder run directory or .ckpt; "
                   "generate also takes a decoder export folder")
    p.add_argument("--decoder-config", help="config.yaml of the decoder run, for a .ckpt outside its run")
    p.add_argument("--out", default="infer_out", help="output folder")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the decoder's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the decoder's)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="blend weights")
    p.add_argument("--seed", type=int, default=0)
    return p


_TEXT_FIELD = {"caption": ("caption", "captions"), "vqa": ("answer", "answers"), "chat": ("assistant", "replies")}


def empty_note(command: str, rows: list[dict]) -> str | None:
    """A note when some generated texts are empty, so an empty answer is not taken for a working one: the model
    emitted `</s>` (or `[IMG]`) as its first token, which an untrained or briefly tuned model does (the prompt is
    the training layout, two images included: tests/test_chat_template.py)."""
    if command not in _TEXT_FIELD:
        return None
    field, noun = _TEXT_FIELD[command]                       # the row's generated text, and what it is called
    empty = sum(not row[field].strip() for row in rows)
    if not empty:
        return None
    return (f"note: {empty} of {len(rows)} {noun} are empty: the model ended them at once (its first token was "
            f"</s> or [IMG], or it gave only special tokens), as an untrained or briefly tuned model does; check the "
            f"run's train/loss, or tune longer")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        rows = run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command != "chat":
        for row in rows:
            print(json.dumps(row))
    note = empty_note(args.command, rows)
    if note:
        print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
