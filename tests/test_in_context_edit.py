"""In-context edits, judged: Gen validation scores edit items as edits from the same decoded images it judges as
text-to-image (`<set>/edit_*` beside `<set>/t2i_*`), and `benchmarks/in_context_edit.py` runs end to end on tiny
Gen and decoder runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from emu_lightning.data.modules.captions import denormalize
from emu_lightning.data.synthetic.instruct import EDIT_KINDS, SyntheticGen
from tests.helpers import IMAGE_SIZE, tiny_adapter, tiny_encoder
from tests.test_edits import Oracle

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")   # the machine's cores are shared with training runs


class PerfectDecoder:
    """Stands in for the eval decoder: whatever it is asked, it returns the batch's true target images."""

    def __init__(self) -> None:
        self.images = None

    def to(self, device):
        return self

    def decode(self, cond, **kwargs):
        assert len(cond) == len(self.images)
        return self.images


def _gen_system():
    from components.llm.llama import LlamaLM
    from components.llm.regression_head import RegressionHead
    from emu_lightning.systems.instruct import GenSystem
    from emu_lightning.systems.policy import StagePolicy

    llm = LlamaLM(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128, vocab_size=128)
    return GenSystem(tiny_encoder(), tiny_adapter("meanpool"), llm, regression_head=RegressionHead(64, 64),
                     policy=StagePolicy(trainable=["llm"], lr={"llm": 1e-3})).eval()


def test_gen_validation_logs_edit_accuracy_from_the_judged_images(monkeypatch):
    from emu_lightning.data.modules.multimodal import MultimodalDataModule

    system = _gen_system()
    val = SyntheticGen("val", 4, image_size=IMAGE_SIZE, edit_p=1.0)
    dm = MultimodalDataModule(train={"gen": SyntheticGen("train", 2, image_size=IMAGE_SIZE)}, val={"val_edit": val},
                              test={}, demos={}, image_size=IMAGE_SIZE, eval_batch_size=4, max_length=96,
                              tokenizer=system.tokenizer, num_image_tokens=system.num_image_tokens)
    batch = next(iter(dm.val_dataloader()[0]))
    samples = batch["samples"]
    targets = denormalize(torch.stack([s["image"] for s in samples]))
    sources = denormalize(torch.stack([s["references"][0] for s in samples]))
    decoder = PerfectDecoder()
    decoder.images = targets
    judge = Oracle([*zip(targets, [s["scene"] for s in samples]), *zip(sources, [s["source_scene"] for s in samples])])
    system._eval_generation = [decoder, judge]
    system._trainer = SimpleNamespace(datamodule=dm)
    monkeypatch.setattr(system, "_eval_losses", lambda batch, name: None)
    system.on_validation_epoch_start()
    system._evaluate(batch, 0, "val_edit")
    logged = {}
    monkeypatch.setattr(system, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    system._eval_epoch_end()
    for key in ("val_edit/edit_kept", "val_edit/t2i_color", "val_edit/gen_cos"):
        assert key in logged, (key, sorted(logged))
    edit = {k: v for k, v in logged.items() if k.startswith("val_edit/edit_")}
    assert edit and all(v == 1.0 for v in edit.values()), edit
    # The grid: sources above targets above generated images.
    rows = system.eval_images["val_edit"]
    assert len(rows) == 3 and torch.equal(rows[0], sources[:8]) and torch.equal(rows[2], targets[:8])


@pytest.mark.slow
def test_benchmark_runs_end_to_end_on_tiny_runs(tmp_path, monkeypatch):
    from emu_lightning.metrics.semantic import save_scene_classifier, train_scene_classifier
    from tests import helpers

    gen = {**helpers.TINY_RUNS["stage2"], "class_path": "emu_lightning.systems.instruct.GenSystem"}
    monkeypatch.setitem(helpers.TINY_RUNS, "gen", gen)
    gen_run, decoder_run = helpers.tiny_run(tmp_path / "gen", "gen"), helpers.tiny_run(tmp_path / "decoder", "decoder")
    judge = tmp_path / "judge.safetensors"   # barely trained: the wiring is under test, not its verdicts
    save_scene_classifier(train_scene_classifier(image_size=16, steps=2, batch_size=4, width=8, hidden=8), judge)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.delitem(sys.modules, "in_context_edit", raising=False)
    from in_context_edit import main

    out = tmp_path / "results" / "edit.json"
    res = main(["--gen", str(gen_run), "--decoder", str(decoder_run), "--judge", str(judge), "--n", "2",
                "--steps", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res)) and set(saved) == {"meta", *EDIT_KINDS}
    for kind in EDIT_KINDS:
        assert set(saved[kind]) == {"val", "heldout"}
        for split in ("val", "heldout"):
            metrics = saved[kind][split]
            want = {"removed", "kept"} if kind == "remove" else {"color", "shape", "both", "position", "kept"}
            assert set(metrics) == want | {"sec_per_image"}, (kind, split, metrics)
            assert all(0.0 <= metrics[k] <= 1.0 for k in want)
    assert saved["meta"]["n"] == 2 and out.with_suffix(".png").is_file()
