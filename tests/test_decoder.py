"""Visual decoder (docs/design.md §4): losses and gradient flow per prediction type and condition, condition drop,
classifier-free guidance, the null condition, bad input, the NaN guard, EMA, latent space, the stage hand-off,
and a fit of the debug recipe through the real CLI. Everything runs on tiny real models on one CPU core."""
from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from callbacks.trainable_audit import audit_rows
from components.adapters.cformer import CFormer
from components.adapters.meanpool import MeanPoolProjector
from components.decoder.sampling import guided, make_scheduler, sample
from components.decoder.space import LatentSpace
from components.decoder.unet import VisualDecoderUNet, check_diffusers_folder
from emu_lightning.systems.decoder import DecoderSystem
from emu_lightning.systems.policy import StagePolicy
from tests.helpers import (IMAGE_SIZE, TINY_VAE, tiny_adapter, tiny_datamodule, tiny_decoder, tiny_encoder, tiny_stage1,
                           tiny_unet)

ROOT = Path(__file__).resolve().parents[1]
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]


pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(batch: int) -> torch.Tensor:
    """(B,3,32,32) CLIP-normalised encoder input."""
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)


def make_system(arm: str, **kwargs) -> DecoderSystem:
    """The decoder on one conditioning arm.

    pooled: Emu2, the mean-pool adapter's pooled EVA tokens (4 × 64 = encoder width);
    pooled_sdxl: the same, with their mean also fed through SDXL's added conditioning (`text_time`);
    grid: the same, with the spatial grid path (2×2 tokens → 4 channels concatenated to the UNet input);
    adapter: Emu1 layout on mean-pool outputs projected to 48-d (a width unlike the encoder's 64);
    cformer: Emu1, C-Former outputs (3 queries × 40). The UNet is sized from the adapter, so N and D must
    come from it and not from the encoder.
    """
    if arm == "pooled":
        return tiny_decoder(**kwargs)
    if arm == "pooled_sdxl":
        return tiny_decoder(unet=tiny_unet(pooled=True), **kwargs)
    if arm == "grid":
        return tiny_decoder(unet=tiny_unet(grid_channels=4, unet={"in_channels": 3 + 4}), **kwargs)
    adapter = (MeanPoolProjector(in_dim=64, out_dim=48, grid=2) if arm == "adapter" else
               CFormer(in_dim=64, out_dim=40, num_queries=3, d_model=32, num_layers=1, num_heads=2, d_ff=64))
    unet = tiny_unet(cond_dim=adapter.out_dim, num_tokens=adapter.num_tokens)
    return DecoderSystem(tiny_encoder(), adapter, unet, condition="adapter", image_size=16,
                         policy=StagePolicy(trainable=["unet"], lr={"unet": 1e-3}), sample_steps=2, **kwargs)


def spy_unet(system: DecoderSystem, monkeypatch, real: bool = True) -> list[torch.Tensor]:
    """Record every condition the UNet receives; `real=False` answers zeros instead of running it (cheap)."""
    seen: list[torch.Tensor] = []
    forward = system.unet.forward

    def spy(sample, timestep, cond, time_ids=None):
        seen.append(cond.detach().clone())
        return forward(sample, timestep, cond, time_ids) if real else torch.zeros_like(sample)

    monkeypatch.setattr(system.unet, "forward", spy)
    return seen


