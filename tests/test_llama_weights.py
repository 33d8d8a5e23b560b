"""Local pretrained weights: a LLaMA folder in HF's sharded safetensors layout loads exactly, and one
whose keys do not match is refused with the missing and unexpected keys listed (EVA state-dict files, SD / SDXL
diffusers folders: tests/components/test_parity.py and tests/test_decoder.py)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from components.llm.llama import LlamaLM


def _saved(tmp_path, **kwargs) -> tuple[LlamaLM, str]:
    torch.manual_seed(3)
    lm = LlamaLM.tiny().eval()
    folder = tmp_path / "llama"
    lm.model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return lm, str(folder)


def test_llama_sharded_safetensors_folder_loads_exactly(tmp_path):
    lm, folder = _saved(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "llama" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1                    # really sharded
    loaded = LlamaLM(pretrained_path=folder).eval()
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(loaded(loaded.embed(ids), mask)[0]),
                                   lm.logits(lm(lm.embed(ids), mask)[0]), rtol=0, atol=0)


def test_llama_key_mismatch_lists_missing_and_unexpected_keys(tmp_path):
    _, folder = _saved(tmp_path)
    file = tmp_path / "llama" / "model.safetensors"
    state = load_file(str(file))
    state["model.layers.1.mlp.gate.weight"] = state.pop("model.layers.1.mlp.gate_proj.weight")
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"missing keys \['model\.layers\.1\.mlp\.gate_proj\.weight'\] \(1\)"
                                           r".*unexpected keys \['model\.layers\.1\.mlp\.gate\.weight'\] \(1\)"):
        LlamaLM(pretrained_path=folder)
