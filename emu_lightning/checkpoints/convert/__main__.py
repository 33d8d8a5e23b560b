"""CLI: `python -m emu_lightning.checkpoints.convert emu1|emu2 SRC DST --tokenizer TOK [--config JSON ...]`
(released → ours), `python -m emu_lightning.checkpoints.convert export DST OUT [--weights CKPT]` (ours, possibly
fine-tuned → the released layout it was read from), or `python -m emu_lightning.checkpoints.convert decoder
emu1|emu2 UNET_FOLDER DST` (released diffusers UNet → our decoder). Every released layout: docs/converting.md."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from emu_lightning.checkpoints.convert import convert_emu1, convert_emu2, export_emu1, export_emu2
from emu_lightning.checkpoints.convert.decoder import convert_decoder
from emu_lightning.checkpoints.convert.folder import save_released


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m emu_lightning.checkpoints.convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for release in ("emu1", "emu2"):
        p = sub.add_parser(release, help=f"released {release} weights → a folder our recipes load")
        p.add_argument("src", help="released weights: a file, a shard index (*.index*.json) or a folder of shards")
        p.add_argument("dst", help="output folder")
        p.add_argument("--tokenizer", required=True, help="the LLaMA tokenizer (folder or tokenizer.json)")
        p.add_argument("--config", nargs="+", action="extend", default=[], metavar="JSON",
                       help="the release's config files, which state the head counts the weights cannot give and "
                            "sizes checked against the weights: the LLaMA config.json (Emu1/models/llama_config/, "
                            "Emu2/emu/conf/llama_config/), Emu1/models/Emu-14B.json, a T5 config (docs/converting.md)")
        p.add_argument("--vision-heads", type=int, default=None,
                       help="EVA attention heads (not in the weights; default: from --config, else 16)")
        p.add_argument("--llm-heads", type=int, default=None, help="LLaMA heads (default: from --config, else "
                                                                   f"{40 if release == 'emu1' else 52})")
        p.add_argument("--shard-size", default=None, metavar="SIZE",
                       help="write the converted weights as safetensors shards of at most SIZE (e.g. 5GB) with an "
                            "index, which the hand-off memory-maps (full-size models; default: one weights.pt)")
        if release == "emu2":
            p.add_argument("--grid", type=int, default=None,
                           help="pooled tokens per side (default: √n_query from --config, else 8; Chat 16)")
        else:
            p.add_argument("--t5-heads", type=int, default=None,
                           help="C-Former attention heads (default: from a T5 --config, else t5-base's 12)")
            p.add_argument("--lora-alpha", type=float, default=16.0,
                           help="Emu-I's LoRA alpha for a peft-layout file (not in the weights; Emu1/inference.py: 16)")
    p = sub.add_parser("export", help="a converted (or fine-tuned) model → the released key layout")
    p.add_argument("folder", help="a converted folder (holds conversion.json)")
    p.add_argument("out", help="output file: .safetensors (as Emu2-Gen's native file) or any other name (torch.save)")
    p.add_argument("--weights", default=None, help="a checkpoint fine-tuned from the folder (default: its weights)")
    p = sub.add_parser("decoder", help="a released diffusers UNet folder → our VisualDecoderUNet")
    p.add_argument("release", choices=["emu1", "emu2"])
    p.add_argument("src", help="the released UNet folder (config.json + weights)")
    p.add_argument("dst", help="output folder")
    args = parser.parse_args(argv)
    if args.command == "emu1":
        out = convert_emu1(args.src, args.dst, args.tokenizer, args.vision_heads, args.llm_heads, args.t5_heads,
                           args.config, args.lora_alpha, args.shard_size)
    elif args.command == "emu2":
        out = convert_emu2(args.src, args.dst, args.tokenizer, args.vision_heads, args.llm_heads, args.grid,
                           args.config, args.shard_size)
    elif args.command == "decoder":
        out = convert_decoder(args.release, args.src, args.dst)
    else:
        release = json.loads((Path(args.folder) / "conversion.json").read_text())["release"]
        state = (export_emu1 if release == "emu1" else export_emu2)(args.folder, args.weights)
        save_released(state, args.out)
        out = Path(args.out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
