"""Image metrics of the visual decoder: scene targets, semantic accuracy, classifier I/O, FID, PSNR / SSIM.
InceptionV3 FID from a local file is slow: `.venv/bin/python -m pytest -q -m slow tests/test_metrics_image.py`.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from emu_lightning.data.synthetic.scenes import Obj, Scene
from emu_lightning.metrics.image_quality import make_fid, reconstruction_metrics
from emu_lightning.metrics.semantic import (
    EMPTY,
    SceneClassifier,
    SemanticAccuracy,
    load_or_train_scene_classifier,
    load_scene_classifier,
    render_batch,
    save_scene_classifier,
    scene_targets,
    train_scene_classifier,
)

SCENE = Scene((Obj("star", "red", "small", "top left"), Obj("cross", "blue", "large", "center")), "dark")


@pytest.fixture(scope="module")
def classifier() -> SceneClassifier:
    torch.set_num_threads(1)
    return train_scene_classifier(image_size=16, steps=20, batch_size=16, width=8, hidden=8)  # ~1 s


@pytest.fixture(scope="module")
def val_images() -> tuple[torch.Tensor, list[Scene]]:
    return render_batch("val", range(48), image_size=32)


def test_scene_targets_place_objects_row_major():
    shape, color = scene_targets([SCENE])
    expect_shape = torch.full((1, 9), EMPTY)
    expect_color = torch.full((1, 9), EMPTY)
    expect_shape[0, 0], expect_color[0, 0] = 4, 0  # star, red at top left (cell 0)
    expect_shape[0, 4], expect_color[0, 4] = 5, 2  # cross, blue at center (cell 4)
    assert torch.equal(shape, expect_shape) and torch.equal(color, expect_color)
    assert shape.dtype == color.dtype == torch.long


class FixedLogits(nn.Module):
    """Stub classifier: the same controlled logits for every image."""

    def __init__(self, shape: list[int], color: list[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # a real parameter, to check it stays out of the holder
        self.shape = nn.functional.one_hot(torch.tensor(shape), EMPTY + 1).float()  # (9,7)
        self.color = nn.functional.one_hot(torch.tensor(color), EMPTY + 1).float()

    def forward(self, images):
        b = images.shape[0]
        return {"shape": self.shape.expand(b, 9, 7), "color": self.color.expand(b, 9, 7)}


def test_semantic_accuracy_exact_counts():
    # Scene: red star (cell 0), blue cross (cell 4). Predicted: cell 0 right shape but green, cell 4 right
    # color but a circle, cell 8 (empty) holds a phantom object, the other 6 empty cells are empty.
    shape = [4, 6, 6, 6, 0, 6, 6, 6, 1]
    color = [1, 6, 6, 6, 2, 6, 6, 6, 3]
    metric = SemanticAccuracy(FixedLogits(shape, color))
    metric.update(torch.rand(1, 3, 32, 32), [SCENE])
    out = metric.compute()
    assert out["color"].item() == pytest.approx(1 / 2) and out["shape"].item() == pytest.approx(1 / 2)
    assert out["both"].item() == 0.0 and out["empty"].item() == pytest.approx(6 / 7)
    assert out["position"].item() == 1.0                      # both objects drawn in their cells
    missing = SemanticAccuracy(FixedLogits([4, 6, 6, 6, 6, 6, 6, 6, 6], color))   # cell 4 left empty
    missing.update(torch.rand(1, 3, 32, 32), [SCENE])
    assert missing.compute()["position"].item() == pytest.approx(1 / 2)
    # A perfect prediction of a second batch: sums accumulate over updates.
    perfect = SemanticAccuracy(FixedLogits([4, 6, 6, 6, 5, 6, 6, 6, 6], [0, 6, 6, 6, 2, 6, 6, 6, 6]))
    perfect.update(torch.rand(2, 3, 32, 32), [SCENE, SCENE])
    assert all(v.item() == 1.0 for v in perfect.compute().values())


def test_semantic_accuracy_keeps_classifier_out_of_parameters():
    holder = nn.Module()
    holder.metric = SemanticAccuracy(FixedLogits([6] * 9, [6] * 9))
    assert list(holder.parameters()) == [] and not any("weight" in k for k in holder.state_dict())
    with pytest.raises(ValueError, match="3 scenes"):
        holder.metric.update(torch.rand(2, 3, 32, 32), [SCENE] * 3)


def test_classifier_shapes_any_input_size(classifier):
    for side in (16, 32, 64):
        out = classifier(torch.rand(2, 3, side, side))
        assert out["shape"].shape == out["color"].shape == (2, 9, EMPTY + 1)
    assert classifier.features(torch.rand(2, 3, 32, 32)).shape == (2, classifier.num_features)
    with pytest.raises(ValueError, match="power of two"):
        SceneClassifier(image_size=48)


def test_save_load_round_trip(classifier, tmp_path):
    path = tmp_path / "sub" / "clf.safetensors"
    save_scene_classifier(classifier, path)
    loaded = load_scene_classifier(path)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(loaded(x)["shape"], classifier(x)["shape"])
    assert torch.equal(loaded.features(x), classifier.features(x))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert list(path.parent.iterdir()) == [path]  # the temp file was renamed away
    assert load_or_train_scene_classifier(path, image_size=16, steps=1).width == classifier.width  # loads
    with pytest.raises(ValueError, match="image_size=16, requested 32"):
        load_or_train_scene_classifier(path, image_size=32)


def test_bad_classifier_files_name_the_file(tmp_path):
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"other.weight": torch.zeros(2)}, str(wrong), metadata={
        "format": "emu-scene-classifier/1", "config": '{"image_size": 16, "width": 8, "hidden": 8}'})
    with pytest.raises(ValueError, match=r"wrong\.safetensors.*missing keys"):
        load_scene_classifier(wrong)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"garbage\.safetensors"):
        load_scene_classifier(garbage)
    with pytest.raises(FileNotFoundError, match="absent"):
        load_scene_classifier(tmp_path / "absent.safetensors")


def test_fid_scene_features(classifier, val_images):
    images, _ = val_images
    other, _ = render_batch("val", range(48, 96), image_size=32)

    def fid_of(fake):
        fid = make_fid(classifier=classifier)
        fid.update(images, real=True)
        fid.update(fake, real=False)
        return fid.compute().item()

    same, brighter, different = fid_of(images), fid_of((images + 0.3).clamp(0, 1)), fid_of(other)
    assert abs(same) < 1e-4  # eigvals of the product of two equal rank-deficient covariances: ~1e-9 noise
    assert brighter > 100 * max(abs(same), 1e-6) and brighter > 0.1
    assert 0 < different < brighter  # other scenes of the same split: close, not equal
    holder = nn.Module()
    holder.fid = make_fid(classifier=classifier)
    assert list(holder.parameters()) == []  # the classifier is not a submodule of the metric


def test_fid_inception_never_downloads(tmp_path):
    with pytest.raises(ValueError, match="weights_path"):
        make_fid("inception")
    with pytest.raises(ValueError, match="weights_path"):
        make_fid(2048)
    missing = tmp_path / "inception.pth"
    with pytest.raises(FileNotFoundError, match="inception.pth"):
        make_fid("inception", weights_path=missing)
    with pytest.raises(ValueError, match="expected 'scene'"):
        make_fid(100, weights_path=missing)
    with pytest.raises(ValueError, match="classifier"):
        make_fid("scene")


def random_inception_weights(path, monkeypatch):
    """torch-fidelity's InceptionV3 with random weights saved as a local file, with every download blocked."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download InceptionV3 weights")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)
    with monkeypatch.context() as m:  # build once without loading anything, to get the architecture's keys
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        m.setattr(torch, "load", lambda *a, **k: {})
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="x")
    torch.save(net.state_dict(), path)