def rows_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,N,D) vs (B|1,N,D) → (B,) bool: row i equals exactly."""
    return (a == b).flatten(1).all(1)


# --- 1. shapes and gradient flow ----------------------------------------------------------------------------

@pytest.mark.parametrize("arm", ["pooled", "pooled_sdxl", "grid", "adapter", "cformer"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_losses_shapes_and_gradient_flow(arm, prediction_type):
    system = make_system(arm, noise_schedule={"prediction_type": prediction_type}, cond_drop=0.5)
    assert system.prediction_type == prediction_type
    x = pixels(3)
    cond = system.condition(x)
    width = system.adapter.in_dim if system.condition_kind == "pooled" else system.adapter.out_dim
    assert cond.shape == (3, system.adapter.num_tokens, width)

    losses = system.losses({"pixel_values": x})
    assert losses["loss"].ndim == 0 and torch.isfinite(losses["loss"])
    assert set(losses) == {"diffusion_loss", "loss", "cond_drop_frac"}
    losses["loss"].backward()
    no_grad = [n for n, p in system.unet.named_parameters() if p.grad is None]
    assert not no_grad, f"UNet parameters without a gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in system.unet.parameters())
    assert sum(p.grad.abs().sum() for p in system.unet.parameters()) > 0
    for part in ("encoder", "adapter"):
        for name, p in getattr(system, part).named_parameters():
            assert not p.requires_grad and p.grad is None, f"{part}.{name} takes part in training"

    images = system.decode(cond[:2], steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_batch_at_another_resolution_than_the_encoder():
    """Emu2 feeds one batch to a 448-px encoder and a 1024-px target: a 64-px batch here serves the 32-px
    encoder (resized) and the 16-px decoder target."""
    system = tiny_decoder()
    x = torch.randn(2, 3, 64, 64)
    assert system.condition(x).shape == (2, 4, 64)
    assert system.target_images(x).shape == (2, 3, 16, 16)
    assert torch.isfinite(system.losses({"pixel_values": x})["loss"])


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_loss_target_follows_prediction_type(prediction_type, monkeypatch):
    """An oracle UNet that answers the right target for `prediction_type` (recovered from z_t, the clean image
    and t) gets zero loss; one answering another type's target does not."""
    system = tiny_decoder(noise_schedule={"prediction_type": prediction_type}, cond_drop=0.0)
    x = pixels(4)
    z = system.target_images(x)                                       # pixel space: the latents are the image
    abar = system.noise_scheduler.alphas_cumprod

    def targets(z_t, t):
        a = abar[t].view(-1, 1, 1, 1)
        noise = (z_t - a.sqrt() * z) / (1 - a).sqrt()
        return {"epsilon": noise, "sample": z, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * z}

    answer = prediction_type
    monkeypatch.setattr(system.unet, "forward", lambda z_t, t, cond, time_ids=None: targets(z_t, t)[answer])
    assert system.losses({"pixel_values": x})["loss"] < 1e-6
    for answer in set(PREDICTION_TYPES) - {prediction_type}:
        assert system.losses({"pixel_values": x})["loss"] > 1e-2, answer


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weighting_scales_each_sample_by_its_timestep(prediction_type, monkeypatch):
    """snr_gamma (Hang et al. 2023): an oracle UNet off its target by a known per-sample constant c_i gives
    loss mean_i(c_i² · w(t_i)) with w = min(SNR, γ)/SNR (epsilon), min(SNR, γ)/(SNR + 1) (v) or min(SNR, γ)
    (sample), SNR = ᾱ/(1 − ᾱ) computed here from the schedule; the zero-terminal-SNR last step stays finite."""
    gamma = 5.0
    system = tiny_decoder(noise_schedule={"prediction_type": prediction_type, "rescale_betas_zero_snr": True,
                                          "beta_schedule": "squaredcos_cap_v2"}, cond_drop=0.0, snr_gamma=gamma)
    x = pixels(6)
    z = system.target_images(x)
    abar = system.noise_scheduler.alphas_cumprod.double()
    offsets = torch.tensor([3.0, 1.0, 1.5, 2.0, 0.25, 0.5])
    seen = {}

    def oracle(z_t, t, cond, time_ids=None):
        a = abar[t].view(-1, 1, 1, 1).float()
        noise = (z_t - a.sqrt() * z) / (1 - a).sqrt()
        target = {"epsilon": noise, "sample": z, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * z}
        seen["t"] = t
        return target[prediction_type] + offsets.view(-1, 1, 1, 1)

    monkeypatch.setattr(system.unet, "forward", oracle)
    last = system.noise_scheduler.config.num_train_timesteps - 1
    fixed = torch.tensor([0, 10, 300, 600, 900, last])
    monkeypatch.setattr(torch, "randint", lambda *a, **k: fixed)
    loss = system.losses({"pixel_values": x})["loss"]
    assert torch.equal(seen["t"], fixed)
    snr = abar[fixed] / (1 - abar[fixed])
    expected_w = {"epsilon": torch.where(snr > 0, snr.clamp(max=gamma) / snr, 1.0),
                  "v_prediction": snr.clamp(max=gamma) / (snr + 1),
                  "sample": snr.clamp(max=gamma)}[prediction_type]
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx((offsets.double() ** 2 * expected_w).mean().item(), rel=1e-3)
    # the weighting is not a constant: an unweighted mean would fail above
    assert abs((offsets.double() ** 2).mean().item() - loss.item()) > 0.1



