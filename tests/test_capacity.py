"""The capacity model (emu_lightning/capacity/) against what a step measures: FLOPs against
`FlopCounterMode`, memory against the live tensor bytes of a real training step, within 10%; and the planner
over the real recipes (benchmarks/plan.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from emu_lightning.capacity.measure import count_flops, measure_step
from emu_lightning.capacity.plan import Layout, Workload, largest_batch, plan_step
from tests.helpers import IMAGE_SIZE, tiny_stage1, tiny_stage2

ROOT = Path(__file__).resolve().parents[1]


def caption_batch(system, docs: int) -> dict:
    """`docs` caption documents collated, every row unpadded (the planner's sample is a full-length row)."""
    from emu_lightning.data.layout.sequence import Layout as DocLayout, SequenceCollator
    from emu_lightning.data.modules.captions import image_transform
    from emu_lightning.data.synthetic.scenes import SyntheticCaptions

    tf, layout = image_transform(IMAGE_SIZE), DocLayout("pair", train=False)
    collate = SequenceCollator(system.tokenizer, system.num_image_tokens, max_length=64)
    batch = collate([{"id": s["id"], "source": "pairs", "segments": layout({**s, "image": tf(s["image"])})}
                     for s in SyntheticCaptions(split="train", size=docs, image_size=IMAGE_SIZE)])
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    return batch


def checkpoint_blocks(system, parts: list[str]) -> None:
    """Activation checkpointing on the blocks of `parts`, as the FSDP strategies apply it (non-reentrant)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing, checkpoint_wrapper)

    from emu_lightning.systems.sharding import block_units

    blocks = {id(b) for bs in block_units(system.parts, parts).values() for b in bs}
    apply_activation_checkpointing(system, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: id(m) in blocks)


def check_against_measured(system, batch: dict, checkpointed: list[str], precision: str = "32-true") -> dict:
    system.train()
    loss = lambda: system.loss_terms(batch)["loss"]   # noqa: E731
    work = Workload.of_batch(system, batch)
    rows = []                                     # the regression head's input rows: what `of_batch` counts
    linear = next(m for m in system.regression_head.modules() if isinstance(m, nn.Linear))
    hook = linear.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    counted = count_flops(loss, system)
    hook.remove()
    assert work.regressed * len(batch["input_ids"]) == rows[0]
    checkpoint_blocks(system, checkpointed)
    optimizer = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=1e-5)
    measured = measure_step(loss, system, optimizer, [v for v in batch.values() if isinstance(v, torch.Tensor)])
    planned = plan_step(system, work, Layout(checkpointed=checkpointed, precision=precision),
                        len(batch["input_ids"]))
    return {"flops": (sum(planned.flops_per_sample.values()) * planned.batch, counted),
            "activations": (planned.activations + planned.gathered, measured["activations"]),
            "total": (planned.total, measured["total"])}


@pytest.mark.parametrize("adapter, checkpointed", [("meanpool", []), ("meanpool", ["llm"]),
                                                   ("cformer", ["adapter", "llm"])])
def test_model_matches_measured_flops_and_peak_memory(adapter, checkpointed):
    torch.manual_seed(0)
    system = tiny_stage2(adapter)
    got = check_against_measured(system, caption_batch(system, 8), checkpointed)
    planned, counted = got["flops"]
    assert planned == pytest.approx(counted, rel=0.02)          # the same matrix products, attention included
    for kind in ("activations", "total"):
        planned, measured = got[kind]
        assert planned == pytest.approx(measured, rel=0.10), kind


def test_fsdp_divides_states_and_checkpointing_keeps_less():
    with torch.device("meta"):
        system = tiny_stage2("cformer")
    work = Workload(tokens=64, images=2, regressed=2 * system.adapter.num_tokens + 2)
    one = plan_step(system, work, Layout(world=1, fsdp=True, precision="bf16-mixed"))
    eight = plan_step(system, work, Layout(world=8, fsdp=True, precision="bf16-mixed"))
    assert eight.weights == pytest.approx(one.weights / 8) and eight.optimizer == pytest.approx(one.optimizer / 8)
    assert eight.gathered == one.gathered > 0                   # the gathered units do not shrink with the world
    full = plan_step(system, work, Layout(checkpointed=[], precision="bf16-true"))
    ac = plan_step(system, work, Layout(checkpointed=["adapter", "llm"], precision="bf16-true"))
    assert ac.activations_per_sample < full.activations_per_sample
    assert ac.recompute_flops_per_sample > 0 == full.recompute_flops_per_sample
    fits = largest_batch(system, work, Layout(checkpointed=["llm"]), memory=ac.total * 40)
    assert plan_step(system, work, Layout(checkpointed=["llm"]), fits).total <= ac.total * 40 * 0.9
    assert plan_step(system, work, Layout(checkpointed=["llm"]), fits + 1).total > ac.total * 40 * 0.9


def test_plan_errors_name_the_field():
    with torch.device("meta"):
        system = tiny_stage2("meanpool")
    work = Workload(tokens=16, images=1, regressed=4)
    with pytest.raises(ValueError, match="precision='fp8'"):
        Layout(precision="fp8")
    with pytest.raises(ValueError, match=r"checkpointed parts \['vision'\]"):
        plan_step(system, work, Layout(checkpointed=["vision"]))
    with torch.device("meta"):
        stage1 = tiny_stage1("meanpool")
    with pytest.raises(ValueError, match="stage-2 systems"):
        plan_step(stage1, work, Layout())


def test_planner_reads_the_run_settings():
    """benchmarks/plan.py on a built system and a recipe's settings: 8 × 2 GPUs × 4 documents per step."""
    from types import SimpleNamespace

    from benchmarks.plan import plan, table
    from emu_lightning.systems.sharding import EmuFSDPStrategy

    with torch.device("meta"):
        system = tiny_stage2("cformer")
    run = {"trainer": SimpleNamespace(devices=8, num_nodes=2, accumulate_grad_batches=1, precision="bf16-mixed"),
           "data": SimpleNamespace(batch_size=4, max_length=64, num_frames=2),
           "strategy": EmuFSDPStrategy(activation_checkpointing_parts=["llm"])}
    got = plan("tiny.yaml", 32, gpu_memory_gib=0.01, peak_tflops=100, built=(system, run))
    N = system.adapter.num_tokens
    assert got["sample"] == {"tokens": 64, "images": 2, "regressed": 2 * N + 2, "visual_tokens_per_image": N}
    assert (got["documents_per_step"], got["documents_per_gpu"], got["fsdp"]) == (64, 2.0, True)
    assert got["micro_batch"] == min(got["micro_batch_fit"], 2) > 0 and got["checkpointed"] == ["llm"]
    assert got["step_s"] == pytest.approx(got["pflops_per_step"] * 1e15 / (32 * 0.4 * 100e12))
    text = table(got)
    assert "tiny.yaml on 32 GPUs × 0.01 GiB, bf16-mixed, FSDP FULL_SHARD, activation checkpointing on ['llm']" in text
    with pytest.raises(ValueError, match="11 images"):
        plan("tiny.yaml", 32, 80, 100, images=11, built=(system, run))


@pytest.mark.slow
@pytest.mark.parametrize("recipe, checkpointed, precision", [
    ("stage2_meanpool", [], "32-true"), ("stage2_meanpool", ["llm"], "32-true"),
    ("stage2_cformer", ["adapter", "llm"], "32-true"), ("stage2_meanpool", ["llm"], "bf16-true")])
def test_model_matches_measured_on_the_debug_recipes(recipe, checkpointed, precision):
    """The debug recipes as the CLI builds them (8 documents of all four sources, ~170 tokens); bf16-true casts
    the system (slow on CPU: ~1 min)."""
    from emu_lightning.cli import cli_main

    cli = cli_main(["--config", str(ROOT / "recipes" / "debug" / f"{recipe}.yaml"), "--trainer.logger", "false",
                    "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0"], run=False)
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    system = cli.model
    if precision == "bf16-true":
        system.to(torch.bfloat16)
        batch["pixel_values"] = batch["pixel_values"].bfloat16()
    got = check_against_measured(system, batch, checkpointed, precision)
    assert got["flops"][0] == pytest.approx(got["flops"][1], rel=0.02)
    for kind in ("activations", "total"):
        assert got[kind][0] == pytest.approx(got[kind][1], rel=0.10), kind


@pytest.mark.slow
def test_planner_on_the_emu2_recipe(capsys):
    from benchmarks.plan import main

    main(["--recipe", str(ROOT / "recipes" / "emu2" / "stage2.yaml"), "--gpus", "256", "--gpu-memory", "80",
          "--peak-tflops", "989"])
    out = capsys.readouterr().out
    assert "256 GPUs × 80 GiB, bf16-mixed, FSDP FULL_SHARD, activation checkpointing on ['adapter', 'llm']" in out
    assert "llm                32.532B" in out and "largest micro-batch that fits:" in out
