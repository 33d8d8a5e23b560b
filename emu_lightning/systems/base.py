"""EmuSystem: the parts every Emu stage shares — injected components, the policy, optimizer and logging.

A stage subclass adds its step logic (stage1: captioning CE; later stages: regression, diffusion).
Components arrive already built (LightningCLI instantiates them from the recipe's `class_path`s).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from components.base import Adapter, CausalLM, VisualEncoder
from components.multimodal import scatter_visual
from lightning.pytorch.utilities import rank_zero_info

from emu_lightning.checkpointing import load_parts
from emu_lightning.data.tokenizer import load_tokenizer
from emu_lightning.data.tokens import SpecialIds
from emu_lightning.systems.policy import StagePolicy


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, betas=(0.9, 0.95), eps=1e-6)


class PartsSystem(L.LightningModule):
    """A LightningModule made of named parts under a `StagePolicy`: freezing, parameter groups with per-part
    learning rates, linear-warmup + cosine schedule, frozen parts kept in eval mode, named-loss logging.

    Every stage (captioning, unified pretraining, the visual decoder) is one; subclasses set `parts`.

    Args:
        policy: what trains and the learning rate of each part.
        optimizer: optimizer factory taking parameter groups (AdamW β (.9,.95), eps 1e-6 by default).
        warmup: fraction of the run spent in linear warmup before cosine decay.
        min_lr_ratio: floor of the cosine schedule, as a fraction of each group's peak lr.
    """

    def __init__(self, policy: StagePolicy, optimizer: OptimizerCallable = _adamw, warmup: float = 0.02,
                 min_lr_ratio: float = 0.1):
        super().__init__()
        self.policy = policy
        self.optimizer_factory, self.warmup, self.min_lr_ratio = optimizer, warmup, min_lr_ratio

    # Stage hand-off: subclasses that start from an earlier stage set `init_from` and `handoff` {part: prefix}.
    init_from: str | None = None
    handoff: dict[str, str] = {}
    handoff_report = None

    @property
    def parts(self) -> dict[str, nn.Module]:
        """Named parts the policy, optimizer and audit talk about."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        # The hand-off runs once, before Lightning restores a `ckpt_path` (which then wins, as on resume).
        if self.init_from and self.handoff_report is None:
            self.handoff_report = load_parts(self.parts, self.init_from, self.handoff)
            rank_zero_info(str(self.handoff_report))

    def train(self, mode: bool = True) -> PartsSystem:
        # Frozen parts stay in eval mode (no dropout, fixed norms) even while the system trains.
        super().train(mode)
        for name, part in self.parts.items():
            if name not in self.policy.trainable:
                part.eval()
        return self

    def _names(self, kind: str) -> list[str]:
        """Names of the datamodule's evaluation sets of `kind` ("val" / "test"), in dataloader order."""
        dm = getattr(self.trainer, "datamodule", None)
        return list(getattr(dm, f"{kind}_names", None) or [kind])

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        # Only top-level tensors move; references, ids and scene records (frozen dataclasses) stay as they are.
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def log_losses(self, losses: dict[str, Tensor], stage: str, batch_size: int) -> None:
        for name, value in losses.items():
            self.log(f"{stage}/{name}", value, batch_size=batch_size, prog_bar=name == "loss",
                     sync_dist=stage != "train", add_dataloader_idx=False)

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(self.policy.param_groups(self.parts))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(self.warmup * total)

        def schedule(step: int) -> float:  # linear warmup, then cosine to min_lr_ratio
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class EmuSystem(PartsSystem):
    """Encoder → adapter → LLM with a training policy.

    Args:
        encoder: visual encoder, (B,3,H,W) → (B,L,D_enc).
        adapter: C-Former or mean-pool projector, (B,L,D_enc) → (B,N,D_llm).
        llm: causal LM; its vocabulary is resized to the tokenizer's (new rows = mean embedding).
        tokenizer: local tokenizer path; None = the synthetic BPE.
        policy, optimizer, warmup, min_lr_ratio: see `PartsSystem`.
        extra_parts: further named parts a stage adds (stage 2: the regression head); set by subclasses.
    """

    def __init__(self, encoder: VisualEncoder, adapter: Adapter, llm: CausalLM, tokenizer: str | None = None,
                 policy: StagePolicy | None = None, optimizer: OptimizerCallable = _adamw,
                 warmup: float = 0.02, min_lr_ratio: float = 0.1, extra_parts: dict[str, nn.Module] | None = None):
        super().__init__(policy or StagePolicy(lr={"encoder": 5e-5, "adapter": 1e-4, "llm": 3e-5}), optimizer,
                         warmup, min_lr_ratio)
        self.save_hyperparameters(ignore=["encoder", "adapter", "llm", "optimizer", "extra_parts",
                                          "regression_head"])
        self.encoder, self.adapter, self.llm = encoder, adapter, llm
        self._extra_parts = list(extra_parts or {})
        for name, module in (extra_parts or {}).items():
            setattr(self, name, module)
        self.tokenizer = load_tokenizer(tokenizer)
        self.ids = SpecialIds.from_tokenizer(self.tokenizer)
        if llm.vocab_size != len(self.tokenizer):
            llm.resize_vocab(len(self.tokenizer))
        self.policy.apply(self.parts)

    @property
    def parts(self) -> dict[str, nn.Module]:
        """Named parts the policy, optimizer and audit talk about."""
        return {"encoder": self.encoder, "adapter": self.adapter, "llm": self.llm,
                **{name: getattr(self, name) for name in self._extra_parts}}

    @property
    def num_image_tokens(self) -> int:
        return self.adapter.num_tokens

    def on_fit_start(self) -> None:
        # The run keeps its tokenizer beside its logs: `tokenizer: <log_dir>/tokenizer` reloads it exactly.
        # Without a logger there is no run directory (log_dir would fall back to the working directory).
        if self.trainer.is_global_zero and self.trainer.logger is not None and self.trainer.log_dir:
            self.tokenizer.save_pretrained(str(Path(self.trainer.log_dir) / "tokenizer"))

    def encode_images(self, pixels: Tensor) -> Tensor:
        """(n,3,H,W) → (n,N,D_llm) visual embeddings."""
        return self.adapter(self.encoder(pixels))

    def embed_multimodal(self, input_ids: Tensor, visual: Tensor) -> Tensor:
        """(B,T) ids + (n,N,D_llm) visual embeddings → (B,T,D_llm) with the visual rows at `<image>` positions."""
        return scatter_visual(self.llm.embed(input_ids), input_ids, visual, self.ids.image)
