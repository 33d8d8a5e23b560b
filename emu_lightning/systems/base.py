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
from torch.nn.utils import get_total_norm

from components.base import Adapter, CausalLM, VisualEncoder
from components.multimodal import scatter_visual
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from emu_lightning.checkpoints.io import rng_state, set_rng_state
from emu_lightning.checkpoints.handoff import load_parts
from emu_lightning.checkpoints.shards import materialize, meta_tensors
from emu_lightning.data.layout.tokenizer import load_tokenizer
from emu_lightning.data.layout.tokens import SpecialIds
from emu_lightning.data.modules.ranks import gather, rank_world
from emu_lightning.systems.guard import NonFiniteGuard
from emu_lightning.systems.policy import StagePolicy


def grads_finite(grads: list[Tensor]) -> bool:
    """Whether every element of `grads` is finite.

    A finite total 2-norm proves it (a NaN or ±inf propagates through the sum of squares), and costs one fused
    pass (`get_total_norm`, ~0.4 ms for the 3.6 M-parameter debug model against ~17 ms for an elementwise
    `isfinite` per tensor). Only a non-finite norm, which finite values whose squares overflow can also give,
    takes the exact elementwise test.
    """
    if bool(torch.isfinite(get_total_norm(grads))):
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, betas=(0.9, 0.95), eps=1e-6)


