"""docs/extending.md stays true: its code blocks are the repository's files, and what it says they do, they do.

- "Add an adapter": the MLP projector's module and fragment are `components/adapters/mlp.py` and
  `recipes/components/adapter_mlp_debug.yaml` verbatim; the adapter sweep has it as an arm, and that arm
  trains stage 1 through the sweep runner with no other edit.
- "Add a data source": the `CaptionFolder` example, executed as written, feeds the stage-1 datamodule.
- "Add a metric": the registry entry and the system's line, executed as written in a stage-1 system, log the tag
  the section names.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "extending.md").read_text()


def _section(heading: str) -> str:
    return DOC.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def test_adapter_example_is_the_repository_file():
    section = _section("Add an adapter")
    assert _blocks(section, "python") == [(ROOT / "components" / "adapters" / "mlp.py").read_text()]
    assert _blocks(section, "yaml") == [(ROOT / "recipes" / "components" / "adapter_mlp_debug.yaml").read_text()]


def test_adapter_example_trains_in_the_adapter_sweep(tmp_path, one_thread):
    from emu_lightning.sweeps.runner import execute, expand, load_sweep

    sweep = load_sweep(ROOT / "recipes" / "sweeps" / "adapter.yaml")
    (run,) = [r for r in expand(sweep) if r.labels["adapter"] == "mlp" and r.seed == 0]
    small = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "0",
             "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]
    status = execute(run, sweep, tmp_path, small, threads=1)
    assert status["state"] == "done", status.get("error")
    config = (tmp_path / run.name / "config.yaml").read_text()
    assert "class_path: components.adapters.mlp.MLPProjector" in config
    state = torch.load(tmp_path / run.name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["adapter.proj.2.weight"].shape == (256, 256)     # the MLP's second layer trained in stage 1
    assert json.loads((tmp_path / run.name / "status.json").read_text())["returncode"] == 0


def test_data_source_example_feeds_the_stage1_datamodule(tmp_path):
    from PIL import Image

    from emu_lightning.data.layout.tokenizer import load_tokenizer
    from emu_lightning.data.modules.captions import CaptionDataModule

    (code,) = _blocks(_section("Add a data source"), "python")
    scope: dict = {}
    exec(compile(code, "docs/extending.md", "exec"), scope)
    for i, color in enumerate(["red", "blue"]):
        Image.new("RGB", (40, 30), color).save(tmp_path / f"pair{i}.png")
        (tmp_path / f"pair{i}.txt").write_text(f"a {color} square.\n")
    source = scope["CaptionFolder"](str(tmp_path))
    assert source[1]["captions"] == ["a blue square."] and source[1]["image"].size == (40, 30)
    dm = CaptionDataModule(train=source, val={"mine": source}, test={}, batch_size=2, eval_batch_size=2,
                           tokenizer=load_tokenizer(None), num_image_tokens=16, text_length=20)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["prompt_ids"].shape == (2, 16 + 3)
    assert batch["captions"][0][0] in ("a red square.", "a blue square.")
    assert (batch["labels"] != -100).any()
    with pytest.raises(FileNotFoundError, match="no .png files"):
        scope["CaptionFolder"](str(tmp_path / "empty"))


def test_metric_example_is_one_registry_entry_and_logs_its_tag(monkeypatch):
    from torchmetrics import MeanMetric

    from emu_lightning.metrics import registry
    from tests.helpers import tiny_stage1

    section = _section("Add a metric")
    entry, line = _blocks(section, "python")
    (name, spec), = eval("{" + entry + "}", {"MetricSpec": registry.MetricSpec, "MeanMetric": MeanMetric}).items()
    monkeypatch.setitem(registry.METRICS, name, spec)
    system = tiny_stage1()
    preds = ["a red circle.", "two blue squares on the left."]
    for decode in ("greedy", "beam"):
        exec(line, {"torch": torch}, {"self": system, "name": "val", "decode": decode, "preds": preds})
    logged = {}
    monkeypatch.setattr(system, "log", lambda tag, value, **kw: logged.__setitem__(tag, float(value)))
    system._eval_epoch_end()
    assert logged == {"val/caption_words_greedy": 4.5, "val/caption_words_beam": 4.5}
    assert all(f"`{tag}`" in section for tag in logged)
