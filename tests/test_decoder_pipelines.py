"""Decoder pipelines and export on tiny random models: wiring and equality, not image quality.

- every pipeline gives (B,3,S,S) in [0,1], repeats for a seed and changes with it; blend at α=0 is the
  reconstruction; text-to-image samples from the KV-cached embeddings, equal to the full-recompute ones;
- an exported folder samples identically through a plain diffusers + torch loop written here;
- `load_system` rebuilds a real one-step CLI run without running its hand-off.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from components.adapters.meanpool import MeanPoolProjector
from components.decoder.space import LatentSpace
from components.encoders.eva import EVAEncoder
from emu_lightning.data.modules.captions import image_transform
from emu_lightning.checkpoints.decoder_export import export_decoder, load_exported_decoder
from emu_lightning.inference.pipelines import EmuImagePipeline, load_system, to_pil
from emu_lightning.systems.decoder import DecoderSystem
from emu_lightning.systems.policy import StagePolicy
from tests.helpers import IMAGE_SIZE, TINY_VAE, tiny_decoder, tiny_stage2, tiny_unet

ROOT = Path(__file__).resolve().parents[1]
S = 16  # tiny decoder output side


pytestmark = pytest.mark.usefixtures("one_thread")


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (40, 40, 3), dtype=np.uint8))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe() -> EmuImagePipeline:
    torch.manual_seed(0)
    return EmuImagePipeline(tiny_decoder(), tiny_stage2())  # both 4 pooled tokens × 64 (Emu2 layout)


CALLS = {
    "reconstruct": lambda p, **kw: p.reconstruct([_image(0), _image(1)], **kw),
    "text_to_image": lambda p, **kw: p.text_to_image(["a red circle", "two blue squares"], **kw),
    "in_context": lambda p, **kw: p.in_context([["first: ", _image(0), "second: ", _image(1), "both: "],
                                                [_image(2)]], **kw),
    "blend": lambda p, **kw: p.blend(_image(0), _image(1), alphas=(0.0, 0.5), **kw),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_pipeline_images_repeat_for_a_seed(pipe, name):
    call = CALLS[name]
    a, again, other = call(pipe, seed=0), call(pipe, seed=0), call(pipe, seed=1)
    assert a.shape == (2, 3, S, S)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, again)
    assert (a - other).abs().max() > 1e-3


def test_blend_ends_are_reconstructions(pipe):
    blend = pipe.blend(_image(0), _image(1), alphas=(0.0, 1.0), guidance=2.0, steps=3, seed=5)
    recon = torch.cat([pipe.reconstruct([im], guidance=2.0, steps=3, seed=5) for im in (_image(0), _image(1))])
    torch.testing.assert_close(blend, recon, rtol=0, atol=1e-5)


def test_reconstruct_takes_clip_normalised_tensors(pipe):
    pixels = torch.stack([image_transform(IMAGE_SIZE)(_image(i)) for i in range(2)])  # (2,3,32,32)
    torch.testing.assert_close(pipe.reconstruct(pixels, seed=2), pipe.reconstruct([_image(0), _image(1)], seed=2))
    with pytest.raises(ValueError, match=r"\(B,3,32,32\)"):
        pipe.reconstruct(torch.zeros(1, 3, 24, 24))


def test_generation_uses_the_kv_cache_and_equals_the_full_recompute(pipe, monkeypatch):
    from components.heads import autoregressive

    calls = []
    cached = autoregressive.generate_visual_cached
    monkeypatch.setattr(autoregressive, "generate_visual_cached", lambda *a: calls.append(len(a[3])) or cached(*a))
    d, g = pipe.decoder, pipe.generator
    prompts = ["a red circle", "two blue squares"]
    cond, null = pipe.prompt_conditions([[p] for p in prompts])
    assert calls == [2, 1]   # the prompts, then the empty prompt: both through the KV-cached loop
    ref = g.generate_image_embeddings([[("text", p)] for p in prompts], use_cache=False)      # (2,4,64)
    ref_null = g.generate_image_embeddings([[("text", "")]], use_cache=False)                 # (1,4,64)
    torch.testing.assert_close(cond, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(null, ref_null, rtol=1e-4, atol=1e-5)
    # The whole path: sampling from the reference embeddings against the empty prompt gives the same images,
    # and `null="decoder"` guides against the decoder's own null embedding instead.
    torch.testing.assert_close(pipe.text_to_image(prompts, seed=3), d.decode(ref, generator=_gen(3), null=ref_null),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(pipe.text_to_image(prompts, seed=3, null="decoder"),
                               d.decode(ref, generator=_gen(3)), rtol=0, atol=1e-4)
    # In-context: PIL images enter the prompt as the CLIP-normalised encoder input; default CFG 10 (docs/design.md §5).
    pixels = image_transform(IMAGE_SIZE)(_image(0))
    ref = g.generate_image_embeddings([[("text", "this: "), ("image", pixels), ("text", " again: ")]], use_cache=False)
    torch.testing.assert_close(pipe.in_context([["this: ", _image(0), " again: "]], seed=4),
                               d.decode(ref, guidance=10.0, generator=_gen(4), null=ref_null), rtol=0, atol=1e-4)


def _decoder(embed_dim: int = 64, grid: int = 2) -> DecoderSystem:
    encoder = EVAEncoder(img_size=IMAGE_SIZE, patch_size=8, depth=1, embed_dim=embed_dim, num_heads=2, drop_cls=True)
    return DecoderSystem(encoder, MeanPoolProjector(in_dim=embed_dim, out_dim=64, grid=grid),
                         tiny_unet(cond_dim=embed_dim, num_tokens=grid * grid), image_size=S,
                         policy=StagePolicy(trainable=["unet"], lr={"unet": 1e-3}))


def test_mismatched_generator_and_decoder_raise(pipe):
    with pytest.raises(ValueError, match=r"4 × 64 .* 4 × 32"):
        EmuImagePipeline(_decoder(embed_dim=32), pipe.generator)
    with pytest.raises(ValueError, match=r"4 × 64 .* 1 × 64"):
        EmuImagePipeline(_decoder(grid=1), pipe.generator)
    with pytest.raises(ValueError, match="target_space='adapter'.*condition='pooled'"):
        EmuImagePipeline(pipe.decoder, tiny_stage2(adapter="cformer"))   # Emu1 layout, also 4 × 64
    with pytest.raises(ValueError, match="needs a stage-2 generator"):
        EmuImagePipeline(pipe.decoder).text_to_image(["a red circle"])
    with pytest.raises(ValueError, match="needs a stage-2 generator"):
        EmuImagePipeline(pipe.decoder).text_to_images("a red circle", seeds=[0])


def test_to_pil():
    x = torch.rand(2, 3, 8, 8)
    ims = to_pil(x)
    assert [im.size for im in ims] == [(8, 8)] * 2
    back = torch.from_numpy(np.stack([np.asarray(im) for im in ims])).permute(0, 3, 1, 2) / 255
    assert (back - x).abs().max() <= 0.5 / 255 + 1e-6


# --- export ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def plain_diffusers_decode(folder: Path, cond: torch.Tensor, guidance: float, steps: int, seed: int) -> torch.Tensor:
    """The export's contract, sampled with diffusers and torch only (no emu_lightning, no components)."""
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    meta = json.loads((folder / "emu_condition.json").read_text())
    null = load_file(folder / "emu_condition.safetensors")["null_embedding"]                  # (1,N,D)
    norm = (lambda c: F.layer_norm(c, c.shape[-1:], eps=meta["cond_norm_eps"])) if meta["cond_norm"] else (lambda c: c)
    states_c, states_u = norm(cond), norm(null).expand_as(cond)                              # (B,N,D)
    side = unet.config.sample_size
    scheduler.set_timesteps(steps)
    x = torch.randn(len(cond), unet.config.in_channels, side, side, generator=_gen(seed)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        # diffusers' own CFG layout: one doubled batch, unconditional half first
        both = unet(torch.cat([inp, inp]), t, encoder_hidden_states=torch.cat([states_u, states_c])).sample
        eps_u, eps_c = both.chunk(2)
        x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    if meta["space"] == "latent":
        vae = AutoencoderKL.from_pretrained(folder / "vae")
        x = vae.decode(x / vae.config.scaling_factor).sample
    return ((x + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_export_round_trips_through_plain_diffusers(space, tmp_path):
    latent = LatentSpace(config=TINY_VAE) if space == "latent" else None
    system = tiny_decoder(space=latent, ema_decay=0.999).eval()
    with torch.no_grad():  # an EMA unlike the trained UNet: the export must carry the weights decode samples with
        for p in system.ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = export_decoder(system, tmp_path / "decoder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder"]                        # no temp leftovers
    meta = json.loads((folder / "emu_condition.json").read_text())
    assert (meta["space"], meta["sampler"], meta["cond_norm"], meta["ema"]) == (space, "ddim", True, True)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "vae").is_dir() == (space == "latent")

    cond = system.condition(torch.stack([image_transform(IMAGE_SIZE)(_image(i)) for i in range(2)]))
    want = system.decode(cond, guidance=3.0, steps=3, generator=_gen(7))                  # (2,3,16,16)
    torch.testing.assert_close(plain_diffusers_decode(folder, cond, 3.0, 3, 7), want, rtol=0, atol=1e-6)
    loaded = load_exported_decoder(folder)
    torch.testing.assert_close(loaded.decode(cond, guidance=3.0, steps=3, generator=_gen(7)), want, rtol=0, atol=1e-6)
    # Another sampler by name, on the exported schedule, matches the system's (and differs from the default).
    euler = system.decode(cond, guidance=3.0, steps=3, sampler="euler", generator=_gen(7))
    torch.testing.assert_close(loaded.decode(cond, guidance=3.0, steps=3, generator=_gen(7), sampler="euler"), euler,
                               rtol=0, atol=1e-6)
    assert (euler - want).abs().max() > 1e-3


def test_export_pooled_grid_decoder_and_replace(tmp_path):
    unet = tiny_unet(pooled=True, grid_channels=4, image_size=S, unet={"in_channels": 3 + 4})
    system = tiny_decoder(unet=unet).eval()
    cond = system.condition(image_transform(IMAGE_SIZE)(_image(0))[None])                   # (1,4,64)
    folder = export_decoder(system, tmp_path / "decoder")
    with pytest.raises(FileExistsError):
        export_decoder(system, folder)
    with torch.no_grad():
        system.unet.grid_proj.weight.mul_(2)   # a changed model overwrites the export in place
    export_decoder(system, folder, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder"]
    loaded = load_exported_decoder(folder)
    assert loaded.meta["pooled"] and loaded.meta["grid_channels"] == 4 and loaded.meta["image_size"] == S
    torch.testing.assert_close(loaded.decode(cond, generator=_gen(1)), system.decode(cond, generator=_gen(1)),
                               rtol=0, atol=1e-6)


# --- loading a run --------------------------------------------------------------------------------------------


def test_load_system_rebuilds_a_cli_run_without_its_handoff(tmp_path, monkeypatch):
    from emu_lightning.cli import cli_main

    monkeypatch.chdir(tmp_path)
    small = lambda split: {"class_path": "emu_lightning.data.synthetic.scenes.SyntheticCaptions",  # noqa: E731
                           "init_args": {"split": split, "size": 2, "image_size": 64}}
    overlay = {"trainer": {"max_steps": 1, "limit_val_batches": 0, "enable_progress_bar": False,
                           "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                      "init_args": {"save_dir": str(tmp_path / "runs"), "name": "dec", "version": 0}}},
               "data": {"init_args": {"train": small("train"), "val": {"val": small("val")}, "batch_size": 2,
                                      "eval_batch_size": 2, "num_workers": 0}}}
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    cli_main(["fit", "--config", str(ROOT / "recipes/debug/decoder.yaml"), "--config", str(tmp_path / "overlay.yaml")])
    run = tmp_path / "runs" / "dec" / "version_0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert "ckpt_path" in config   # the fit subcommand's keys, which `run=False` parsing does not accept
    config["model"]["init_args"]["init_from"] = str(tmp_path / "missing.ckpt")   # setup() would raise on it
    (run / "config.yaml").write_text(yaml.safe_dump(config))

    system = load_system(run)
    assert isinstance(system, DecoderSystem) and not system.training
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert system.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in system.state_dict().items())

    # A checkpoint that pickles objects is refused under weights_only=True, with the reason and the way out.
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": saved, "hyper_parameters": {"policy": StagePolicy(trainable=["unet"])}}, pickled)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_system(run, pickled)
    assert isinstance(load_system(run / "config.yaml", pickled, weights_only=False), DecoderSystem)


def test_a_sampling_head_draws_from_the_seed_and_leaves_the_global_generator_alone():
    from components.heads import AutoregressiveHead

    torch.manual_seed(0)
    head = AutoregressiveHead(64, 64, flow={"width": 16, "depth": 1, "steps": 4, "repeat": 1})
    torch.nn.init.normal_(head.flow.out.weight, std=0.5)                   # a sampler whose draws vary
    p = EmuImagePipeline(tiny_decoder(), tiny_stage2(head=head))
    state = torch.get_rng_state()
    a = p.text_to_image(["a red circle"], steps=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(p.text_to_image(["a red circle"], steps=2, seed=3), a, rtol=0, atol=0)
    c3, _ = p.prompt_conditions([["a red circle"]], seed=3)
    c4, _ = p.prompt_conditions([["a red circle"]], seed=4)
    assert not torch.allclose(c3, c4)                                       # the seed reaches the head's draws
    torch.testing.assert_close(p.text_to_images("a red circle", seeds=[5, 3], steps=2)[1:], a, rtol=0, atol=0)