def test_diffusion_loss_t_range_draws_only_there_and_weights_equally(monkeypatch):
    """`diffusion_loss(t_range=(lo, hi))` (Stage2System's `decoder_t_range`): timesteps come from that share of the
    schedule only, and each sample counts equally even when the decoder trains with Min-SNR weighting."""
    system = tiny_decoder(cond_drop=0.0, snr_gamma=5.0, noise_schedule={"prediction_type": "v_prediction"})
    x = pixels(64)
    steps = system.noise_scheduler.config.num_train_timesteps
    seen = {}

    def off_by(z_t, t, cond, time_ids=None):   # off its target by a constant c per sample: loss = mean(c²)
        seen["t"] = t
        return torch.zeros_like(z_t)

    monkeypatch.setattr(system.unet, "forward", off_by)
    cond = system.condition(x)
    system.diffusion_loss(x, cond)
    assert int(seen["t"].min()) < steps // 2   # the whole schedule (64 draws)
    ranged, _ = system.diffusion_loss(x, cond, t_range=(0.5, 1.0))
    t = seen["t"]
    assert int(t.min()) >= round(0.5 * (steps - 1)) and int(t.max()) <= steps - 1
    # Unweighted: the plain mean squared error against the target of the drawn timesteps.
    monkeypatch.setattr(torch, "randint", lambda *a, **k: t)
    z = system.target_images(x)
    torch.manual_seed(0)
    ranged, _ = system.diffusion_loss(x, cond, t_range=(0.5, 1.0))
    torch.manual_seed(0)
    torch.rand(len(x))                          # the condition-drop draw comes first
    noise = torch.randn_like(z)
    target = system.noise_scheduler.get_velocity(z, noise, t)
    assert ranged.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-5)
    # (the Min-SNR weights of v-prediction are SNR / (SNR + 1) here: far below 1 at these noise levels)
    assert (target.pow(2).flatten(1).mean(1) * system.min_snr_weights(t)).mean().item() < 0.5 * ranged.item()


def test_min_snr_gamma_must_be_positive():
    with pytest.raises(ValueError, match="snr_gamma=0"):
        tiny_decoder(snr_gamma=0)


# --- 2. condition drop --------------------------------------------------------------------------------------

def test_cond_drop_rate_is_binomial_and_drops_to_the_null(monkeypatch):
    system = tiny_decoder(cond_drop=0.1)
    seen = spy_unet(system, monkeypatch, real=False)   # 4000 rows: the UNet is the cost, the drop happens before it
    B, p = 4000, 0.1
    x = pixels(B)
    frac = system.losses({"pixel_values": x})["cond_drop_frac"].item()
    tol = 4 * math.sqrt(p * (1 - p) / B)              # 4σ of a binomial fraction: 0.019
    assert abs(frac - p) <= tol, (frac, tol)
    cond = system.condition(x)
    null = system.null_embedding(cond)
    is_null, is_cond = rows_equal(seen[0], null), rows_equal(seen[0], cond)
    assert (is_null ^ is_cond).all(), "every row is either its own condition or the null embedding"
    assert is_null.float().mean().item() == pytest.approx(frac)


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_cond_drop_never_and_always(rate, monkeypatch):
    system = tiny_decoder(cond_drop=rate)
    seen = spy_unet(system, monkeypatch, real=False)
    x = pixels(64)
    assert system.losses({"pixel_values": x})["cond_drop_frac"].item() == rate
    expected = system.null_embedding(system.condition(x)) if rate else system.condition(x)
    assert rows_equal(seen[0], expected).all()


@pytest.mark.parametrize("null_condition", ["zero_image", "zeros"])
def test_dropped_rows_reach_the_real_unet_as_the_null(null_condition, monkeypatch):
    system = tiny_decoder(cond_drop=0.5, null_condition=null_condition)
    seen = spy_unet(system, monkeypatch, real=True)
    x = pixels(8)
    losses = system.losses({"pixel_values": x})
    assert torch.isfinite(losses["loss"])
    cond = system.condition(x)
    null = system.null_embedding(cond)
    is_null, is_cond = rows_equal(seen[0], null), rows_equal(seen[0], cond)
    assert (is_null ^ is_cond).all()
    assert 0 < is_null.sum() < 8, "seeded draw should drop some rows and keep others"
    assert is_null.float().mean().item() == pytest.approx(losses["cond_drop_frac"].item())


# --- 3. classifier-free guidance ----------------------------------------------------------------------------

