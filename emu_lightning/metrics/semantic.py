"""Semantic accuracy of generated images: does each object show the right shape and color?

A small CNN (`SceneClassifier`) reads a synthetic scene image and predicts, for each of the 9 cells of the
3x3 grid, the object's shape and color or "empty". Trained here on freshly rendered *train*-split scenes
(never heldout), with noise / blur / brightness augmentation so it stays reliable on decoder outputs. It
scores the visual decoder (`SemanticAccuracy`) and is the feature network of our FID (`image_quality.py`).

Tensor contract: images (B,3,H,W) float in [0,1], any H=W (resized to the classifier's ``image_size``
exactly as decoder targets are: bilinear antialias); logits (B,9,7) per head, class 6 = empty.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn
from torchmetrics import Metric

from emu_lightning.data.synthetic.scenes import COLORS, POSITIONS, SHAPES, Scene, SyntheticCaptions

EMPTY = 6  # class index of an empty cell, in both heads
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_FORMAT = "emu-scene-classifier/1"
_log = logging.getLogger(__name__)


def resize(images: Tensor, size: int) -> Tensor:
    """(B,3,H,W) -> (B,3,size,size): the downsample that turns 64 px renders into decoder targets."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    conv = lambda a, b: [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]  # noqa: E731
    return nn.Sequential(*conv(c_in, c_out), *conv(c_out, c_out))


