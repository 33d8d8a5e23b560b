"""Export: a trained stage-2 model → a folder of safetensors + config that reloads without Lightning
with identical outputs; its LLM loads in plain transformers; a tampered file is refused with the keys named."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaForCausalLM

from emu_lightning.data.layout.sequence import SequenceCollator
from emu_lightning.checkpoints.export import export_model, load_exported
from tests.helpers import IMAGE_SIZE, tiny_stage2

ROOT = Path(__file__).resolve().parents[1]
SPECS = {  # what a run's config.yaml holds under model.init_args for tests.helpers' tiny parts
    "meanpool": {
        "encoder": {"class_path": "components.encoders.eva.EVAEncoder",
                    "init_args": {"img_size": IMAGE_SIZE, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2,
                                  "drop_cls": True, "checkpoint_path": None}},
        "adapter": {"class_path": "components.adapters.meanpool.MeanPoolProjector",
                    "init_args": {"in_dim": 64, "out_dim": 64, "grid": 2}},
        "regression_head": {"class_path": "components.llm.regression_head.RegressionHead",
                            "init_args": {"in_dim": 64, "out_dim": 64}},
    },
}
SPECS["cformer"] = {**SPECS["meanpool"], "adapter": {
    "class_path": "components.adapters.cformer.CFormer",
    "init_args": {"in_dim": 64, "out_dim": 64, "num_queries": 4, "d_model": 32, "num_layers": 1, "num_heads": 2,
                  "d_ff": 64}}}


def _trained(adapter: str):
    system = tiny_stage2(adapter)
    with torch.no_grad():   # "trained": every weight moved away from its initialisation
        for p in system.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return system.eval()


def _batch(system) -> dict:
    img = lambda s: torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(s))  # noqa: E731
    docs = [{"id": "a", "source": "s", "segments": [("image", img(0)), ("text", "a red circle.")]},
            {"id": "b", "source": "s", "segments": [("text", "two blue squares"), ("image", img(1)), ("text", "end")]}]
    return SequenceCollator(system.tokenizer, system.num_image_tokens, max_length=64)(docs)


@pytest.mark.parametrize("adapter", ["meanpool", "cformer"])
def test_export_reloads_with_identical_outputs(adapter, tmp_path):
    system = _trained(adapter)
    folder = export_model(system, tmp_path / "export", SPECS[adapter])
    model = load_exported(folder)
    batch = _batch(system)
    with torch.no_grad():
        visual = system.encode_images(batch["pixel_values"])
        hidden, _ = system.llm(system.embed_multimodal(batch["input_ids"], visual), batch["attention_mask"])
        got = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got["logits"][mask], system.llm.logits(hidden)[mask], rtol=0, atol=0)
    torch.testing.assert_close(got["regression"][mask], system.regression_head(hidden)[mask], rtol=0, atol=0)
    assert model.tokenizer.get_vocab() == system.tokenizer.get_vocab()


def test_exported_llm_loads_in_plain_transformers(tmp_path):
    system = _trained("meanpool")
    folder = export_model(system, tmp_path / "export", SPECS["meanpool"])
    hf = LlamaForCausalLM.from_pretrained(folder / "llm", local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    ids = torch.tensor([tok("a red circle on the left.", add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = system.llm.logits(system.llm(system.llm.embed(ids), mask)[0])
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert hf.config.vocab_size == len(system.tokenizer) == len(tok)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_export_loads_without_lightning(tmp_path):
    """Slow (a fresh interpreter, ~10 s): `.venv/bin/python -m pytest -q -m slow tests/test_export.py`."""
    folder = export_model(_trained("meanpool"), tmp_path / "export", SPECS["meanpool"])
    code = (f"import sys; from emu_lightning.checkpoints.export import load_exported; m = load_exported({str(folder)!r}); "
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('lightning', 'pytorch_lightning')); "
            "assert not bad, bad; print(sum(p.numel() for p in m.parameters()))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_tampered_export_names_missing_and_unexpected_keys(tmp_path):
    folder = export_model(_trained("meanpool"), tmp_path / "export", SPECS["meanpool"])
    state = load_file(str(folder / "adapter.safetensors"))
    state["project_down.weight"] = state.pop("project_up.weight")
    save_file(state, str(folder / "adapter.safetensors"))
    expected = r"missing keys \['project_up.weight'\].*unexpected keys \['project_down.weight'\]"
    with pytest.raises(RuntimeError, match=expected):
        load_exported(folder)
