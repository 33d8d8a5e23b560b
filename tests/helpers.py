"""Tiny real systems for tests (no mocks): 32-px EVA, 2-layer Llama, both adapters."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import torch

from components.adapters.cformer import CFormer
from components.adapters.meanpool import MeanPoolProjector
from components.encoders.eva import EVAEncoder
from components.llm.llama import LlamaLM
from emu_lightning.systems.policy import StagePolicy
from emu_lightning.systems.stage1 import Stage1System

IMAGE_SIZE = 32


def tiny_encoder() -> EVAEncoder:
    return EVAEncoder(img_size=IMAGE_SIZE, patch_size=8, depth=2, embed_dim=64, num_heads=2, drop_cls=True)


def tiny_adapter(kind: str) -> torch.nn.Module:
    if kind == "cformer":
        return CFormer(in_dim=64, out_dim=64, num_queries=4, d_model=32, num_layers=1, num_heads=2, d_ff=64)
    return MeanPoolProjector(in_dim=64, out_dim=64, grid=2)


def tiny_stage1(adapter: str = "meanpool", trainable=("encoder", "adapter", "llm"), lr: float = 1e-3,
                **kwargs) -> Stage1System:
    policy = StagePolicy(trainable=list(trainable), lr={k: lr for k in trainable})
    llm = LlamaLM(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vocab_size=128)
    return Stage1System(tiny_encoder(), tiny_adapter(adapter), llm, policy=policy, **kwargs)


def tiny_datamodule(system: Stage1System, train_size: int = 64, eval_size: int = 8, batch_size: int = 8):
    from emu_lightning.data.modules.captions import CaptionDataModule
    from emu_lightning.data.synthetic.scenes import SyntheticCaptions

    def ds(split, n):
        return SyntheticCaptions(split=split, size=n, image_size=IMAGE_SIZE)

    return CaptionDataModule(train=ds("train", train_size),
                             val={"val": ds("val", eval_size), "heldout": ds("heldout", eval_size)},
                             test={"test": ds("test", eval_size)}, image_size=IMAGE_SIZE, batch_size=batch_size,
                             eval_batch_size=eval_size, tokenizer=system.tokenizer,
                             num_image_tokens=system.num_image_tokens)


def tiny_stage2(adapter: str = "meanpool", trainable=("adapter", "llm", "regression_head"), lr: float = 1e-3,
                head=None, **kwargs):
    """Stage-2 twin of `tiny_stage1`: Emu2 layout (pooled targets) for mean-pool, Emu1 (adapter space) for C-Former."""
    from components.llm.regression_head import RegressionHead
    from emu_lightning.systems.stage2 import Stage2System

    policy = StagePolicy(trainable=list(trainable), lr={k: lr for k in trainable})
    llm = LlamaLM(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vocab_size=128)
    space = "pooled" if adapter == "meanpool" else "adapter"
    head = head if head is not None else RegressionHead(64, 64)
    return Stage2System(tiny_encoder(), tiny_adapter(adapter), llm, policy=policy, regression_head=head,
                        target_space=space, **kwargs)


def tiny_stage2_datamodule(system, batch_size: int = 6, eval_size: int = 4, **kwargs):
    from emu_lightning.data.synthetic import scenes as syn
    from emu_lightning.data.modules.multimodal import MultimodalDataModule

    def ds(cls, split, n):
        return cls(split=split, size=n, image_size=IMAGE_SIZE)

    train = {"pairs": ds(syn.SyntheticCaptions, "train", 64), "documents": ds(syn.SyntheticDocuments, "train", 32),
             "videos": ds(syn.SyntheticVideos, "train", 16), "storyboards": ds(syn.SyntheticVideos, "train", 16)}
    evals = {"captions": ds(syn.SyntheticCaptions, "val", eval_size), "vqa": ds(syn.SyntheticVQA, "val", eval_size),
             "videos": ds(syn.SyntheticVideos, "val", eval_size)}
    demos = {"captions": ds(syn.SyntheticCaptions, "train", 16), "vqa": ds(syn.SyntheticVQA, "train", 16),
             "videos": ds(syn.SyntheticVideos, "train", 8)}
    args = dict(train=train, weights={"pairs": 3, "documents": 1, "videos": 1, "storyboards": 1},
                layouts={"storyboards": "storyboard"}, val=evals, test=evals, demos=demos, image_size=IMAGE_SIZE,
                batch_size=batch_size, eval_batch_size=eval_size, max_length=160, num_frames=4,
                tokenizer=system.tokenizer, num_image_tokens=system.num_image_tokens)
    return MultimodalDataModule(**{**args, **kwargs})


# A 2-level AutoencoderKL (factor 2, 4 latent channels): 16 px images ↔ 8 px latents.
TINY_VAE = dict(block_out_channels=[8, 16], latent_channels=4, norm_num_groups=8, sample_size=16,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


def tiny_unet(cond_dim: int = 64, num_tokens: int = 4, sample_size: int = 16, in_channels: int = 3, **kwargs):
    """A 2-level diffusers UNet (~0.2 M parameters) conditioned on `num_tokens` × `cond_dim` embeddings."""
    from components.decoder.unet import VisualDecoderUNet

    unet = dict(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    unet.update(kwargs.pop("unet", {}))
    return VisualDecoderUNet(cond_dim=cond_dim, num_tokens=num_tokens, unet=unet, **kwargs)


def tiny_decoder(condition: str = "pooled", image_size: int = 16, lr: float = 1e-3, space=None, unet=None,
                 **kwargs):
    """Decoder system on the tiny mean-pool encoder: 4 pooled tokens × 64, pixel space, 16 px output."""
    from emu_lightning.systems.decoder import DecoderSystem

    policy = StagePolicy(trainable=["unet"], lr={"unet": lr})
    unet = unet if unet is not None else tiny_unet(sample_size=image_size // (space.factor if space else 1),
                                                    in_channels=space.channels if space else 3)
    return DecoderSystem(tiny_encoder(), tiny_adapter("meanpool"), unet, space=space, condition=condition,
                         image_size=image_size, policy=policy, sample_steps=2, **kwargs)


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A webdataset shard: each (key, {ext: bytes}) sample as files `<key>.<ext>`, in order."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


# Tiny run directories (config.yaml + checkpoints/last.ckpt, as a LightningCLI fit leaves them) without fitting:
# the systems are built from these configs by the CLI's own parser and saved with their random weights.
_ENCODER = {"class_path": "components.encoders.eva.EVAEncoder",
            "init_args": {"img_size": IMAGE_SIZE, "patch_size": 8, "depth": 1, "embed_dim": 64, "num_heads": 2,
                          "drop_cls": True}}
_ADAPTER = {"class_path": "components.adapters.meanpool.MeanPoolProjector",
            "init_args": {"in_dim": 64, "out_dim": 64, "grid": 2}}
_LLM = {"class_path": "components.llm.llama.LlamaLM",
        "init_args": {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128, "vocab_size": 128}}
_HEAD = {"class_path": "components.llm.regression_head.RegressionHead", "init_args": {"in_dim": 64, "out_dim": 64}}
_UNET = {"class_path": "components.decoder.unet.VisualDecoderUNet",
         "init_args": {"cond_dim": 64, "num_tokens": 4, "unet": {
             "sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32],
             "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 8,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}}}
TINY_RUNS = {
    "stage1": {"class_path": "emu_lightning.systems.stage1.Stage1System",
               "init_args": {"encoder": _ENCODER, "adapter": _ADAPTER, "llm": _LLM, "num_beams": 1,
                             "policy": {"trainable": ["adapter", "llm"], "lr": {"adapter": 1e-3, "llm": 1e-3}}}},
    "stage2": {"class_path": "emu_lightning.systems.stage2.Stage2System",
               "init_args": {"encoder": _ENCODER, "adapter": _ADAPTER, "llm": _LLM, "regression_head": _HEAD,
                             "target_space": "pooled", "shots": [0],
                             "policy": {"trainable": ["adapter", "llm"], "lr": {"adapter": 1e-3, "llm": 1e-3}}}},
    "chat": {"class_path": "emu_lightning.systems.instruct.ChatSystem",
             "init_args": {"encoder": _ENCODER, "adapter": _ADAPTER, "llm": _LLM, "regression_head": _HEAD,
                           "target_space": "pooled", "template": "emu1",
                           "policy": {"trainable": ["llm"], "lr": {"llm": 1e-3}}}},
    "decoder": {"class_path": "emu_lightning.systems.decoder.DecoderSystem",
                "init_args": {"encoder": _ENCODER, "adapter": _ADAPTER, "unet": _UNET, "condition": "pooled",
                              "image_size": 16, "sample_steps": 2, "guidance_scale": 2.0, "fid_feature": None,
                              "policy": {"trainable": ["unet"], "lr": {"unet": 1e-3}}}},
}


def tiny_run(folder: Path, kind: str, seed: int = 0) -> Path:
    """`folder` as the run directory of an untrained `TINY_RUNS[kind]` system (random weights from `seed`)."""
    import sys
    from unittest import mock

    import yaml

    from emu_lightning.cli import cli_main

    model = TINY_RUNS[kind]
    trainer = {"accelerator": "cpu", "devices": 1, "logger": False, "callbacks": [], "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False}
    torch.manual_seed(seed)
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        system = cli_main({"model": model, "trainer": trainer, "seed_everything": False}, run=False).model
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    torch.save({"state_dict": system.state_dict()}, folder / "checkpoints" / "last.ckpt")
    return folder


def load_class(class_path: str) -> type:
    """The class a recipe's `class_path` names."""
    import importlib

    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def build_fragment(fragment: Path) -> torch.nn.Module:
    """A component from a recipe fragment (`class_path` + `init_args`), as the CLI builds it."""
    import yaml

    spec = yaml.safe_load(Path(fragment).read_text())
    return load_class(spec["class_path"])(**spec.get("init_args", {}))


def debug_system(recipe: str = "stage1_meanpool"):
    """The system `recipes/debug/<recipe>.yaml` builds (same class, parts, keys and shapes), made from the recipe's
    model section and component fragments directly instead of through the CLI's parser (seconds less per test).
    The optimizer is left at the system's default (it holds no state); plain values and the policy are the recipe's."""
    import yaml

    path = Path(__file__).resolve().parents[1] / "recipes" / "debug" / f"{recipe}.yaml"
    model = yaml.safe_load(path.read_text())["model"]
    kwargs = {}
    for key, value in model["init_args"].items():
        if key == "optimizer":
            continue
        if key == "policy":
            kwargs[key] = StagePolicy(**value)
        elif isinstance(value, str) and value.endswith(".yaml"):
            kwargs[key] = build_fragment(path.parent / value)
        else:
            kwargs[key] = value
    return load_class(model["class_path"])(**kwargs)