class SceneClassifier(nn.Module):
    """Per-cell shape and color classifier of synthetic scenes, factorised so unseen color-shape pairs work.

    Shape branch: conv blocks halve the side down to 8 px (2 blocks at 32 px, 3 at 64 px), a 3x3 adaptive
    max pool gives one vector per grid cell (max: a small object must not be averaged away by background).
    Color branch: a 3x3 conv then 1x1 convs classify each pixel's color, max-pooled per cell; it sees too
    little context to learn a shape, so a held-out pair (a red star) reads as red. Both branches end in
    a head shared by the 9 cells; their per-cell hidden vectors, flattened, are the features.

    Args:
        image_size: side the input is resized to; a power of two >= 16.
        width: channels of the first shape block, doubled per block up to ``4 * width``.
        hidden: per-cell hidden size of the shape head.
        color_width: channels of the per-pixel color branch (and per-cell hidden size of its head).
    """

    def __init__(self, image_size: int = 32, width: int = 16, hidden: int = 32, color_width: int = 16) -> None:
        super().__init__()
        blocks = (image_size // 8).bit_length() - 1  # halvings from image_size down to 8
        if image_size < 16 or image_size != 8 << blocks:
            raise ValueError(f"SceneClassifier: image_size={image_size} must be a power of two >= 16")
        self.image_size, self.width, self.hidden, self.color_width = image_size, width, hidden, color_width
        self.num_features = 9 * (hidden + color_width)  # read by torchmetrics' FID
        chans = [3] + [min(width << k, 4 * width) for k in range(blocks + 1)]  # capped: 64 px costs ~4x, not 5x
        layers = []
        for k in range(blocks):
            layers += [_block(chans[k], chans[k + 1]), nn.MaxPool2d(2)]
        layers.append(_block(chans[blocks], chans[blocks + 1]))  # at 8x8, no pool after
        self.shape_trunk = nn.Sequential(*layers)
        self.shape_hidden = nn.Sequential(nn.Conv2d(chans[-1], hidden, 1), nn.ReLU())
        self.shape_out = nn.Conv2d(hidden, EMPTY + 1, 1)
        self.color_pixels = nn.Sequential(
            nn.Conv2d(3, color_width, 3, padding=1), nn.ReLU(), nn.Conv2d(color_width, color_width, 1), nn.ReLU(),
            nn.Conv2d(color_width, color_width, 1),
        )  # fmt: skip
        self.color_hidden = nn.Sequential(nn.Conv2d(color_width, color_width, 1), nn.ReLU())
        self.color_out = nn.Conv2d(color_width, EMPTY + 1, 1)

    def _hidden(self, images: Tensor, shape_images: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-cell hidden maps ``(shape (B,hidden,3,3), color (B,color_width,3,3))``."""
        x = resize(images, self.image_size) - 0.5
        xs = x if shape_images is None else resize(shape_images, self.image_size) - 0.5
        shape = F.adaptive_max_pool2d(self.shape_trunk(xs), 3)  # (B,C,8,8) -> (B,C,3,3): cell vectors
        color = F.adaptive_max_pool2d(self.color_pixels(x), 3)  # (B,Cc,S,S) -> (B,Cc,3,3)
        return self.shape_hidden(shape), self.color_hidden(color)

    def features(self, images: Tensor) -> Tensor:
        """(B,3,H,W) in [0,1] -> (B, 9*(hidden+color_width)) penultimate features, cell-major."""
        shape, color = self._hidden(images)
        return torch.cat([shape, color], 1).permute(0, 2, 3, 1).flatten(1)  # (B,3,3,D) -> (B,9*D)

    def forward(self, images: Tensor, shape_images: Tensor | None = None) -> dict[str, Tensor]:
        """(B,3,H,W) in [0,1] -> {"shape": (B,9,7), "color": (B,9,7)} logits, cells row-major.

        ``shape_images`` (training only) feeds the shape branch a recolored copy of ``images``.
        """
        shape, color = self._hidden(images, shape_images)
        cells = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731  (B,7,3,3) -> (B,9,7), row-major
        return {"shape": cells(self.shape_out(shape)), "color": cells(self.color_out(color))}


def scene_targets(scenes: list[Scene]) -> tuple[Tensor, Tensor]:
    """Per-cell class indices ``(shape (B,9), color (B,9))`` long; empty cells are ``EMPTY``."""
    shape = torch.full((len(scenes), 9), EMPTY, dtype=torch.long)
    color = torch.full((len(scenes), 9), EMPTY, dtype=torch.long)
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            cell = POSITIONS.index(o.position)
            shape[b, cell], color[b, cell] = SHAPES.index(o.shape), COLOR_NAMES.index(o.color)
    return shape, color


@torch.no_grad()
def predict_cells(classifier: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Argmax classes ``(shape (B,9), color (B,9))`` of a frozen classifier on (B,3,H,W) images."""
    logits = classifier(images)
    return logits["shape"].argmax(-1), logits["color"].argmax(-1)


def render_batch(split: str, indices: range, image_size: int, seed: int = 0) -> tuple[Tensor, list[Scene]]:
    """``SyntheticCaptions`` items rendered at 64 px, resized to ``image_size``: ((B,3,S,S) in [0,1], scenes)."""
    data = SyntheticCaptions(split, size=indices[-1] + 1, image_size=64, seed=seed)
    items = [data[i] for i in indices]
    pixels = torch.from_numpy(np.stack([np.asarray(it["image"]) for it in items]))  # (B,64,64,3) uint8
    return resize(pixels.permute(0, 3, 1, 2).float() / 255, image_size), [it["scene"] for it in items]


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Decoder-like corruption of (B,3,S,S) images: per-sample blur, brightness shift, gaussian noise."""
    b = images.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    # Gaussian blur with sigma in [0.05, 0.8] px, one 5x5 kernel per sample, as a grouped conv.
    sigma = 0.05 + 0.75 * rand(b, 1)
    taps = torch.exp(-(torch.arange(-2, 3.0) ** 2) / (2 * sigma**2))  # (B,5)
    taps = taps / taps.sum(1, keepdim=True)
    kernel = (taps[:, :, None] * taps[:, None, :]).repeat_interleave(3, 0)[:, None]  # (B*3,1,5,5)
    x = F.conv2d(F.pad(images.reshape(1, b * 3, *images.shape[2:]), (2,) * 4, mode="replicate"), kernel,
                 groups=b * 3).view_as(images)  # fmt: skip
    x = x + 0.16 * (rand(b, 1, 1, 1) - 0.5)  # brightness: +-0.08
    x = x + 0.1 * rand(b, 1, 1, 1) * torch.randn(x.shape, generator=generator)  # noise std in [0, 0.1]
    return x.clamp(0, 1)


def train_scene_classifier(
    image_size: int = 32, steps: int = 1500, batch_size: int = 64, seed: int = 0, lr: float = 3e-3,
    width: int = 16, hidden: int = 32, log_every: int = 0,
) -> SceneClassifier:
    """Train a `SceneClassifier` on fresh train-split renders (each step new scenes; never heldout).

    Each batch is corrupted by `augment`; the shape branch additionally sees RGB-permuted copies, so it
    cannot use color as a shape cue. Renders use ``SyntheticCaptions(split="train", seed=seed)``.

    Args:
        image_size: classifier input side; renders are made at 64 px and downsampled to it.
        steps: optimizer steps (AdamW, one-cycle schedule).
        batch_size: scenes per step.
        seed: seed of init, scene stream and augmentation.
        lr: peak learning rate.
        width: first shape-block channels.
        hidden: per-cell hidden size of the shape head.
        log_every: if > 0, log the loss every that many steps (via ``logging``).
    """
    torch.manual_seed(seed)
    model = SceneClassifier(image_size, width, hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        images, scenes = render_batch("train", range(step * batch_size, (step + 1) * batch_size), image_size, seed)
        shape, color = scene_targets(scenes)
        images = augment(images, gen)
        # Shape must not be read from color: the shape branch sees the image with its RGB channels in a
        # random order (green star -> reddish star), so held-out pairs are not out of distribution for it.
        perms = torch.stack([torch.randperm(3, generator=gen) for _ in range(batch_size)])  # (B,3)
        recolored = torch.gather(images, 1, perms[:, :, None, None].expand_as(images))
        logits = model(images, recolored)
        loss = F.cross_entropy(logits["shape"].flatten(0, 1), shape.flatten()) + F.cross_entropy(
            logits["color"].flatten(0, 1), color.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            _log.info("scene classifier step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(),
                      time.time() - start)
    return model.eval().requires_grad_(False)


def save_scene_classifier(model: SceneClassifier, path: str | Path) -> None:
    """Write weights and config to one safetensors file, atomically (temp file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(model, k) for k in ("image_size", "width", "hidden", "color_width")}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": _FORMAT, "config": json.dumps(config)})
    os.replace(tmp, path)  # a reader never sees a half-written file


def load_scene_classifier(path: str | Path) -> SceneClassifier:
    """Load a `save_scene_classifier` file, frozen and in eval mode; a foreign file raises ``ValueError``."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        if not path.exists():
            raise FileNotFoundError(f"scene classifier file {path} does not exist") from err
        raise ValueError(f"{path} is not a safetensors file: {err}") from err
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: metadata format={meta.get('format')!r}, expected {_FORMAT!r}")
    model = SceneClassifier(**json.loads(meta["config"]))
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(f"{path}: not a SceneClassifier checkpoint; missing keys {sorted(missing)[:5]} "
                         f"({len(missing)}), unexpected keys {sorted(unexpected)[:5]} ({len(unexpected)})")
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def load_or_train_scene_classifier(path: str | Path, image_size: int = 32, steps: int = 1500) -> SceneClassifier:
    """Load ``path`` if it exists (its image size must match), else train for ``steps`` and save there."""
    path = Path(path)
    if path.exists():
        model = load_scene_classifier(path)
        if model.image_size != image_size:
            raise ValueError(f"{path}: classifier image_size={model.image_size}, requested {image_size}")
        return model
    _log.info("scene classifier %s not found: training %d steps at %d px", path, steps, image_size)
    model = train_scene_classifier(image_size, steps)
    save_scene_classifier(model, path)
    return model


class JudgedMetric(Metric):
    """Base of the metrics that read images with a frozen scene judge (`SemanticAccuracy`, `EditAccuracy`).

    The judge is kept in a tuple, so it is not a submodule: it never appears in the parameters or ``state_dict`` of
    a module holding the metric. `judge` moves it to the images' device and sets eval mode on each call. Each name
    in ``STATES`` is a float64 sum, reduced across ranks by summing.

    Args:
        classifier: frozen module mapping (B,3,H,W) in [0,1] to ``{"shape", "color"}`` logits (B,9,7).
        **kwargs: forwarded to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    STATES: tuple[str, ...] = ()

    def __init__(self, classifier: nn.Module, **kwargs) -> None:
        super().__init__(**kwargs)
        self._classifier = (classifier.eval().requires_grad_(False),)
        for name in self.STATES:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def judge(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The judge's argmax classes ``(shape (B,9), color (B,9))`` of (B,3,H,W) images in [0,1]."""
        return predict_cells(self._classifier[0].to(images.device).eval(), images.float())


class SemanticAccuracy(JudgedMetric):
    """Per-object color / shape accuracy of images of known scenes, read by a frozen `SceneClassifier`.

    ``compute()`` gives ``color``, ``shape`` and ``both`` (fractions of ground-truth objects), ``position``
    (fraction of ground-truth objects whose cell holds some object by the shape head: drawn in the right place,
    whatever its attributes) and ``empty`` (fraction of empty cells where both heads say empty). The classifier
    stays out of the parameters and ``state_dict`` of a module holding this metric (`JudgedMetric`).

    Args:
        classifier: frozen module mapping (B,3,H,W) in [0,1] to ``{"shape", "color"}`` logits (B,9,7).
        **kwargs: forwarded to ``torchmetrics.Metric``.
    """

    STATES = ("color_hits", "shape_hits", "both_hits", "position_hits", "objects", "empty_hits", "empty_cells")

    def update(self, images: Tensor, scenes: list[Scene]) -> None:
        """Accumulate (B,3,H,W) images in [0,1] against their B scenes."""
        if images.ndim != 4 or images.shape[0] != len(scenes):
            raise ValueError(f"SemanticAccuracy: images {tuple(images.shape)} vs {len(scenes)} scenes")
        pred_shape, pred_color = self.judge(images)  # (B,9) each
        shape, color = (t.to(images.device) for t in scene_targets(scenes))
        obj = shape != EMPTY  # (B,9) cells holding a ground-truth object
        shape_ok, color_ok = pred_shape == shape, pred_color == color
        self.color_hits += color_ok[obj].sum()
        self.shape_hits += shape_ok[obj].sum()
        self.both_hits += (shape_ok & color_ok)[obj].sum()
        self.position_hits += (pred_shape != EMPTY)[obj].sum()
        self.objects += obj.sum()
        self.empty_hits += ((pred_shape == EMPTY) & (pred_color == EMPTY))[~obj].sum()
        self.empty_cells += (~obj).sum()

    def compute(self) -> dict[str, Tensor]:
        """``{"color", "shape", "both", "position", "empty"}`` float32 accuracies."""
        if self.objects == 0:
            raise ValueError("SemanticAccuracy has no objects: call update() with scenes before compute()")
        out = {k: getattr(self, f"{k}_hits") / self.objects for k in ("color", "shape", "both", "position")}
        out["empty"] = self.empty_hits / self.empty_cells.clamp(min=1)
        return {k: v.float() for k, v in out.items()}