@pytest.mark.parametrize("scalar_t", [False, True])
def test_guided_at_one_is_conditional_and_at_zero_unconditional(scalar_t):
    system = tiny_decoder()
    unet = system.unet.eval()
    cond = system.condition(pixels(2))
    null = system.null_embedding(cond)                           # zero-image features: not zeros, not cond
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor(500) if scalar_t else torch.tensor([10, 500])
    with torch.no_grad():
        out_c, out_u = unet(x, t, cond), unet(x, t, null.expand_as(cond))
        assert not torch.allclose(out_c, out_u, atol=1e-4), "the null must change the prediction"
        torch.testing.assert_close(guided(unet, x, t, cond, null, 1.0), out_c, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(guided(unet, x, t, cond, null, 0.0), out_u, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(guided(unet, x, t, cond, null, 3.0), out_u + 3.0 * (out_c - out_u),
                                   atol=1e-5, rtol=1e-4)


def sample_through_guided(denoise, scheduler, cond, null, shape, steps, scale, generator):
    """Reference loop: `sample` with every step through `guided`, however trivial the scale."""
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=generator).to(cond) * scheduler.init_noise_sigma
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        out = guided(denoise, scheduler.scale_model_input(x, t), t.expand(shape[0]), cond, null, scale)
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("sampler", ["ddim", "euler", "pndm"])
def test_sample_shortcut_at_guidance_one_is_faithful(sampler):
    system = tiny_decoder()
    unet = system.unet.eval()
    cond = system.condition(pixels(2))
    null = system.null_embedding(cond)
    shape, config = (2, 3, 16, 16), dict(system.noise_scheduler.config)

    def run(fn, scale):
        # 4 steps: the fewest PNDM's Runge-Kutta warm-up accepts (see test_pndm_samples_with_few_steps)
        return fn(unet, make_scheduler(sampler, config), cond, null, shape, 4, scale, torch.Generator().manual_seed(0))

    with torch.no_grad():
        reference = run(sample_through_guided, 1.0)
        torch.testing.assert_close(run(sample, 1.0), reference, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(run(sample, 3.0), run(sample_through_guided, 3.0), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(run(sample, 3.0), reference, atol=1e-3)


def test_pndm_samples_with_few_steps():
    system = tiny_decoder()
    images = system.decode(system.condition(pixels(1)), sampler="pndm", steps=2)
    assert images.shape == (1, 3, 16, 16)


def test_euler_sampler_spaces_timesteps_leading(monkeypatch):
    import emu_lightning.systems.decoder as decoder_module

    built = []
    make = decoder_module.make_scheduler
    monkeypatch.setattr(decoder_module, "make_scheduler", lambda *a, **k: built.append(make(*a, **k)) or built[-1])
    system = tiny_decoder()
    system.decode(system.condition(pixels(1)), sampler="euler", steps=2, guidance=1.0)
    assert built[-1].config.timestep_spacing == "leading"


def test_make_scheduler_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown scheduler 'heun'"):
        make_scheduler("heun")


# --- 4. null condition --------------------------------------------------------------------------------------

def test_null_condition_is_zero_image_features_or_zeros():
    system = tiny_decoder()
    cond = system.condition(pixels(2))
    null = system.null_embedding(cond)
    assert null.shape == (1, *cond.shape[1:])
    torch.testing.assert_close(null, system.condition(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)))
    assert null.abs().amax() > 0, "the null (docs/design.md §4) is the mean-colour image's features, never zeros"

    zeros = tiny_decoder(null_condition="zeros").null_embedding(cond)
    assert zeros.shape == (1, *cond.shape[1:]) and not zeros.any()


# --- 5. bad input -------------------------------------------------------------------------------------------

def test_condition_width_mismatch_at_construction():
    with pytest.raises(ValueError, match=r"conditioning width 64 .*cross_attention_dim 48"):
        tiny_decoder(unet=tiny_unet(cond_dim=48))            # pooled tokens are 64-d (the encoder's width)
    with pytest.raises(ValueError, match=r"conditioning width 48 .*cross_attention_dim 64"):
        DecoderSystem(tiny_encoder(), MeanPoolProjector(in_dim=64, out_dim=48, grid=2), tiny_unet(cond_dim=64),
                      condition="adapter", image_size=16)
    with pytest.raises(ValueError, match=r"4 tokens per image.*expects 9"):
        tiny_decoder(unet=tiny_unet(num_tokens=9))


def test_condition_width_mismatch_in_the_unet():
    with pytest.raises(ValueError, match=r"conditioning width 64 .*cross_attention_dim 32"):
        tiny_unet(cond_dim=64, unet={"cross_attention_dim": 32})
    unet = tiny_unet(cond_dim=64)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"conditioning width 32 .*cross_attention_dim 64"):
        unet(x, t, torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match="expects 4 conditioning tokens, got 5"):
        unet(x, t, torch.randn(2, 5, 64))
    with pytest.raises(ValueError, match=r"must be \(B,N,D\) embeddings; got shape \(2, 64\)"):
        unet(x, t, torch.randn(2, 64))                       # (B,D) instead of (B,N,D)


def test_missing_diffusers_files_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"VAE folder {re.escape(str(empty))} is missing config.json"):
        LatentSpace(pretrained=str(empty))
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"VAE folder {re.escape(str(config_only))} is missing its weights.*"
                                                r"diffusion_pytorch_model.safetensors"):
        LatentSpace(pretrained=str(config_only))
    with pytest.raises(FileNotFoundError, match=rf"UNet folder {re.escape(str(config_only))} is missing its weights"):
        VisualDecoderUNet(cond_dim=64, num_tokens=4, pretrained=str(config_only))
    with pytest.raises(FileNotFoundError, match=rf"UNet folder not found: {re.escape(str(tmp_path / 'nowhere'))}"):
        check_diffusers_folder(str(tmp_path / "nowhere"), "UNet")
    (config_only / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert check_diffusers_folder(str(config_only), "VAE") == config_only


def test_latent_space_needs_a_source():
    with pytest.raises(ValueError, match="needs `pretrained`"):
        LatentSpace()
    with pytest.raises(FileNotFoundError, match="VAE folder not found: nowhere"):
        LatentSpace(pretrained="nowhere", config=TINY_VAE)   # a given folder wins over `config`


@pytest.mark.parametrize("trainable", [["unet", "encoder"], ["encoder"], ["unet", "adapter"]])
def test_policy_that_trains_more_than_the_unet_is_refused(trainable):
    policy = StagePolicy(trainable=trainable, lr={k: 1e-4 for k in trainable})
    with pytest.raises(ValueError, match=r"trains the UNet only.*policy.trainable="):
        DecoderSystem(tiny_encoder(), tiny_adapter("meanpool"), tiny_unet(), image_size=16, policy=policy)


@pytest.mark.parametrize("kwargs, message", [
    ({"condition": "llm"}, r"condition='llm'; expected one of \('pooled', 'adapter'\)"),
    ({"null_condition": "empty_prompt"}, r"null_condition='empty_prompt'; expected one of"),
])
def test_unknown_condition_kinds(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_decoder(**kwargs)


def test_pooled_condition_needs_a_pooling_adapter():
    with pytest.raises(ValueError, match=r"condition='pooled' needs an adapter with pool\(\).*CFormer"):
        DecoderSystem(tiny_encoder(), tiny_adapter("cformer"), tiny_unet(), condition="pooled", image_size=16)


# --- 6. NaN guard -------------------------------------------------------------------------------------------

def nan_unet(system: DecoderSystem, monkeypatch, at_calls: set[int] | None = None) -> None:
    """The UNet answers NaN (on the given 0-based call numbers, or always)."""
    forward, calls = system.unet.forward, [0]

    def broken(sample, timestep, cond, time_ids=None):
        calls[0] += 1
        if at_calls is None or calls[0] - 1 in at_calls:
            return torch.full_like(sample, float("nan"))
        return forward(sample, timestep, cond, time_ids)

    monkeypatch.setattr(system.unet, "forward", broken)


@pytest.mark.parametrize("cause", ["unet", "image"])
def test_nan_loss_skips_then_stops(cause, monkeypatch):
    system = tiny_decoder(max_bad_steps=2)
    batch = {"pixel_values": pixels(2)}
    assert torch.is_tensor(system.training_step(batch, 0)) and system.bad_steps == 0
    if cause == "unet":
        nan_unet(system, monkeypatch)
    else:
        batch["pixel_values"][1, 0, 3, 3] = float("nan")
    for i in range(2):
        assert system.training_step(batch, i) is None
        assert system.bad_steps == i + 1
    with pytest.raises(RuntimeError, match=r"step 0: non-finite loss \(loss terms: diffusion_loss=nan.*3 non-finite "
                                           r"steps in the last 1000 steps \(steps \[0, 0, 0\]\), more than max_bad_steps=2"):
        system.training_step(batch, 2)


class WatchUNet(L.Callback):
    """Per training batch: did the UNet's weights change?"""

    def __init__(self) -> None:
        self.changed: list[bool] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before = [p.detach().clone() for p in module.unet.parameters()]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.changed.append(any(not torch.equal(a, p) for a, p in zip(self.before, module.unet.parameters())))


def fit(system: DecoderSystem, max_steps: int, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, accelerator="cpu",
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks))
    trainer.fit(system, datamodule=tiny_datamodule(system, train_size=16, batch_size=2))
    return trainer


def test_nan_step_is_skipped_in_a_real_fit(monkeypatch):
    system = tiny_decoder()
    nan_unet(system, monkeypatch, at_calls={1})
    watch = WatchUNet()
    trainer = fit(system, max_steps=3, callbacks=[watch])
    assert system.bad_steps == 1
    assert watch.changed == [True, False, True], watch.changed   # the NaN batch moved nothing, the next one did
    assert trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in system.unet.parameters())
    assert trainer.state.finished


