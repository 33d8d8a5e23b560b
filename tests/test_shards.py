"""Full-size loading (emu_lightning/checkpoints/shards.py): the converter writes safetensors shards with an index
(`--shard-size`), a system built inside `empty_init()` has its parameters on the meta device, and the stage hand-off
assigns the memory-mapped shards to it (nothing copied); the same weights as the one-file conversion, bit for bit.

The slow test measures peak RSS (`resource.getrusage`) in subprocesses converting and loading a synthetic Emu2 of
about 1.2 GB (`tests/scripts/full_size_memory.py`): converting and loading each stay near one copy of the weights,
where building the system the ordinary way and copying the checkpoint in holds two.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emu_lightning.checkpoints.convert import convert_emu2, export_emu2
from emu_lightning.checkpoints.io import safe_load
from emu_lightning.checkpoints.shards import INDEX, empty_init, meta_tensors, read_sharded, save_sharded
from tests.test_convert_common import EVA, LLM, base_tokenizer
from tests.test_convert_emu2 import GRID, RECIPE, assert_same_file, released_emu2

ROOT = Path(__file__).resolve().parents[1]


def build(folder: Path, setup: bool = True):
    """The converted model through the real recipe + the converter's overlay (real data paths nulled)."""
    from emu_lightning.cli import cli_main

    overrides = ["--data.init_args.train", "null", "--data.init_args.val", "null", "--data.init_args.test", "null",
                 "--data.init_args.weights", "null", "--data.init_args.layouts", "null", "--data.init_args.demos",
                 "null", "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                 "--trainer.strategy", "auto", "--trainer.logger", "false", "--trainer.precision", "32-true"]
    system = cli_main(["--config", str(RECIPE), "--config", str(folder / "model.yaml"), *overrides], run=False).model
    if setup:
        system.setup("fit")                                          # the hand-off
    return system


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny bf16 Emu2 release converted twice: to one `weights.pt`, and to safetensors shards of ≤ 200 KB."""
    root = tmp_path_factory.mktemp("shards")
    tok = base_tokenizer(root / "llama")
    state = {k: v.to(torch.bfloat16) for k, v in released_emu2(tok)[0].items()}
    torch.save(state, root / "Emu2_pytorch_model.bf16.bin")
    src = str(root / "Emu2_pytorch_model.bf16.bin")
    one = convert_emu2(src, str(root / "one"), tok, EVA["heads"], LLM["heads"], GRID)
    sharded = convert_emu2(src, str(root / "sharded"), tok, EVA["heads"], LLM["heads"], GRID, shard_size="200KB")
    return state, one, sharded


def test_the_converter_writes_shards_an_index_and_points_init_from_at_it(release):
    import yaml

    state, one, sharded = release
    index = sharded / "weights" / INDEX
    weight_map = json.loads(index.read_text())["weight_map"]
    shards = sorted((sharded / "weights").glob("model-*.safetensors"))
    assert len(shards) > 2 and set(weight_map.values()) == {p.name for p in shards}
    assert all(p.stat().st_size <= 200_000 + 50_000 for p in shards)    # a tensor larger than the limit sits alone
    assert not (sharded / "weights.pt").exists()
    overlay = yaml.safe_load((sharded / "model.yaml").read_text())
    assert overlay["model"]["init_args"]["init_from"] == str(index)
    assert json.loads((sharded / "conversion.json").read_text())["weights"] == f"weights/{INDEX}"
    ours, mapped = safe_load(one / "weights.pt"), read_sharded(index)
    assert mapped.keys() == ours.keys() and all(torch.equal(mapped[k], ours[k]) for k in ours)
    assert_same_file(export_emu2(str(sharded)), state)                  # the export reads shards too


def test_a_system_built_empty_takes_the_mapped_shards(release):
    """Inside `empty_init()` every parameter of the recipe's parts is on the meta device; the hand-off assigns the
    shards' tensors (they keep the file's bf16: nothing was copied into fp32 parameters) and the model computes what
    the ordinarily built one, loaded from `weights.pt`, computes."""
    _, one, sharded = release
    with empty_init():
        empty = build(sharded, setup=False)
    params = dict(empty.named_parameters())
    assert params and all(p.is_meta for p in params.values())
    empty.setup("fit")
    assert not meta_tensors(empty)
    assert {p.dtype for p in empty.parameters()} == {torch.bfloat16}
    assert [n for n, p in empty.named_parameters() if p.requires_grad] == [n for n, p in params.items()
                                                                          if p.requires_grad]   # the policy kept
    plain = build(one)
    assert {p.dtype for p in plain.parameters()} == {torch.float32}       # an ordinary build copies into its own
    for k, v in plain.state_dict().items():
        assert torch.equal(empty.state_dict()[k].float(), v), k
    ids = torch.tensor([[1, 5, 9, plain.ids.img, *[plain.ids.image] * GRID**2, plain.ids.img_end, 7]])
    pixels = torch.randn(1, 3, EVA["image"], EVA["image"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = {}
        for name, system in (("empty", empty.eval().float()), ("plain", plain.eval())):
            hidden, _ = system.llm(system.embed_multimodal(ids, system.encode_images(pixels)), torch.ones_like(ids))
            out[name] = system.regression_head(hidden)
    assert torch.equal(out["empty"], out["plain"])


def test_save_sharded_writes_one_file_when_it_fits(tmp_path):
    state = {"a.weight": torch.randn(4, 4), "b.bias": torch.randn(4)}
    path = save_sharded(state, tmp_path / "w", max_shard_size="1MB")
    assert path.suffix == ".safetensors" and not (tmp_path / "w" / INDEX).exists()
    back = read_sharded(tmp_path / "w")
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())


def _step(*args: str, timeout: int = 600) -> dict:
    cmd = [sys.executable, "-m", "tests.scripts.full_size_memory", *args]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_converting_and_loading_1_gb_hold_about_one_copy_of_the_weights(tmp_path):
    """Measured on a 2-core CPU machine (1.18 GiB release, 256 MB shards): converting +1.03×, loading into an empty
    build +1.05×, the ordinary build + copy +2.05× of the weights over the process's RSS before the step."""
    made = _step("release", str(tmp_path))
    gib = made["bytes"] / 2**20                                           # MiB of the release's tensors
    assert made["bytes"] > 1e9
    convert = _step("convert", str(tmp_path), "--shard-size", "256MB")
    empty = _step("load", str(tmp_path), "--mode", "empty")
    plain = _step("load", str(tmp_path), "--mode", "plain")
    grew = {s["step"]: (s["peak_mib"] - s["before_mib"]) / gib for s in (convert, empty, plain)}
    print(json.dumps({"checkpoint_mib": gib, "peak_over_before_in_checkpoints": grew}))
    assert grew["convert"] < 1.3 and grew["load-empty"] < 1.3            # one copy, plus shard-sized buffers
    assert (empty["built_mib"] - empty["before_mib"]) / gib < 0.1         # building on meta allocates nothing
    assert grew["load-plain"] > 1.8                                       # the ordinary path: two copies
    assert empty["checksum"] == plain["checksum"]                         # the same weights either way
