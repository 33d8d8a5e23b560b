"""Full-size loading (emu_lightning/checkpoints/shards.py): the converter writes safetensors shards with an index
(`--shard-size`), a system built inside `empty_init()` has its parameters on the meta device, and the stage hand-off
assigns the memory-mapped shards to it (nothing copied); the same weights as the one-file conversion, bit for bit.
`main.py … --empty_init true` does that through the CLI; what init_from does not hold (a fresh head, LoRA factors)
is initialised at setup, and a tensor nothing can initialise is an error naming it.

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
from emu_lightning.cli import cli_main
from tests.test_convert_common import EVA, LLM, base_tokenizer
from tests.test_convert_emu2 import GRID, RECIPE, assert_same_file, released_emu2

ROOT = Path(__file__).resolve().parents[1]


def build(folder: Path, *extra: str, setup: bool = True):
    """The converted model through the real recipe + the converter's overlay (real data paths nulled)."""
    overrides = ["--data.init_args.train", "null", "--data.init_args.val", "null", "--data.init_args.test", "null",
                 "--data.init_args.weights", "null", "--data.init_args.layouts", "null", "--data.init_args.demos",
                 "null", "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                 "--trainer.strategy", "auto", "--trainer.logger", "false", "--trainer.precision", "32-true", *extra]
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
    shards' tensors (cast once to the fp32 the parts were built in) and the model computes what the ordinarily built
    one, loaded from `weights.pt`, computes."""
    _, one, sharded = release
    with empty_init():
        empty = build(sharded, setup=False)
    params = dict(empty.named_parameters())
    assert params and all(p.is_meta for p in params.values())
    empty.setup("fit")
    assert not meta_tensors(empty)
    assert {p.dtype for p in empty.parameters()} == {torch.float32}
    assert [n for n, p in empty.named_parameters() if p.requires_grad] == [n for n, p in params.items()
                                                                          if p.requires_grad]   # the policy kept
    plain = build(one)
    for k, v in plain.state_dict().items():
        assert torch.equal(empty.state_dict()[k], v), k
    ids = torch.tensor([[1, 5, 9, plain.ids.img, *[plain.ids.image] * GRID**2, plain.ids.img_end, 7]])
    pixels = torch.randn(1, 3, EVA["image"], EVA["image"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = {}
        for name, system in (("empty", empty.eval()), ("plain", plain.eval())):
            hidden, _ = system.llm(system.embed_multimodal(ids, system.encode_images(pixels)), torch.ones_like(ids))
            out[name] = system.regression_head(hidden)
    assert torch.equal(out["empty"], out["plain"])


def run(subcommand: str, folder: Path, tmp: Path, *extra: str):
    """`main.py <subcommand>` on the converted folder: the release recipe, its model.yaml, the debug synthetic data."""
    from tests.test_convert_roundtrip import STAGE2_DATA, data_overlay

    overlay = data_overlay(tmp, STAGE2_DATA, video_token=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        return cli_main([subcommand, "--config", str(RECIPE), "--config", str(folder / "model.yaml"), "--config",
                         overlay, *extra])


@pytest.mark.usefixtures("one_thread")
def test_main_with_empty_init_holds_the_converted_weights(release, tmp_path, capsys):
    """`main.py validate --empty_init true` on the sharded conversion: every tensor of the one-file conversion, in
    the fp32 the parts are built in (the ordinary build's values and dtype)."""
    _, one, sharded = release
    empty = run("validate", sharded, tmp_path, "--empty_init", "true").model
    assert "parameters built on the meta device" in capsys.readouterr().out
    assert not meta_tensors(empty) and {p.dtype for p in empty.parameters()} == {torch.float32}
    state, converted = empty.state_dict(), safe_load(one / "weights.pt")
    assert state.keys() == converted.keys()
    for k, v in converted.items():
        assert torch.equal(state[k], v.float()), k


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_main_with_empty_init_under_bf16_true_trains_and_a_resume_builds_normally(release, tmp_path, capsys):
    """Under bf16-true the file's bf16 tensors are the parameters (assigned, not copied); `fit` trains from them, and
    a resume with the switch builds the ordinary way (said in the log) and restores the checkpoint exactly."""
    _, one, sharded = release
    plain = build(one).state_dict()
    empty = run("validate", sharded, tmp_path, "--empty_init", "true", "--trainer.precision", "bf16-true").model
    assert {p.dtype for p in empty.parameters()} == {torch.bfloat16}
    assert all(torch.equal(v.float(), plain[k]) for k, v in empty.state_dict().items())
    cli = run("fit", sharded, tmp_path, "--empty_init", "true", "--trainer.max_steps", "1")
    assert cli.trainer.global_step == 1 and not meta_tensors(cli.model)
    last = tmp_path / "ckpt" / "last.ckpt"
    capsys.readouterr()
    resumed = run("validate", sharded, tmp_path, "--empty_init", "true", "--ckpt_path", str(last)).model
    assert "--empty_init is ignored: --ckpt_path" in capsys.readouterr().out
    saved = safe_load(last)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in resumed.state_dict().items())


def test_empty_init_initialises_what_init_from_does_not_hold_and_names_what_it_cannot(release):
    """A regression head left out of the hand-off and fresh LoRA factors get their own initialisation (the head:
    Linear's `reset_parameters`; LoRA: peft's, B = 0); an LLM left out cannot be initialised on the meta device
    (transformers' RMSNorm has no `reset_parameters`): an error naming the part and its tensors."""
    _, _, sharded = release
    lora = json.dumps({"llm": {"r": 2, "alpha": 2, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}})
    with empty_init():
        system = build(sharded, "--model.init_args.handoff", "{encoder: encoder, adapter: adapter, llm: llm}",
                       "--model.init_args.policy.lora", lora, setup=False)
    system.setup("fit")                                                 # outside: the hand-off assigns
    assert not meta_tensors(system)
    head = system.regression_head.proj.weight                          # (D_vis, D_llm), fresh: nn.Linear's init
    bound = head.shape[1] ** -0.5
    assert head.abs().max() <= bound and head.std() > bound / 4
    factors = {n: p for n, p in system.llm.named_parameters() if ".lora_" in n}
    assert factors and all(p.dtype == torch.float32 for p in factors.values())
    assert all(bool((p == 0).all()) == (".lora_B." in n) for n, p in factors.items())
    with empty_init():
        system = build(sharded, "--model.init_args.handoff", "{encoder: encoder, adapter: adapter, "
                       "regression_head: regression_head}", setup=False)
    with pytest.raises(ValueError, match=r"5 tensors .*meta device.*llm\.model\.model\.norm\.weight.*parts \['llm'\]"):
        system.setup("fit")


def test_a_hand_off_inside_empty_init_is_an_error_not_a_silent_reinitialisation(release):
    with empty_init(), pytest.raises(ValueError, match=r"part 'encoder'.*on the meta device.*outside `empty_init\(\)`"):
        build(release[2])                                              # setup (the hand-off) inside: refused


def test_empty_init_needs_init_from(release, tmp_path):
    with pytest.raises(ValueError, match="init_from is not set"):
        run("validate", release[2], tmp_path, "--empty_init", "true", "--model.init_args.init_from", "null")


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
    build (the CLI's `--empty_init true`) +1.05×, the ordinary build + copy +2.05× of the weights over the process's
    RSS before the step."""
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
