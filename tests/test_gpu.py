"""GPU checks (marker `gpu`, skipped by default and wherever CUDA is missing):
    .venv/bin/python -m pytest -q -m gpu tests/test_gpu.py
A tiny stage-1 fit in bf16-mixed precision on one CUDA device through the CLI, and the KV-cached generation
loop against the full-recompute one on the GPU (docs/design.md §5).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]


def test_stage1_fit_bf16_on_cuda(tmp_path):
    from emu_lightning.cli import cli_main

    overlay = tmp_path / "gpu.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cuda", "devices": 1, "precision": "bf16-mixed", "max_steps": 3,
                    "val_check_interval": 3, "limit_val_batches": 1, "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path), "name": "gpu", "version": 0}}},
        "data": {"init_args": {"batch_size": 8, "eval_batch_size": 8, "num_workers": 0}}}))
    cli = cli_main(["fit", "--config", str(ROOT / "recipes" / "debug" / "stage1_meanpool.yaml"),
                    "--config", str(overlay)])
    assert cli.trainer.global_step == 3
    assert next(cli.model.parameters()).device.type == "cuda"
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert (tmp_path / "gpu" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_kv_cached_generation_matches_full_recompute_on_cuda():
    from components.generation import generate_visual_cached, generate_visual_reference
    from components.llm.llama import LlamaLM

    torch.manual_seed(0)
    llm = LlamaLM.tiny().cuda().eval()
    head = torch.nn.Linear(llm.hidden_dim, llm.hidden_dim, bias=False).cuda()
    prompt = torch.randn(2, 9, llm.hidden_dim, device="cuda")
    mask = torch.ones(2, 9, dtype=torch.long, device="cuda")
    cached = generate_visual_cached(llm, head, lambda x: x, prompt, mask, num_tokens=6)
    full = generate_visual_reference(llm, head, lambda x: x, prompt, mask, num_tokens=6)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