# --- 7. EMA -------------------------------------------------------------------------------------------------

def test_ema_is_the_average_after_one_step_and_decode_uses_it():
    system = tiny_decoder(ema_decay=0.5)
    assert all(torch.equal(e, p) for e, p in zip(system.ema.parameters(), system.unet.parameters()))
    assert not any(p.requires_grad for p in system.ema.parameters())
    assert any(k.startswith("ema.") for k in system.state_dict()), "the EMA is checkpointed"
    old = [p.detach().clone() for p in system.unet.parameters()]
    fit(system, max_steps=1)
    new = list(system.unet.parameters())
    assert any(not torch.equal(o, n) for o, n in zip(old, new)), "one optimizer step moved the UNet"
    for e, o, n in zip(system.ema.parameters(), old, new):
        torch.testing.assert_close(e, 0.5 * o + 0.5 * n)

    assert system.denoiser() is system.ema and system.denoiser(use_ema=False) is system.unet
    cond = system.condition(pixels(2))
    with_ema = system.decode(cond, generator=torch.Generator().manual_seed(0))
    ema, system.ema = system.ema, None                      # the same sampling on the raw UNet ...
    with_unet = system.decode(cond, generator=torch.Generator().manual_seed(0))
    system.unet.load_state_dict(ema.state_dict())           # ... and on the raw UNet holding the EMA weights
    with_ema_weights = system.decode(cond, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(with_ema, with_ema_weights)
    assert not torch.allclose(with_ema, with_unet)


class RecordUNet(L.Callback):
    """The UNet's weights at the end of every training batch (callbacks run before the module's own hook)."""

    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.weights.append([p.detach().clone() for p in module.unet.parameters()])


def test_ema_updates_once_per_optimizer_step_under_accumulation():
    system = tiny_decoder(ema_decay=0.5)
    ema = [p.detach().clone() for p in system.unet.parameters()]
    record = RecordUNet()
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        accelerator="cpu", limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[record])
    trainer.fit(system, datamodule=tiny_datamodule(system, train_size=16, batch_size=2))
    assert len(record.weights) == 4
    for after_step in (record.weights[1], record.weights[3]):   # the weights after optimizer steps 1 and 2
        ema = [0.5 * e + 0.5 * w for e, w in zip(ema, after_step)]
    for e, expected in zip(system.ema.parameters(), ema):
        torch.testing.assert_close(e, expected)


