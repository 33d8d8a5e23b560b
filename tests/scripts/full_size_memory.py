"""Peak memory of converting and loading a synthetic Emu2 checkpoint of about 1 GB, one step per process (peak RSS,
`resource.getrusage(RUSAGE_SELF).ru_maxrss`, is per process). Launched by `tests/test_shards.py` (slow).

    python -m tests.scripts.full_size_memory release DIR [--layers 24]   # DIR/emu2.bin, the released layout (fp32)
    python -m tests.scripts.full_size_memory convert DIR [--shard-size 256MB]   # DIR/emu2.bin → DIR/converted
    python -m tests.scripts.full_size_memory load DIR --mode empty|plain          # the converted parts, loaded

`load --mode empty` builds the Stage-2 system (the release recipe + the converter's model.yaml) through the CLI with
`--empty_init true` (parameters on the meta device) and runs its setup, the hand-off, which assigns the
memory-mapped shards; `--mode plain` builds it the ordinary way (random initialisation) and copies the checkpoint
in. Both then touch every parameter (a sum), so every page of the weights is resident. Each step prints one JSON
line: the RSS before its work, its peak, and the bytes of the weights.
"""
from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch

EVA_WIDTH, HIDDEN, FFN, HEADS = 64, 1024, 2816, 8


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def release(folder: Path, layers: int) -> None:
    """The native Emu2 layout (tests/test_convert_emu2.py names) with a LLaMA of width 1024 and `layers` layers."""
    from tests.test_convert_common import EVA, base_tokenizer, released_eva
    from emu_lightning.checkpoints.convert.tokenizer import EMU2_SPECIALS

    tok = base_tokenizer(folder / "llama")
    rows = 300 + len(EMU2_SPECIALS)
    state = released_eva("visual.", postnorm=True, clip_head=False)

    def rand(*shape, std=0.02):
        return torch.empty(*shape).normal_(std=std)

    lm = "decoder.lm."
    state[f"{lm}model.embed_tokens.weight"] = rand(rows, HIDDEN)
    state[f"{lm}lm_head.weight"] = rand(rows, HIDDEN)
    state[f"{lm}model.norm.weight"] = torch.ones(HIDDEN)
    for i in range(layers):
        p = f"{lm}model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = rand(HIDDEN, HIDDEN)
        state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"] = rand(FFN, HIDDEN), rand(FFN, HIDDEN)
        state[p + "mlp.down_proj.weight"] = rand(HIDDEN, FFN)
        state[p + "input_layernorm.weight"] = torch.ones(HIDDEN)
        state[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    state["project_up.weight"], state["project_down.weight"] = rand(HIDDEN, EVA["width"]), rand(EVA["width"], HIDDEN)
    torch.save(state, folder / "emu2.bin")
    size = sum(v.numel() * v.element_size() for v in state.values())
    print(json.dumps({"step": "release", "bytes": size, "tokenizer": tok}))


def convert(folder: Path, shard_size: str | None) -> None:
    from emu_lightning.checkpoints.convert.__main__ import main
    from tests.test_convert_common import EVA

    before = rss_mib()
    flags = ["--shard-size", shard_size] if shard_size else []
    main(["emu2", str(folder / "emu2.bin"), str(folder / "converted"), "--tokenizer", str(folder / "llama"),
          "--vision-heads", str(EVA["heads"]), "--llm-heads", str(HEADS), "--grid", "2", *flags])
    size = (folder / "emu2.bin").stat().st_size
    print(json.dumps({"step": "convert", "before_mib": before, "peak_mib": peak_mib(), "bytes": size}))


def load(folder: Path, mode: str) -> None:
    from emu_lightning.cli import cli_main

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "emu2" / "finetune_released.yaml"
    overrides = ["--data.init_args.train", "null", "--data.init_args.val", "null", "--data.init_args.test", "null",
                 "--data.init_args.weights", "null", "--data.init_args.layouts", "null", "--data.init_args.demos",
                 "null", "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                 "--trainer.strategy", "auto", "--trainer.logger", "false", "--trainer.precision", "32-true"]
    before = rss_mib()
    system = cli_main(["--config", str(recipe), "--config", str(folder / "converted" / "model.yaml"), *overrides,
                       "--empty_init", str(mode == "empty").lower()], run=False).model
    built = rss_mib()
    system.setup("fit")                       # what the Trainer calls first: the hand-off from the converted weights
    with torch.no_grad():
        total = sum(float(p.float().sum()) for p in system.parameters())   # every page of the weights touched
    size = sum(p.numel() * p.element_size() for p in system.parameters())
    print(json.dumps({"step": f"load-{mode}", "before_mib": before, "built_mib": built, "peak_mib": peak_mib(),
                      "bytes": size, "checksum": total}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=["release", "convert", "load"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--shard-size", default="256MB")
    parser.add_argument("--mode", choices=["empty", "plain"], default="empty")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.step == "release":
        release(args.folder, args.layers)
    elif args.step == "convert":
        convert(args.folder, args.shard_size or None)
    else:
        load(args.folder, args.mode)
