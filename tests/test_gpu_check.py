"""benchmarks/gpu_check.py: its CPU dry run (the same code as on a GPU, at test size) writes every section; the bf16
peak is found by device name; on a CUDA GPU (marker `gpu`) the VRAM table is read beside the capacity plan."""
from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks.gpu_check import main, peak_tflops


def test_dry_run_reports_training_vram_generation_and_decoder(tmp_path, capsys):
    out, environ = tmp_path / "gpu.json", dict(os.environ)
    try:
        main(["--dry-run", "--out", str(out)])
    finally:                # Lightning's launcher sets MASTER_ADDR, MASTER_PORT, ...: later tests start clean
        os.environ.clear()
        os.environ.update(environ)
    assert not torch.distributed.is_initialized()
    r = json.loads(out.read_text())
    assert r["dry_run"] and r["strategy"] == "EmuModelParallelStrategy" and r["checkpointed"] == ["adapter", "llm"]
    t = r["train"]
    assert (t["batch"], t["steps"]) == (2, 2) and t["tokens_per_s"] > 0 and 0 < t["mfu"] < 1
    assert [(row["batch"], row["oom"], row["measured_gib"]) for row in r["vram"]] == [(2, False, None)]
    assert r["vram"][0]["planned_gib"] > 0
    assert r["generation"]["visual_tokens"] == 4 and r["generation"]["ratio"] > 0
    assert r["decoder"]["images_per_s"] > 0 and r["decoder"]["steps"] == 1
    text = capsys.readouterr().out
    assert "| micro-batch | tokens | measured GiB | planned GiB |" in text and "images/s" in text


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0)])
def test_peak_by_device_name(name, tflops, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda")) == (tflops, name)


def test_unknown_device_asks_for_the_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA T4")
    with pytest.raises(ValueError, match="'NVIDIA T4'.*give --peak-tflops"):
        peak_tflops(torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_on_cuda_matches_the_plan(tmp_path):
    """A short run of the real check: the measured peak of each micro-batch within 25% of the capacity plan
    (allocator rounding and cuBLAS workspaces are not in the plan)."""
    out = tmp_path / "gpu.json"
    main(["--steps", "40", "--batch", "4", "--batches", "1", "4", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["train"]["mfu"] > 0.05
    for row in r["vram"]:
        assert not row["oom"] and 0.75 < row["measured_over_planned"] < 1.25, row