# --- 8. latent space ----------------------------------------------------------------------------------------

def test_latent_space_decoder():
    space = LatentSpace(config=TINY_VAE)
    assert (space.channels, space.factor) == (4, 2)
    system = tiny_decoder(space=space, image_size=16)
    assert (system.unet.sample_size, system.unet.sample_channels) == (8, 4)
    x = pixels(2)
    losses = system.losses({"pixel_values": x})
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in space.parameters())
    rows = {row[0]: row for row in audit_rows(system)}
    _, n_train, n_frozen, dtypes, verdict = rows["vae"]
    assert (n_train, verdict, dtypes) == (0, "frozen", "float32") and n_frozen == sum(
        p.numel() for p in space.vae.parameters())
    assert rows["unet"][1] > 0 and rows["unet"][4] == "train"
    system.train()
    assert not space.training and not space.vae.training, "the VAE stays in eval mode"
    images = system.decode(system.condition(x), steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1


def test_latent_space_size_and_channel_mismatch():
    space = LatentSpace(config=TINY_VAE)
    with pytest.raises(ValueError, match=r"image_size 16 != UNet sample_size 16 × space factor 2"):
        tiny_decoder(space=space, image_size=16, unet=tiny_unet(sample_size=16, in_channels=4))
    with pytest.raises(ValueError, match=r"the diffusion space has 4 channels, the UNet's sample input 3"):
        tiny_decoder(space=space, image_size=16, unet=tiny_unet(sample_size=8, in_channels=3))
    with pytest.raises(ValueError, match=r"image_size 32 != UNet sample_size 16 × space factor 1"):
        tiny_decoder(image_size=32, unet=tiny_unet(sample_size=16))


def test_latent_sampling_does_not_clip_latents(monkeypatch):
    # SD / SDXL latents (× scaling_factor) have unit variance, so |z| > 1 is common; their schedulers set
    # clip_sample=False. An x0-predicting UNet that answers 3.0 everywhere must decode a latent of 3.0.
    space = LatentSpace(config=TINY_VAE)
    system = tiny_decoder(space=space, image_size=16, noise_schedule={"prediction_type": "sample"})
    monkeypatch.setattr(system.unet, "forward", lambda z, t, cond, time_ids=None: torch.full_like(z, 3.0))
    latents = []
    decode = space.decode
    monkeypatch.setattr(space, "decode", lambda z: latents.append(z) or decode(z))
    system.decode(system.condition(pixels(1)), guidance=1.0, sampler="ddim", steps=2)
    # Not exactly 3: SD's DDIM ends on ᾱ_0 < 1 (set_alpha_to_one false), so a little noise stays; clipping
    # would give at most 1.
    assert latents[0].min() > 2.5, latents[0].min()


def save_sd_like_unet(folder: Path, sdxl: bool):
    """A tiny SD1.5-like (32-d text states) or SDXL-like (also 32-d text_embeds in the added conditioning) UNet
    saved as a diffusers folder: what Emu1 re-uses from SD1.5 (768 → 5120-d C-Former outputs) and Emu2 from
    SDXL-base (2048 / 1280 → 1792-d pooled EVA tokens). The decoders here read 48-d embeddings."""
    from diffusers import UNet2DConditionModel

    unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32], layers_per_block=1,
                norm_num_groups=8, attention_head_dim=8, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=32)
    if sdxl:
        unet.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 6 * 8)
    source = UNet2DConditionModel(**unet)
    source.save_pretrained(folder)
    return source


