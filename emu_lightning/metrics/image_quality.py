"""Image quality of decoder outputs: FID (scene-classifier or local InceptionV3 features) and PSNR / SSIM.

FID is torchmetrics' ``FrechetInceptionDistance``. By default its feature network is our `SceneClassifier`
(trained on the synthetic scenes, no download), wrapped in `SceneFeatures`; InceptionV3 is used only from a
local weights file, never fetched. Images are (B,3,H,W) float in [0,1] everywhere (``normalize=True``).
Call ``fid.update(images, real=...)`` then ``fid.compute()``: the metric's ``forward`` would compute a
per-batch FID, which fails on a batch holding only real (or only fake) images.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance

from emu_lightning.metrics.semantic import SceneClassifier

INCEPTION_FEATURES = (64, 192, 768, 2048)


class SceneFeatures(nn.Module):
    """(B,3,H,W) in [0,1] -> (B,F) `SceneClassifier.features`, as the feature network of torchmetrics' FID.

    FID stores its feature network as a submodule; the classifier is held in a tuple here so its weights
    stay out of the parameters and ``state_dict`` of any module holding the metric (checkpoints keep only
    the FID statistics), and a parent's ``.train()`` cannot flip its BatchNorm to batch statistics. It
    follows the images' device on each call. ``num_features`` spares FID its 299 px dummy forward.

    Args:
        classifier: a trained `SceneClassifier`; frozen here.
    """

    def __init__(self, classifier: SceneClassifier) -> None:
        super().__init__()
        self._classifier = (classifier.eval().requires_grad_(False),)
        self.num_features = classifier.num_features

    def forward(self, images: Tensor) -> Tensor:
        net = self._classifier[0].to(images.device).eval()
        return net.features(images.float())


def make_fid(
    feature: str | int = "scene",
    classifier: SceneClassifier | None = None,
    weights_path: str | Path | None = None,
    reset_real_features: bool = True,
    **kwargs,
) -> FrechetInceptionDistance:
    """FID on (B,3,H,W) float images in [0,1].

    Args:
        feature: ``"scene"`` (`SceneClassifier` features), ``"inception"`` (InceptionV3 pool, 2048-d) or an
            InceptionV3 layer size in ``INCEPTION_FEATURES``.
        classifier: the trained classifier for ``"scene"`` (required there, unused otherwise).
        weights_path: local torch-fidelity InceptionV3 weights (``weights-inception-2015-12-05-6726825d.pth``),
            required for InceptionV3 features; nothing is ever downloaded. Needs ``torch-fidelity`` installed.
        reset_real_features: keep the real statistics across ``reset()`` when False (fixed reference set).
        **kwargs: forwarded to ``FrechetInceptionDistance`` / ``Metric``.
    """
    if feature == "scene":
        if classifier is None:
            raise ValueError("make_fid(feature='scene') needs a trained SceneClassifier (classifier=...)")
        return FrechetInceptionDistance(SceneFeatures(classifier), reset_real_features=reset_real_features,
                                        normalize=True, **kwargs)  # fmt: skip
    dims = 2048 if feature == "inception" else feature
    if dims not in INCEPTION_FEATURES:
        raise ValueError(f"make_fid: feature={feature!r}; expected 'scene', 'inception' or one of {INCEPTION_FEATURES}")
    if weights_path is None:
        raise ValueError(
            f"make_fid(feature={feature!r}) needs weights_path= a local InceptionV3 weights file; this project "
            "never downloads them (torch-fidelity would, without a path)"
        )
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f"InceptionV3 weights file {weights_path} does not exist")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ImportError("make_fid(feature='inception') runs torch-fidelity's InceptionV3: "
                          "pip install -e '.[fid]' (or feature='scene', which needs nothing more)")
    # torch-fidelity unpickles the file with weights_only=False: read it safely first, so a file carrying
    # pickled objects is refused here instead of executed there.
    try:
        torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"InceptionV3 weights file {weights_path} is not a plain state dict of tensors "
                         f"(refused: {type(err).__name__})") from err
    # normalize=True: FID itself turns [0,1] floats into the uint8 torch-fidelity's InceptionV3 expects.
    return FrechetInceptionDistance(dims, reset_real_features=reset_real_features, normalize=True,
                                    feature_extractor_weights_path=str(weights_path), **kwargs)  # fmt: skip


def reconstruction_metrics(**kwargs) -> MetricCollection:
    """PSNR and SSIM of reconstructions against targets, both (B,3,H,W) in [0,1]: keys ``psnr``, ``ssim``."""
    return MetricCollection({
        "psnr": PeakSignalNoiseRatio(data_range=1.0, **kwargs),
        "ssim": StructuralSimilarityIndexMeasure(data_range=1.0, **kwargs),
    })  # fmt: skip
