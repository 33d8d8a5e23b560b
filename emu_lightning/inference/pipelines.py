"""Image pipelines outside a Trainer (docs/design.md §4-5): plain calls on a trained decoder and stage-2 model.

- `reconstruct`: image → frozen encoder → decoder condition → image (Emu2 autoencoding);
- `text_to_image`: the stage-2 model regresses the N embeddings after `[IMG]` (KV-cached loop, docs/design.md §5),
  the decoder samples with classifier-free guidance against the embeddings of the empty prompt `""`;
  `text_to_images` draws several images of one prompt, one seed each (the benchmarks' 4 images per prompt);
- `in_context`: the same from an interleaved prompt of images and text (docs/design.md §5: CFG 10);
- `blend`: linear interpolation between two images' decoder conditions, each decoded from the same noise.

Images go in as PIL images (resized to the encoder's side here) or CLIP-normalised tensors (what
`image_transform` and the datamodules give); images come out as (B,3,S,S) tensors in [0,1].
`load_system` rebuilds a system from a LightningCLI run directory (config.yaml + checkpoint).
"""
from __future__ import annotations

import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml
from PIL import Image
from torch import Tensor

from emu_lightning.data.modules.captions import image_transform
from emu_lightning.data.real.images import to_rgb
from emu_lightning.checkpoints.decoder_export import ExportedDecoder
from emu_lightning.systems.base import PartsSystem
from emu_lightning.systems.decoder import DecoderSystem, check_pairing
from emu_lightning.systems.stage2 import Stage2System

NULLS = ("empty_prompt", "decoder")
IN_CONTEXT_GUIDANCE = 10.0   # docs/design.md §5: in-context generation samples with CFG 10 (Emu1)
# Built but never run: the pipelines need the model only. CPU, no logger, no callbacks (a GPU run's
# `accelerator: gpu` or its TensorBoard / sample callbacks must not matter here).
_INERT_TRAINER = {"accelerator": "cpu", "devices": 1, "logger": False, "callbacks": [], "enable_checkpointing": False,
                  "enable_progress_bar": False, "enable_model_summary": False}

ImageLike = Image.Image | Tensor


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B,3,H,W) in [0,1] → RGB PIL images."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def _pixels(images: Sequence[ImageLike] | Tensor, side: int) -> Tensor:
    """PIL images or CLIP-normalised tensors ((3,H,W) each, or (B,3,H,W)) → (B,3,side,side) encoder input."""
    if isinstance(images, Tensor):
        x = images[None] if images.ndim == 3 else images
    else:
        transform = image_transform(side)
        x = torch.stack([transform(to_rgb(im)) if isinstance(im, Image.Image) else im for im in images])
    if x.ndim != 4 or x.shape[1:] != (3, side, side):
        raise ValueError(f"images of shape {tuple(x.shape)}; the encoder takes (B,3,{side},{side}) CLIP-normalised "
                         f"pixels: pass PIL images (resized here) or resize first")
    return x