def remade(decoder: VisualDecoderUNet, source) -> list[str]:
    """Parameters whose shape differs from the saved UNet's: the ones `from_pretrained` had to re-make."""
    saved = dict(source.named_parameters())
    return [n for n, p in decoder.unet.named_parameters() if p.shape != saved[n].shape]


@pytest.mark.parametrize("pooled", [False, True])
def test_pretrained_unet_remakes_only_the_mismatched_layers(pooled, tmp_path):
    source = save_sd_like_unet(tmp_path, sdxl=pooled)
    decoder = VisualDecoderUNet(cond_dim=48, num_tokens=4, pretrained=str(tmp_path), pooled=pooled,
                                unet={"addition_time_embed_dim": 8} if pooled else None)
    names = remade(decoder, source)
    kv = [n for n in names if ".attn2.to_k." in n or ".attn2.to_v." in n]
    assert len(kv) == 8 and set(names) - set(kv) == ({"add_embedding.linear_1.weight"} if pooled else set())
    if pooled:
        assert decoder.unet.add_embedding.linear_1.in_features == 48 + 6 * 8
    saved = dict(source.named_parameters())
    loaded = [n for n, _ in decoder.unet.named_parameters() if n not in names]
    assert all(torch.equal(decoder.unet.get_parameter(n), saved[n]) for n in loaded)


def test_sdxl_unet_without_pooled_is_refused_at_construction(tmp_path):
    save_sd_like_unet(tmp_path, sdxl=True)
    with pytest.raises(ValueError, match="pooled"):
        VisualDecoderUNet(cond_dim=48, num_tokens=4, pretrained=str(tmp_path), pooled=False)