class PartsSystem(L.LightningModule):
    """A LightningModule made of named parts under a `StagePolicy`: freezing, parameter groups with per-part
    learning rates, linear-warmup + cosine schedule, frozen parts kept in eval mode, named-loss logging.

    Every stage (captioning, unified pretraining, the visual decoder) is one; subclasses set `parts`.
    All share one NaN / Inf guard (`checked_loss` in the training step, gradients before each optimizer step;
    see `guard.py`), and checkpoints carry the guard's counts, `counters` and the process RNG states, so a
    resumed run continues exactly where it stopped. Validation and test share one path: a system that evaluates
    defines `_evaluate(batch, batch_idx, name)` for a batch of the named set, and its `metrics` store is logged and
    reset by `_eval_epoch_end` after each loop.

    Args:
        policy: what trains and the learning rate of each part.
        optimizer: optimizer factory taking parameter groups (AdamW β (.9,.95), eps 1e-6 by default).
        warmup: fraction of the run spent in linear warmup before cosine decay.
        min_lr_ratio: floor of the cosine schedule, as a fraction of each group's peak lr.
        max_bad_steps: non-finite steps (loss or gradient; each is skipped) tolerated within `bad_step_window`.
        bad_step_window: window of the count, in optimizer steps; None = the whole run.
    """

    def __init__(self, policy: StagePolicy, optimizer: OptimizerCallable = _adamw, warmup: float = 0.02,
                 min_lr_ratio: float = 0.1, max_bad_steps: int = 10, bad_step_window: int | None = 1000):
        super().__init__()
        self.policy = policy
        self.optimizer_factory, self.warmup, self.min_lr_ratio = optimizer, warmup, min_lr_ratio
        self.guard = NonFiniteGuard(max_bad_steps, bad_step_window)
        self.counters: dict[str, int] = {}        # run totals a stage logs (truncated, skipped); checkpointed
        self._terms: dict[str, Tensor] = {}       # this step's loss terms, named by the guard
        self._rng_to_restore: dict | None = None

    # Stage hand-off: subclasses that start from an earlier stage set `init_from` and `handoff` {part: prefix}.
    init_from: str | None = None
    handoff: dict[str, str] = {}
    handoff_optional: tuple[str, ...] = ()    # parts loaded only when the checkpoint holds them
    handoff_report = None

    @property
    def parts(self) -> dict[str, nn.Module]:
        """Named parts the policy, optimizer and audit talk about."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        # The hand-off runs once, before Lightning restores a `ckpt_path` (which then wins, as on resume).
        if meta_tensors(self) and self._trainer is not None:
            # Built empty under a `*-true` precision: take its dtype now, as the precision plugin's `convert_module`
            # would after setup (free on meta), so that a file of that dtype is assigned without a copy.
            dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(str(self.trainer.precision))
            if dtype is not None:
                self.to(dtype)
        if self._shards_before_handoff():
            return   # sharded first, then each rank loads its own slices: `configure_model`
        self._handoff()

    def _shards_before_handoff(self) -> bool:
        """Whether the hand-off waits for the sharding: a model built empty (`main.py --empty_init true`) under
        `EmuModelParallelStrategy` (FSDP2) on more than one process. `configure_model` then shards the meta model
        and each rank assigns only its slice of each tensor (`handoff.local_shard`). One process, FSDP1 and every
        other strategy load the full tensors in `setup`."""
        from emu_lightning.systems.sharding import EmuModelParallelStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        return (isinstance(strategy, EmuModelParallelStrategy) and strategy.world_size > 1
                and self.handoff_report is None and bool(meta_tensors(self)))

    def _handoff(self, device: str | torch.device = "cpu") -> None:
        """Load `init_from` into the parts (once), then initialise on `device` what it did not hold."""
        if self.init_from and self.handoff_report is None:
            self.handoff_report = load_parts(self.parts, self.init_from, self.handoff, type(self).__name__,
                                             self.handoff_optional)
            rank_zero_info(str(self.handoff_report))
        if meta_tensors(self):   # built empty (`main.py --empty_init true`): initialise what init_from did not hold
            for part, modules in materialize(self.parts, device).items():
                rank_zero_info(f"  {part:<16} initialised after the empty build: {', '.join(modules[:4])}"
                               + (f" and {len(modules) - 4} more" if len(modules) > 4 else ""))
            if left := meta_tensors(self):
                raise ValueError(f"{len(left)} tensors of {type(self).__name__} are still on the meta device after "
                                 f"the hand-off, outside its parts {sorted(self.parts)}: {left[:8]}")

    def configure_model(self) -> None:
        # Sharding sits beside the model (sharding.py): FSDP2 under EmuModelParallelStrategy, else nothing.
        from emu_lightning.systems.sharding import configure_sharding

        deferred = self._shards_before_handoff()
        configure_sharding(self)
        if deferred:   # the meta model is sharded: each rank reads and initialises its own shards only
            self._handoff(self.trainer.strategy.root_device)

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

    # --- evaluation: validation and test run one path, per named set --------------------------------------

    def _evaluate(self, batch: dict, batch_idx: int, name: str) -> None:
        """One batch of the evaluation set `name` (validation and test alike): the system's losses and metrics."""
        raise NotImplementedError(f"{type(self).__name__} does not evaluate: it defines no `_evaluate`")

    def _eval_epoch_start(self) -> None:
        """Before every validation or test loop: drop the samples and image rows the last loop kept for the
        sample-logging callbacks (`eval_samples`, `eval_images`), so a test loop never shows validation's."""
        self.eval_samples: dict[str, list] = {}
        self.eval_images: dict[str, list] = {}

    def _eval_epoch_end(self) -> None:
        """After every validation or test loop: compute, log and reset the metrics of the system's `MetricStore`."""
        self.metrics.log_and_reset()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, batch_idx, self._names("val")[dataloader_idx])

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, batch_idx, self._names("test")[dataloader_idx])

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start()

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end()

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        # Only top-level tensors move; references, ids and scene records (frozen dataclasses) stay as they are.
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def count_skips(self, skipped: dict[str, int], batch_size: int, min_seen: int = 200) -> None:
        """Samples read past for this batch (`{kind: n}`, undecodable images...): run totals by kind, logged as
        `train/skipped_total` and `train/skipped/<kind>`, checkpointed with the other counters. Past the data's
        `max_bad_fraction` of all samples read (after `min_seen`) the run stops, naming the counts."""
        n = sum(skipped.values())
        self.counters["seen"] = self.counters.get("seen", 0) + batch_size + n
        self.counters["skipped"] = self.counters.get("skipped", 0) + n
        for kind, k in skipped.items():
            self.counters[f"skipped/{kind}"] = self.counters.get(f"skipped/{kind}", 0) + k
        trainer = self._trainer                                  # None when called outside a Trainer (tests)
        if trainer is not None:
            self.log("train/skipped_total", float(self.counters["skipped"]))
            for key, value in self.counters.items():
                if key.startswith("skipped/"):
                    self.log(f"train/{key}", float(value))
        limit = getattr(getattr(trainer, "datamodule", None), "max_bad_fraction", None)
        seen, bad = self.counters["seen"], self.counters["skipped"]
        if limit is not None and seen >= min_seen and bad / seen > limit:
            kinds = {k[len("skipped/"):]: v for k, v in self.counters.items() if k.startswith("skipped/")}
            raise RuntimeError(f"{bad} of {seen} samples read were skipped ({bad / seen:.1%} > max_bad_fraction="
                               f"{limit}): {kinds}; fix the data or raise data.init_args.max_bad_fraction")

    def log_losses(self, losses: dict[str, Tensor], stage: str, batch_size: int) -> None:
        for name, value in losses.items():
            self.log(f"{stage}/{name}", value, batch_size=batch_size, prog_bar=name == "loss",
                     sync_dist=stage != "train", add_dataloader_idx=False)

    # --- NaN / Inf guard ------------------------------------------------------------------------------------

    @property
    def bad_steps(self) -> int:
        """Steps skipped for a non-finite loss or gradient so far."""
        return self.guard.total

    def _all_ranks(self, ok: bool) -> bool:
        # Every rank skips together, or none does (DDP / FSDP must stay in step).
        return self.trainer.strategy.reduce_boolean_decision(ok, all=True) if self._trainer is not None else ok

    def _skip(self, what: str, detail: str = "") -> None:
        step = self.trainer.global_step if self._trainer is not None else 0
        rank_zero_warn(self.guard.record(step, what, self._terms, detail))
        if self._trainer is not None:
            self.log("train/bad_steps", float(self.guard.total))

    def checked_loss(self, losses: dict[str, Tensor]) -> Tensor | None:
        """`losses["loss"]`, or None when it is not finite on some rank: returning None from `training_step`
        skips backward and the optimizer step. Counted by the guard, which stops the run past its limit."""
        self._terms = {k: v.detach() for k, v in losses.items()}
        if self._all_ranks(bool(torch.isfinite(losses["loss"]))):
            return losses["loss"]
        self._skip("loss")
        return None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # A non-finite gradient (with a finite loss) skips the step too: with every grad set to None the
        # optimizer leaves every parameter and its state as they are. Runs before gradient clipping, which
        # would otherwise spread the NaN. Under fp16 AMP the GradScaler already skips overflowing steps.
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = {id(p): p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
        if not grads:
            return  # the loss was skipped: no backward ran
        if self._all_ranks(grads_finite(list(grads.values()))):
            return
        names = [n for n, p in self.named_parameters() if id(p) in grads and not torch.isfinite(grads[id(p)]).all()]
        optimizer.zero_grad(set_to_none=True)
        self._skip("gradient", f"; non-finite gradients in {len(names)} tensors: {names[:3]}")

    def on_train_epoch_end(self) -> None:
        # The run's fault counts, in the log at every epoch end (an endless stream's one epoch ends with the fit).
        counts = ", ".join(f"{k}: {v}" for k, v in self.counters.items())
        rank_zero_info(f"epoch {self.current_epoch} end, step {self.global_step}: data {counts or 'no counters'}; "
                       f"non-finite steps skipped: {self.guard.total}")

    # --- checkpoint state: guard, counters, RNG ----------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Every rank builds the checkpoint and rank 0 writes it: each rank's RNG rides along (`rng_ranks`), so each
        # resumes its own draws (docs/scale.md).
        rngs = gather(rng_state())
        checkpoint["emu_state"] = {"guard": self.guard.state_dict(), "counters": dict(self.counters),
                                   "rng": rngs[0], **({"rng_ranks": rngs} if len(rngs) > 1 else {})}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("emu_state")
        if state is None:
            return  # a checkpoint from before this state was saved: weights and loops only
        self.guard.load_state_dict(state["guard"])
        self.counters.update(state["counters"])
        rank, world = rank_world()
        rngs = state.get("rng_ranks")
        # Another number of ranks (a re-sharded map-style resume): rank 0's RNG, as before per-rank states.
        self._rng_to_restore = rngs[rank] if rngs is not None and len(rngs) == world else state["rng"]

    def on_train_start(self) -> None:
        # Restored here, not at load: building the train DataLoader iterator draws from the torch RNG, which the
        # uninterrupted run did once at its start, not at the step it was saved.
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

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
        policy, optimizer, warmup, min_lr_ratio, max_bad_steps, bad_step_window: see `PartsSystem`.
        extra_parts: further named parts a stage adds (stage 2: the regression head); set by subclasses.
    """

    def __init__(self, encoder: VisualEncoder, adapter: Adapter, llm: CausalLM, tokenizer: str | None = None,
                 policy: StagePolicy | None = None, optimizer: OptimizerCallable = _adamw,
                 warmup: float = 0.02, min_lr_ratio: float = 0.1, max_bad_steps: int = 10,
                 bad_step_window: int | None = 1000, extra_parts: dict[str, nn.Module] | None = None):
        super().__init__(policy or StagePolicy(lr={"encoder": 5e-5, "adapter": 1e-4, "llm": 3e-5}), optimizer,
                         warmup, min_lr_ratio, max_bad_steps, bad_step_window)
        self.save_hyperparameters(ignore=["encoder", "adapter", "llm", "optimizer", "extra_parts",
                                          "regression_head"], logger=False)   # the CLI logs the full config
        # Widths must chain encoder → adapter → LLM; checked here, at start-up, before any data is read.
        if encoder.embed_dim != adapter.in_dim:
            raise ValueError(f"encoder width (encoder.embed_dim={encoder.embed_dim}, {type(encoder).__name__}) does "
                             f"not match the adapter's input width (adapter.in_dim={adapter.in_dim}, "
                             f"{type(adapter).__name__})")
        if adapter.out_dim != llm.hidden_dim:
            raise ValueError(f"adapter output width (adapter.out_dim={adapter.out_dim}, {type(adapter).__name__}) "
                             f"does not match the LLM width (llm.hidden_dim={llm.hidden_dim}, {type(llm).__name__})")
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
        # `trainer.log_dir` broadcasts from rank 0: every rank reads it, or rank 0 waits forever (DDP / FSDP).
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        if self.trainer.is_global_zero and log_dir:
            self.tokenizer.save_pretrained(str(Path(log_dir) / "tokenizer"))

    def encode_images(self, pixels: Tensor) -> Tensor:
        """(n,3,H,W) → (n,N,D_llm) visual embeddings."""
        return self.adapter(self.encoder(pixels))

    def embed_multimodal(self, input_ids: Tensor, visual: Tensor) -> Tensor:
        """(B,T) ids + (n,N,D_llm) visual embeddings → (B,T,D_llm) with the visual rows at `<image>` positions (and at
        `[gIMG]` ones, video frames in the release's layout, where the tokenizer has that token; `SpecialIds.visual`).
        """
        return scatter_visual(self.llm.embed(input_ids), input_ids, visual, self.ids.visual)