@pytest.mark.slow
def test_fid_inception_from_a_local_file(tmp_path, monkeypatch, val_images):
    # The Inception path, end to end with a local file (random weights: the numbers mean nothing, the wiring does).
    weights = tmp_path / "pt_inception.pth"
    random_inception_weights(weights, monkeypatch)
    images, _ = val_images
    images = images[:4]

    def fid_of(fake):
        fid = make_fid("inception", weights_path=weights)
        fid.update(images, real=True)
        fid.update(fake, real=False)
        return fid.compute().item()

    # Random InceptionV3 features are tiny, so FIDs are too: compare the shifted set with the identical one.
    same, shifted = fid_of(images), fid_of((images + 0.3).clamp(0, 1))
    assert abs(same) < 1e-9 and shifted > 1e3 * max(abs(same), 1e-18)
    crafted = tmp_path / "crafted.pth"
    torch.save({"weights": nn.Linear(2, 2)}, crafted)  # a pickled module, not a state dict of tensors
    with pytest.raises(ValueError, match="crafted.pth is not a plain state dict"):
        make_fid("inception", weights_path=crafted)


def test_psnr_ssim(val_images):
    images, _ = val_images
    metrics = reconstruction_metrics()
    out = metrics(images, images)
    assert out["psnr"].item() > 100 or torch.isinf(out["psnr"])
    assert out["ssim"].item() == pytest.approx(1.0, abs=1e-6)
    noisy = (images + 0.1 * torch.randn_like(images)).clamp(0, 1)
    metrics.reset()
    out = metrics(noisy, images)
    assert 15 < out["psnr"].item() < 25 and out["ssim"].item() < 0.9