@pytest.mark.parametrize("pooled", [False, True])
def test_pretrained_unet_initialises_the_remade_layers(pooled, tmp_path):
    source = save_sd_like_unet(tmp_path, sdxl=pooled)

    def load(seed: int) -> VisualDecoderUNet:
        torch.manual_seed(seed)
        return VisualDecoderUNet(cond_dim=48, num_tokens=4, pretrained=str(tmp_path), pooled=pooled,
                                 unet={"addition_time_embed_dim": 8} if pooled else None)

    first, second = load(0), load(0)
    names = remade(first, source)
    for name in names:
        w = first.unet.get_parameter(name)
        bound = 1 / math.sqrt(w.shape[1])          # nn.Linear's default init: U(-1/√fan_in, 1/√fan_in)
        assert torch.isfinite(w).all() and w.abs().amax() <= bound and w.abs().amax() > 0, name
        assert torch.equal(w, second.unet.get_parameter(name)), f"{name} is not a (seeded) initialisation"
    out = first(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 4, 48))
    assert torch.isfinite(out).all()


# --- 9. hand-off --------------------------------------------------------------------------------------------

def test_handoff_loads_the_frozen_encoder_and_adapter(tmp_path):
    stage1 = tiny_stage1(adapter="meanpool")
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage1.state_dict()}, path)
    system = tiny_decoder(init_from=str(path))
    unet_before = {k: v.clone() for k, v in system.unet.state_dict().items()}
    source = {part: getattr(stage1, part).state_dict() for part in ("encoder", "adapter")}
    assert not all(torch.equal(v, system.encoder.state_dict()[k]) for k, v in source["encoder"].items()), \
        "fresh and stage-1 encoders must differ for the hand-off to show"

    system.setup("fit")
    for part, state in source.items():
        own = getattr(system, part).state_dict()
        assert own.keys() == state.keys()
        assert all(torch.equal(own[k], v) for k, v in state.items()), part
        assert not any(p.requires_grad for p in getattr(system, part).parameters()), f"{part} stays frozen"
    report = system.handoff_report
    assert report.loaded == {"encoder": len(source["encoder"]), "adapter": len(source["adapter"])}
    assert report.fresh == ["unet"]
    assert all(torch.equal(v, system.unet.state_dict()[k]) for k, v in unet_before.items())
    system.setup("validate")
    assert system.handoff_report is report, "the hand-off runs once"


# --- 10. fit through the real CLI ---------------------------------------------------------------------------

def test_cli_fit_debug_recipe_logs_psnr_and_ssim(tmp_path, monkeypatch):
    from emu_lightning.cli import cli_main

    from emu_lightning.metrics.semantic import save_scene_classifier, train_scene_classifier
    from emu_lightning.inference.pipelines import load_system

    monkeypatch.chdir(tmp_path)
    judge = tmp_path / "judge.safetensors"   # an untrained-ish classifier: the wiring is under test, not its verdicts
    save_scene_classifier(train_scene_classifier(image_size=16, steps=2, batch_size=4), judge)
    small = lambda split: {"class_path": "emu_lightning.data.synthetic.scenes.SyntheticCaptions",  # noqa: E731
                           "init_args": {"split": split, "size": 4, "image_size": 64}}
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"max_steps": 2, "val_check_interval": 2, "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "decoder"}}},
        "model": {"init_args": {"sample_steps": 2, "semantic_classifier": str(judge), "fid_feature": "scene"}},
        "data": {"init_args": {"val": {"val": small("val"), "heldout": small("heldout")}, "batch_size": 4,
                               "eval_batch_size": 4, "num_workers": 0}},
    }))
    cli = cli_main(["fit", "--config", str(ROOT / "recipes" / "debug" / "decoder.yaml"), "--config", str(overlay)])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "val/psnr", "val/ssim", "heldout/psnr", "heldout/ssim", "val/semantic_color",
                "val/semantic_shape", "val/fid"):
        assert key in metrics and torch.isfinite(metrics[key]), (key, sorted(metrics))
    assert 0 <= metrics["val/ssim"] <= 1 and 0 <= metrics["val/semantic_color"] <= 1
    # The frozen judge and the metrics stay out of the checkpoint: it loads strictly into a fresh system.
    run = Path(cli.trainer.log_dir)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(k.split(".")[0] in {"encoder", "adapter", "unet", "ema"} for k in state), sorted(state)[:5]
    load_system(str(run))


def test_a_test_loop_starts_without_the_validation_loops_images():
    """Every evaluation loop starts empty (`PartsSystem._eval_epoch_start`): a test loop after a validation loop
    shows only its own sets in the image grid, not validation's reconstructions (the decoder used to clear its
    rows before validation only)."""
    system = make_system("pooled")
    system.on_validation_epoch_start()
    system.eval_images.setdefault("val", []).append(torch.zeros(2, 3, 4, 4))   # as `_evaluate` keeps its rows
    system.on_test_epoch_start()
    assert system.eval_images == {} and system.eval_samples == {}
