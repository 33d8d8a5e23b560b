"""Visual decoder (docs/design.md §4): a diffusion UNet trained as the decoder half of an autoencoder.

image → frozen encoder (+ adapter) → N visual embeddings → UNet (cross-attention on them) → the same image.
Only the UNet trains; the encoder, adapter and VAE stay frozen (checked here and by the trainable audit).
The condition is Emu2's pooled EVA tokens (`condition: pooled`, no LLM) or Emu1's adapter outputs
(`condition: adapter`, the C-Former outputs in autoencoder mode). At sampling time the LLM's regressed
embeddings replace them (see `emu_lightning.inference.pipelines`).

Validation reconstructs every image from its embeddings with classifier-free guidance and reports PSNR /
SSIM, FID (feature network named by `fid_feature`) and, on synthetic scenes, whether each object's shape
and color survive (a frozen scene classifier's verdict).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from components.base import Adapter, PooledAdapter, VisualEncoder
from components.decoder.sampling import SD_SCHEDULE, make_scheduler, sample
from components.decoder.space import LatentSpace, PixelSpace
from components.decoder.unet import VisualDecoderUNet
from emu_lightning.data.modules.captions import denormalize
from emu_lightning.data.layout.tokenizer import load_tokenizer
from emu_lightning.metrics.registry import MetricStore
from emu_lightning.metrics.semantic import load_scene_classifier
from emu_lightning.systems.base import PartsSystem, _adamw
from emu_lightning.systems.policy import StagePolicy

CONDITIONS = ("pooled", "adapter")
NULL_CONDITIONS = ("zero_image", "zeros")


def check_pairing(generator: nn.Module, unet: nn.Module, condition: str, what: str = "the generator") -> None:
    """A stage-2 generator and a decoder fit when the generator regresses the N × D embeddings of the space the
    decoder is conditioned on; otherwise a ValueError names both sides."""
    width, tokens = generator.regression_head.out_dim, generator.num_image_tokens
    if width != unet.cond_dim or tokens != unet.num_tokens:
        raise ValueError(f"{what} regresses {tokens} × {width} embeddings (target_space="
                         f"{generator.target_space!r}) but the decoder is conditioned on {unet.num_tokens} × "
                         f"{unet.cond_dim} (condition={condition!r})")
    if generator.target_space != condition:
        raise ValueError(f"{what} regresses target_space={generator.target_space!r} embeddings but the "
                         f"decoder is conditioned on condition={condition!r}: train both on one space")


class DecoderSystem(PartsSystem):
    """Autoencoder-style diffusion training of the visual decoder.

    Args:
        encoder, adapter: the visual side of a stage-1/2 model; frozen, loaded by `init_from` + `handoff`.
        unet: the denoiser, conditioned on (B,N,D_cond) embeddings.
        space: `LatentSpace` (a frozen AutoencoderKL) or None = pixel space.
        condition: `pooled` (Emu2: adapter.pool, D_enc) or `adapter` (Emu1: adapter outputs, D_llm).
        image_size: side of the decoder's output image.
        noise_schedule: DDPM training schedule kwargs over the SD default (scaled-linear β, 1000 steps);
            its `prediction_type` (epsilon / sample / v_prediction) is also what sampling reads.
        cond_drop: probability that a training condition is replaced by the null embedding (0.1 in both papers,
            docs/design.md §4).
        noise_offset: Emu2's offset noise (0.1): noise += offset · randn(B,C,1,1).
        null_condition: `zero_image` (the default: features of an all-zero normalised image, docs/design.md §4)
            or `zeros`.
        ema_decay: keep an EMA of the UNet weights (used for sampling) when set, e.g. 0.999.
        init_from / handoff: checkpoint and {part: source prefix} for the frozen encoder and adapter. The default
            (None) also loads the UNet when the checkpoint has one (`unet.*`: tuning an earlier decoder run);
            from a stage-1/2 checkpoint the UNet starts fresh. Name a mapping to choose exactly.
        sampler / sample_steps / guidance_scale: evaluation sampling (Emu1 pndm 50 / 7.5, Emu2 euler 50 / 3;
            docs/design.md §4).
        semantic_classifier: path of a trained scene classifier (safetensors); None skips the semantic check.
        fid_feature: FID feature network: `scene` (the scene classifier's features, no download) or
            `inception` with `fid_weights` a local Inception file; None skips FID.
        max_bad_steps, bad_step_window: the NaN / Inf guard (see `PartsSystem`).
        tokenizer: linked into the caption datamodule (the decoder itself reads no text).
        num_samples: images per evaluation set shown in the TensorBoard grid.
        generator: a trained stage-2 / Gen model (run directory, checkpoint or export folder) whose embeddings
            generated from captions condition the decoder: in training for a `generated_p` share of samples
            (paired with the true image: the decoder learns to draw from what the LLM actually produces), and in
            evaluation as text-to-image (`<set>/t2i_*`). Frozen, and kept out of this system's checkpoint.
        generated_p: share of training samples conditioned on the generator's embedding of one of their captions
            (drawn at random) instead of the encoder's; the condition drop applies to both.
        snr_gamma: Min-SNR-γ loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
            Weighting Strategy"; γ = 5 in the paper): each sample's MSE is weighted by min(SNR(t), γ) for
            sample (x0) prediction, that divided by SNR(t) for epsilon and by SNR(t) + 1 for v-prediction (the
            paper's equivalents of one weighting), so the easy low-noise steps stop dominating. None (the
            default, both papers' decoders) weights every step equally.
    """

    def __init__(self, encoder: VisualEncoder, adapter: Adapter, unet: VisualDecoderUNet,
                 space: LatentSpace | None = None, condition: str = "pooled", image_size: int = 32,
                 noise_schedule: dict[str, Any] | None = None, cond_drop: float = 0.1, noise_offset: float = 0.0,
                 null_condition: str = "zero_image", ema_decay: float | None = None, init_from: str | None = None,
                 handoff: dict[str, str] | None = None, sampler: str = "ddim", sample_steps: int = 25,
                 guidance_scale: float = 3.0, eval_seed: int = 0, semantic_classifier: str | None = None,
                 fid_feature: str | None = "scene", fid_weights: str | None = None, max_bad_steps: int = 10,
                 bad_step_window: int | None = 1000, tokenizer: str | None = None, num_samples: int = 8,
                 policy: StagePolicy | None = None,
                 optimizer: OptimizerCallable = _adamw, warmup: float = 0.02, min_lr_ratio: float = 0.1,
                 generator: str | None = None, generated_p: float = 0.0, snr_gamma: float | None = None):
        super().__init__(policy or StagePolicy(trainable=["unet"], lr={"unet": 1e-4}, weight_decay=0.01),
                         optimizer, warmup, min_lr_ratio, max_bad_steps, bad_step_window)
        self.save_hyperparameters(ignore=["encoder", "adapter", "unet", "space", "optimizer"], logger=False)
        if condition not in CONDITIONS:
            raise ValueError(f"condition={condition!r}; expected one of {CONDITIONS}")
        if null_condition not in NULL_CONDITIONS:
            raise ValueError(f"null_condition={null_condition!r}; expected one of {NULL_CONDITIONS}")
        if condition == "pooled" and not isinstance(adapter, PooledAdapter):
            raise ValueError(f"condition='pooled' needs an adapter with pool() (Emu2's MeanPoolProjector); "
                             f"{type(adapter).__name__} has none: use condition='adapter'")
        if self.policy.trainable != ["unet"]:
            raise ValueError(f"the decoder trains the UNet only (docs/design.md §4); "
                             f"policy.trainable={self.policy.trainable}")
        width = adapter.in_dim if condition == "pooled" else adapter.out_dim
        if width != unet.cond_dim:
            raise ValueError(f"conditioning width {width} (condition={condition!r} of {type(adapter).__name__}) does "
                             f"not match the UNet's cross_attention_dim {unet.cond_dim}")
        if adapter.num_tokens != unet.num_tokens:
            raise ValueError(f"the adapter gives {adapter.num_tokens} tokens per image, the UNet expects "
                             f"{unet.num_tokens}")
        self.encoder, self.adapter, self.unet = encoder, adapter, unet
        self.space = space if space is not None else PixelSpace()
        if self.space.channels != unet.sample_channels:
            raise ValueError(f"the diffusion space has {self.space.channels} channels, the UNet's sample input "
                             f"{unet.sample_channels}")
        if image_size != unet.sample_size * self.space.factor:
            raise ValueError(f"image_size {image_size} != UNet sample_size {unet.sample_size} × space factor "
                             f"{self.space.factor}")
        self.condition_kind, self.image_size = condition, image_size
        # The training schedule as given (keys DDPM ignores, e.g. PNDM's skip_prk_steps, still reach the sampler).
        self.schedule = {**SD_SCHEDULE, **(noise_schedule or {})}
        self.noise_scheduler = make_scheduler("ddpm", self.schedule)
        make_scheduler(sampler, self.schedule)   # fails now, not at the first validation, if they do not fit
        unet.image_size = image_size   # the pooled path's time_ids name the output image, not the latent side
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.cond_drop, self.noise_offset, self.null_kind = cond_drop, noise_offset, null_condition
        self.ema = copy.deepcopy(unet).requires_grad_(False) if ema_decay else None
        self.ema_decay = ema_decay
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma={snr_gamma}; expected a positive γ (5 in Hang et al. 2023) or None")
        self.snr_gamma = snr_gamma
        self.init_from = init_from
        self.handoff = handoff or {"encoder": "encoder", "adapter": "adapter", "unet": "unet"}
        self.handoff_optional = () if handoff else ("unet",)
        self.sampler, self.sample_steps, self.guidance_scale = sampler, sample_steps, guidance_scale
        self.eval_seed, self.num_samples = eval_seed, num_samples
        self.semantic_classifier, self.fid_feature, self.fid_weights = semantic_classifier, fid_feature, fid_weights
        self.tokenizer = load_tokenizer(tokenizer)
        self.policy.apply(self.parts)
        if not 0.0 <= generated_p <= 1.0:
            raise ValueError(f"generated_p={generated_p}; expected a probability in [0, 1]")
        if generated_p > 0 and not generator:
            raise ValueError(f"generated_p={generated_p} needs a generator: a stage-2 / Gen run directory, "
                             f"checkpoint or export folder (model.init_args.generator)")
        self.generated_p = generated_p
        # In a list, not as an attribute: the frozen generator must not become a submodule (checkpoint, audit).
        self._generator: list[nn.Module] = []
        if generator:   # loaded now, so a generator that does not fit stops the run before any data is read
            from emu_lightning.inference.infer import load_model

            g = load_model(generator).eval().requires_grad_(False)
            check_pairing(g, unet, condition, f"generator {generator}")
            self._generator.append(g)
        # (set, metric) → metric, made on first use; the store keeps the FID feature network and the scene
        # classifier out of the checkpoint and the parameter audit (metrics/registry.py).
        self.metrics = MetricStore(self)
        self._judges: dict[str, nn.Module] = {}          # the frozen scene classifier, loaded on first use
        self.eval_images: dict[str, list[Tensor]] = {}    # set → [input, reconstruction] rows for ImageGridLog

    # --- parts and conditions -------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        fresh = self.handoff_report is None
        super().setup(stage)
        # A hand-off that loads the UNet (tuning an earlier decoder run) starts the EMA from it too; otherwise
        # the EMA, copied from the random UNet at construction, would sample garbage for ~1/(1-decay) steps.
        if fresh and self.ema is not None and self.handoff_report is not None and "unet" in self.handoff_report.loaded:
            self.ema.load_state_dict(self.unet.state_dict())

    @property
    def parts(self) -> dict[str, nn.Module]:
        parts = {"encoder": self.encoder, "adapter": self.adapter, "unet": self.unet}
        if isinstance(self.space, LatentSpace):
            parts["vae"] = self.space
        return parts

    @property
    def num_image_tokens(self) -> int:
        return self.adapter.num_tokens

    def encoder_input(self, pixel_values: Tensor) -> Tensor:
        """Batch images → the encoder's resolution (bicubic), so one batch serves a 448-px encoder and a
        1024-px decoder target (Emu2)."""
        side = self.encoder.img_size
        if pixel_values.shape[-1] == side:
            return pixel_values
        return F.interpolate(pixel_values, size=(side, side), mode="bicubic", antialias=True, align_corners=False)

    @torch.no_grad()
    def condition(self, pixel_values: Tensor) -> Tensor:
        """(B,3,H,W) CLIP-normalised images → (B,N,D_cond) decoder conditions (frozen encoder + adapter)."""
        feats = self.encoder(self.encoder_input(pixel_values))
        return self.adapter.pool(feats) if self.condition_kind == "pooled" else self.adapter(feats)

    @torch.no_grad()
    def generate_conditions(self, captions: list[str]) -> Tensor:
        """Captions → (B,N,D_cond) embeddings generated by the frozen `generator` (its head's loop)."""
        if not self._generator:
            raise ValueError("generate_conditions needs a generator (model.init_args.generator)")
        g = self._generator[0].to(self.device)
        return g.generate_image_embeddings([[("text", c)] for c in captions])

    @torch.no_grad()
    def null_embedding(self, like: Tensor) -> Tensor:
        """(1,N,D_cond) unconditional embedding: features of an all-zero normalised (mean-colour) image."""
        if self.null_kind == "zeros":
            return like.new_zeros(1, *like.shape[1:])
        side = self.encoder.img_size
        return self.condition(like.new_zeros(1, 3, side, side))

    def target_images(self, pixel_values: Tensor) -> Tensor:
        """(B,3,H,W) encoder input → (B,3,S,S) decoder target in [-1,1] (S = image_size)."""
        x = denormalize(pixel_values)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x * 2 - 1

    def denoiser(self, use_ema: bool = True) -> nn.Module:
        return self.ema if (use_ema and self.ema is not None) else self.unet

    # --- training -------------------------------------------------------------------------------------------

    def losses(self, batch: dict) -> dict[str, Tensor]:
        pixels = batch["pixel_values"]
        B = len(pixels)
        cond = self.condition(pixels)                                        # (B,N,D) frozen encoder + adapter
        if self.generated_p > 0:   # a share of conditions: the generator's embeddings of a caption instead
            use = torch.rand(B, device=cond.device) < self.generated_p
            if use.any():
                captions = [c for c, u in zip(batch["captions"], use.tolist()) if u]
                cond = cond.clone()
                cond[use] = self.generate_conditions(
                    [c[int(torch.randint(len(c), ()))] for c in captions]).to(cond)
        loss, drop = self.diffusion_loss(pixels, cond, self.cond_drop)
        return {"diffusion_loss": loss, "loss": loss, "cond_drop_frac": drop.float().mean()}

    def diffusion_loss(self, pixels: Tensor, cond: Tensor, cond_drop: float = 0.0,
                       denoiser: nn.Module | None = None,
                       t_range: tuple[float, float] | None = None) -> tuple[Tensor, Tensor]:
        """The denoising loss of drawing (B,3,H,W) CLIP-normalised images from (B,N,D_cond) conditions, and the
        (B,) mask of conditions dropped to the null embedding (with probability `cond_drop`). Gradients flow into
        `cond`: a stage-2 model can train its generated embeddings through a frozen decoder (`Stage2System`'s
        `decoder_loss`). `denoiser` defaults to the UNet being trained. `t_range` = (lo, hi), fractions of the
        schedule (0 clean, 1 pure noise): timesteps are drawn from that range only and weighted equally (no
        Min-SNR weighting); None draws from the whole schedule with the decoder's own weighting."""
        B = len(pixels)
        z = self.space.encode(self.target_images(pixels))                    # (B,C,h,w)
        # condition drop: with p = cond_drop the null embedding replaces the condition (CFG training)
        drop = torch.rand(B, device=z.device) < cond_drop
        if cond_drop > 0:   # (a float test: no device sync)
            cond = torch.where(drop[:, None, None], self.null_embedding(cond).to(cond.dtype), cond)
        # noise (+ offset noise, constant per channel), timestep, forward diffusion
        noise = torch.randn_like(z)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(B, z.shape[1], 1, 1, device=z.device, dtype=z.dtype)
        steps = self.noise_scheduler.config.num_train_timesteps
        lo, hi = (0, steps) if t_range is None else (round(t_range[0] * (steps - 1)),
                                                      round(t_range[1] * (steps - 1)) + 1)
        t = torch.randint(lo, hi, (B,), device=z.device)
        z_t = self.noise_scheduler.add_noise(z, noise, t)
        # target by prediction type, MSE (Min-SNR-γ weighted when set)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "sample":
            target = z
        else:
            target = self.noise_scheduler.get_velocity(z, noise, t)
        pred = (denoiser or self.unet)(z_t, t, cond)
        if self.snr_gamma is None or t_range is not None:
            return F.mse_loss(pred.float(), target.float()), drop
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        return (per_sample * self.min_snr_weights(t)).mean(), drop

    def min_snr_weights(self, t: Tensor) -> Tensor:
        """Per-sample Min-SNR-γ weights (Hang et al. 2023) for timesteps `t`, by prediction type."""
        from diffusers.training_utils import compute_snr   # lazy: it imports more of diffusers than sampling needs

        snr = compute_snr(self.noise_scheduler, t).float()
        weights = snr.clamp(max=self.snr_gamma)
        if self.prediction_type == "epsilon":
            # SNR is 0 at the last step of a zero-terminal-SNR schedule: min(0, γ) / 0 is taken as 1 there
            weights = torch.where(snr > 0, weights / snr.clamp(min=torch.finfo(snr.dtype).tiny), 1.0)
        elif self.prediction_type == "v_prediction":
            weights = weights / (snr + 1)
        return weights   # sample (x0) prediction: min(SNR, γ) itself

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        self.count_skips(batch.get("skipped") or {}, len(batch["pixel_values"]))   # as stage 1: same data module
        losses = self.losses(batch)
        loss = self.checked_loss(losses)   # None: non-finite, the step is skipped and counted (PartsSystem)
        if loss is not None:
            self.log_losses(losses, "train", len(batch["pixel_values"]))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        # Once per optimizer step (not per micro-batch under gradient accumulation).
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        if self.ema is not None and (batch_idx + 1) % accumulate == 0:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.unet.parameters()):
                    e.lerp_(p.detach(), 1 - self.ema_decay)

    # --- sampling and evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, cond: Tensor, guidance: float | None = None, steps: int | None = None,
               sampler: str | None = None, generator: torch.Generator | None = None,
               null: Tensor | None = None) -> Tensor:
        """(B,N,D_cond) embeddings → (B,3,S,S) images in [0,1], sampled with classifier-free guidance."""
        scheduler = make_scheduler(sampler or self.sampler, self.schedule)
        unet = self.denoiser()
        null = self.null_embedding(cond) if null is None else null
        shape = (len(cond), self.space.channels, self.unet.sample_size, self.unet.sample_size)
        z = sample(unet, scheduler, cond, null.to(cond), shape, steps or self.sample_steps,
                   self.guidance_scale if guidance is None else guidance, generator)
        return ((self.space.decode(z) + 1) / 2).clamp(0, 1)

    def _evaluate(self, batch: dict, batch_idx: int, name: str) -> None:
        pixels = batch["pixel_values"]
        gen = torch.Generator().manual_seed(self.eval_seed + batch_idx)   # same noise every evaluation
        recon = self.decode(self.condition(pixels), generator=gen)         # (B,3,S,S) in [0,1]
        real = (self.target_images(pixels) + 1) / 2
        # <set>/psnr, ssim; <set>/semantic_* of reconstructions; <set>/fid; <set>/t2i_* of text-to-image
        self.metrics.metric(name, "recon").update(recon, real)
        if self.semantic_classifier and "scenes" in batch:
            self.metrics.metric(name, "semantic", classifier=self._classifier()).update(recon, batch["scenes"])
        if self.fid_feature:
            classifier = self._classifier() if self.fid_feature == "scene" else None
            fid = self.metrics.metric(name, "fid", feature=self.fid_feature, classifier=classifier,
                                      weights_path=self.fid_weights)
            fid.update(real, real=True)
            fid.update(recon, real=False)
        t2i = None
        if self._generator and "captions" in batch:   # text → generator → decoder, judged like reconstructions
            gen = torch.Generator().manual_seed(self.eval_seed + batch_idx)
            cond = self.generate_conditions([c[0] for c in batch["captions"]])
            t2i = self.decode(cond, generator=gen)
            if self.semantic_classifier and "scenes" in batch:
                self.metrics.metric(name, "t2i", classifier=self._classifier()).update(t2i, batch["scenes"])
        rows = self.eval_images.setdefault(name, [])
        if not rows:
            rows += [real[: self.num_samples].cpu(), recon[: self.num_samples].cpu()]
            if t2i is not None:
                rows.append(t2i[: self.num_samples].cpu())

    def _classifier(self) -> nn.Module:
        # Held in a dict, not as an attribute: an nn.Module attribute would become a submodule, and the frozen
        # judge would land in every checkpoint (and break loading it into a fresh system).
        if "scene" not in self._judges:
            if not self.semantic_classifier:
                raise ValueError("fid_feature='scene' needs semantic_classifier: the path of a trained scene "
                                 "classifier (benchmarks/scene_classifier.py writes one)")
            self._judges["scene"] = load_scene_classifier(self.semantic_classifier).to(self.device).eval().requires_grad_(False)
        return self._judges["scene"]