class EmuImagePipeline:
    """Sampling with a `DecoderSystem`, and with a `Stage2System` that regresses its conditions.

    Both systems are put in eval mode. `guidance`, `steps` and `sampler` default to the decoder's recipe values
    (`guidance_scale`, `sample_steps`, `sampler`); `seed` seeds the initial noise on the CPU, and the draws of a
    generator whose head samples its embeddings (`flow`, docs/generation_heads.md).

    Args:
        decoder: the trained visual decoder: its `DecoderSystem`, or an export folder's `ExportedDecoder`
            (`load_exported_decoder`), which has no encoder, so it serves prompt-driven generation only.
        generator: a stage-2 model whose regression targets are the decoder's condition (Emu2: pooled EVA
            tokens; Emu1: adapter outputs); None = reconstruction and blending only.
    """

    def __init__(self, decoder: DecoderSystem | ExportedDecoder, generator: Stage2System | None = None) -> None:
        self.decoder, self.generator = decoder.eval(), generator.eval() if generator is not None else None
        if generator is None:
            return
        check_pairing(generator, decoder.unet, decoder.condition_kind)

    # --- conditions -----------------------------------------------------------------------------------------

    def image_conditions(self, images: Sequence[ImageLike] | Tensor) -> Tensor:
        """Images → (B,N,D_cond) decoder conditions (frozen encoder + adapter, no LLM)."""
        d = self.decoder
        if not isinstance(d, DecoderSystem):
            raise ValueError("an exported decoder has no encoder: reconstructing or blending images needs the "
                             "decoder's training run (its checkpoint holds the frozen encoder + adapter)")
        return d.condition(_pixels(images, d.encoder.img_size).to(d.device))

    def prompt_conditions(self, docs: list[list[str | ImageLike]], null: str = "empty_prompt",
                          seed: int | None = None) -> tuple[Tensor, Tensor]:
        """Interleaved prompts → (B,N,D) regressed embeddings (KV-cached loop) and the (1,N,D) null embedding.

        `null`: `empty_prompt` (docs/design.md §4: the regressed embeddings of `""`) or `decoder` (its own null
        embedding). `seed`: the draws of a sampling head come from a generator seeded with it (the global one is
        left as it was); None draws from the global generator.
        """
        if seed is None:
            return self._prompt_conditions(docs, null)
        cuda = [self.decoder.device] if self.decoder.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            return self._prompt_conditions(docs, null)

    def _prompt_conditions(self, docs: list[list[str | ImageLike]], null: str) -> tuple[Tensor, Tensor]:
        if self.generator is None:
            raise ValueError("generating from a prompt needs a stage-2 generator: EmuImagePipeline(decoder, generator)")
        if null not in NULLS:
            raise ValueError(f"null={null!r}; expected one of {NULLS}")
        g, side = self.generator, self.generator.encoder.img_size
        segments = [[self._segment(item, side, i, j) for j, item in enumerate(doc)] for i, doc in enumerate(docs)]
        cond = g.generate_image_embeddings(segments, use_cache=True).to(self.decoder.device)    # (B,N,D)
        if null == "decoder":
            return cond, self.decoder.null_embedding(cond)
        return cond, g.generate_image_embeddings([[("text", "")]], use_cache=True).to(cond)      # (1,N,D)

    @staticmethod
    def _segment(item: str | ImageLike, side: int, doc: int, pos: int) -> tuple[str, Any]:
        if isinstance(item, str):
            return ("text", item)
        if isinstance(item, (Image.Image, Tensor)):
            return ("image", _pixels([item], side)[0])                                          # (3,side,side)
        raise TypeError(f"prompt {doc}, item {pos}: {type(item).__name__}; expected str, PIL image or tensor")

    # --- sampling -------------------------------------------------------------------------------------------

    def _decode(self, cond: Tensor, null: Tensor | None, guidance: float | None, steps: int | None,
                sampler: str | None, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return self.decoder.decode(cond, guidance, steps, generator=gen, null=null, sampler=sampler)

    def reconstruct(self, images: Sequence[ImageLike] | Tensor, guidance: float | None = None,
                    steps: int | None = None, sampler: str | None = None, seed: int = 0) -> Tensor:
        """Images → (B,3,S,S) reconstructions in [0,1], guided against the decoder's null embedding."""
        return self._decode(self.image_conditions(images), None, guidance, steps, sampler, seed)

    def text_to_image(self, prompts: list[str], guidance: float | None = None, steps: int | None = None,
                      sampler: str | None = None, seed: int = 0, null: str = "empty_prompt") -> Tensor:
        """Text prompts → (B,3,S,S) images in [0,1]."""
        cond, uncond = self.prompt_conditions([[p] for p in prompts], null, seed)
        return self._decode(cond, uncond, guidance, steps, sampler, seed)

    def text_to_images(self, prompt: str, seeds: Sequence[int], guidance: float | None = None,
                       steps: int | None = None, sampler: str | None = None, null: str = "empty_prompt") -> Tensor:
        """One prompt → (len(seeds),3,S,S) images in [0,1], image j equal to `text_to_image([prompt], seed=seeds[j])`
        (a benchmark's k images per prompt, each reproducible alone); the prompt is regressed once, or, by a head
        that samples its embeddings, drawn once per seed."""
        # a sampling head (`flow` is ProjectionHead's, not part of the VisualHead Protocol)
        if self.generator is not None and getattr(self.generator.regression_head, "flow", None) is not None:
            return torch.cat([self.text_to_image([prompt], guidance, steps, sampler, int(s), null) for s in seeds])
        cond, uncond = self.prompt_conditions([[prompt]], null)
        return torch.cat([self._decode(cond, uncond, guidance, steps, sampler, int(s)) for s in seeds])

    def in_context(self, docs: list[list[str | ImageLike]], guidance: float | None = IN_CONTEXT_GUIDANCE,
                   steps: int | None = None, sampler: str | None = None, seed: int = 0,
                   null: str = "empty_prompt") -> Tensor:
        """Interleaved prompts, e.g. `["This is the first image: ", img1, "This is the second image: ", img2,
        "The animal in the first image surrounded with the plant in the second image: "]` → (B,3,S,S) images.

        `[IMG]` is appended after each prompt. The release's blending (`{img1}{img2}[IMG]`, CFG 7.5) is
        `in_context([[img1, img2]], guidance=7.5)`.
        """
        cond, uncond = self.prompt_conditions(docs, null, seed)
        return self._decode(cond, uncond, guidance, steps, sampler, seed)

    def blend(self, image_a: ImageLike, image_b: ImageLike, alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
              guidance: float | None = None, steps: int | None = None, sampler: str | None = None,
              seed: int = 0) -> Tensor:
        """(len(alphas),3,S,S): the decoder condition (1−α)·c_a + α·c_b for each α, all from the same noise."""
        c_a, c_b = self.image_conditions([image_a, image_b]).chunk(2)                          # (1,N,D) each
        # One decode per α with a freshly seeded generator: a batch would draw different noise per row.
        return torch.cat([self._decode(torch.lerp(c_a, c_b, float(a)), None, guidance, steps, sampler, seed)
                          for a in alphas])


def load_system(run_dir_or_config: str | Path, ckpt: str | Path | None = None,
                weights_only: bool = True, tokenizer: str | None = None) -> PartsSystem:
    """Rebuild a system from a LightningCLI run's `config.yaml` and load a checkpoint's weights strictly.

    The saved config is the `fit` subcommand's (it holds `ckpt_path`, `weights_only` and the data); with
    `run=False` the CLI has no subcommand and rejects those keys, so only `model` is kept, parsed by the same
    `cli_main(..., run=False)` (every `class_path` and link as in training) next to an inert CPU trainer.
    `init_from` is cleared: its hand-off only runs in `setup()`, and the checkpoint holds every weight anyway. So
    are the other runs a training run only reads (a decoder's `generator`, a stage-2 model's `eval_decoder`,
    `eval_judge` and `decoder_loss`): the trained system needs none of them, and their relative paths may not
    resolve from here.

    Args:
        run_dir_or_config: a run directory (`config.yaml`, `checkpoints/last.ckpt`) or its config.yaml.
        ckpt: checkpoint to load; None = `<run dir>/checkpoints/last.ckpt`.
        weights_only: unpickle tensors and plain containers only. CLI-made checkpoints allow it (their
            hyper-parameters are plain dicts); pass False only for a checkpoint you trust that pickles objects.
        tokenizer: a tokenizer folder replacing the run's `model.init_args.tokenizer`; it must have as many
            tokens as the checkpoint's LLM has embedding rows (checked, with both numbers in the error).
    """
    from emu_lightning.cli import cli_main

    path = Path(run_dir_or_config)
    config_path = path / "config.yaml" if path.is_dir() else path
    ckpt = Path(ckpt) if ckpt is not None else config_path.parent / "checkpoints" / "last.ckpt"
    for p, what in ((config_path, "config"), (ckpt, "checkpoint")):
        if not p.is_file():
            raise FileNotFoundError(f"{what} not found: {p}")
    saved = yaml.safe_load(config_path.read_text())
    if "model" not in saved:
        raise ValueError(f"{config_path} has no 'model' section; top-level keys are {sorted(saved)}")
    model = saved["model"]
    cleared = {"init_from": None, "generator": None, "generated_p": 0.0, "eval_decoder": None, "eval_judge": None,
               "decoder_loss": None}
    for key, value in cleared.items():
        if key in model.get("init_args", {}):
            model["init_args"][key] = value
    if tokenizer is not None:
        model.setdefault("init_args", {})["tokenizer"] = tokenizer
    args = {"model": model, "trainer": {**_INERT_TRAINER, "callbacks": []}, "seed_everything": False}
    with mock.patch.object(sys, "argv", sys.argv[:1]):   # the CLI parses `args` only, never the caller's argv
        system = cli_main(args, run=False).model
    try:
        obj = torch.load(ckpt, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{ckpt} pickles objects other than tensors and plain containers (e.g. hyper-parameters "
                         f"saved as class instances outside LightningCLI), which weights_only=True refuses; if "
                         f"you trust the file, load it with weights_only=False") from err
    state = obj.get("state_dict", obj)
    rows = [v.shape[0] for k, v in state.items() if k.endswith("embed_tokens.weight")]
    if rows and hasattr(system, "tokenizer") and rows[0] != len(system.tokenizer):
        source = tokenizer or model.get("init_args", {}).get("tokenizer") or "the synthetic BPE (tokenizer: null)"
        raise ValueError(f"tokenizer {source} has {len(system.tokenizer)} tokens but the LLM in {ckpt} has {rows[0]} "
                         f"embedding rows: load the tokenizer the model was trained with (<run>/tokenizer)")
    system.load_state_dict(state, strict=True)
    return system.eval()
