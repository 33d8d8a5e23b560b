"""benchmarks/decoder_learning.py's per-cell probe (also read by benchmarks/text_to_image.py --probe): it learns
labels its features carry, stays near chance on features that carry none, and scores object cells only."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))   # the scripts import each other

from benchmarks.decoder_learning import cell_probe, object_accuracy  # noqa: E402
from emu_lightning.metrics.semantic import EMPTY  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def labels(n: int, seed: int) -> torch.Tensor:
    """(n,9) cell labels: about half the cells empty, the rest one of 6 classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 6, (n, 9), generator=g)
    return torch.where(torch.rand(n, 9, generator=g) < 0.5, torch.full_like(y, EMPTY), y)


def test_probe_reads_labels_its_features_carry_and_not_others():
    ytr, yte = labels(512, 0), labels(256, 1)
    onehot = lambda y: torch.nn.functional.one_hot(y, 7).flatten(1).float() * 3 + 0.1 * torch.randn(len(y), 63)
    assert object_accuracy(cell_probe(onehot(ytr), ytr)(onehot(yte)), yte) > 0.9
    noise = lambda n: torch.randn(n, 63)
    chance = object_accuracy(cell_probe(noise(512), ytr)(noise(256)), yte)
    assert chance < 0.35   # 6 object classes (+ empty): about 1/6 to 1/4 by the label frequencies


def test_object_accuracy_ignores_empty_cells():
    y = torch.tensor([[0, EMPTY, 2, EMPTY, EMPTY, EMPTY, EMPTY, EMPTY, 5]])
    pred = torch.tensor([[0, 1, 3, 4, 4, 4, 4, 4, 5]])   # empty cells all wrong; objects 2 of 3 right
    assert object_accuracy(pred, y) == pytest.approx(2 / 3)


@pytest.mark.parametrize("flag", [["--flow-steps", "0"], ["--flow-temperature", "0"]])
def test_text_to_image_refuses_flow_overrides_out_of_range(flag, monkeypatch, capsys):
    """text_to_image.py sets the sampler's attributes directly, so it checks FlowSampler's ranges itself."""
    from benchmarks import text_to_image

    monkeypatch.setattr(sys, "argv", ["text_to_image.py", "--arm", "a", "--stage2", "s", "--decoder", "d", *flag])
    with pytest.raises(SystemExit) as e:
        text_to_image.main()
    assert e.value.code == 2 and flag[0] in capsys.readouterr().err
