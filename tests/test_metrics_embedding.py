"""EmbeddingSimilarity: extremes, a hand-computed case, accumulation, reset and input errors."""

import pytest
import torch
from torch.testing import assert_close

from emu_lightning.metrics.embedding import EmbeddingSimilarity


def _scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    metric = EmbeddingSimilarity()
    metric.update(pred, target)
    return {k: v.item() for k, v in metric.compute().items()}


def test_identical_and_negated_embeddings():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))  # (n,N,D)
    assert _scores(x, x.clone()) == pytest.approx({"cos": 1.0, "mse": 0.0}, abs=1e-12)
    scores = _scores(-x, x)
    assert scores["cos"] == pytest.approx(-1.0, abs=1e-12)
    assert scores["mse"] == pytest.approx((4 * x.double() ** 2).mean().item(), rel=1e-12)  # (2x)^2


def test_hand_computed_case():
    pred = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # (1,2,2)
    target = torch.tensor([[[4.0, 3.0], [2.0, 0.0]]])
    # Token 0: (3*4 + 4*3) / (5*5) = 24/25 = 0.96; token 1: (1*2) / (1*2) = 1 -> mean 0.98.
    # Squared errors: (3-4)^2 + (4-3)^2 + (1-2)^2 + 0 = 3 over 4 elements -> 0.75.
    metric = EmbeddingSimilarity()
    metric.update(pred, target)
    out = metric.compute()
    assert set(out) == {"cos", "mse"} and out["cos"].dtype == torch.float64
    assert out["cos"].item() == pytest.approx(0.98, abs=1e-12)
    assert out["mse"].item() == pytest.approx(0.75, abs=1e-12)


def test_two_updates_equal_one_update_on_concatenation():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(7, 4, 8, generator=g), torch.randn(7, 4, 8, generator=g)
    whole = EmbeddingSimilarity()
    whole.update(pred, target)
    chunked = EmbeddingSimilarity()
    chunked.update(pred[:2], target[:2])
    chunked.update(pred[2:], target[2:])
    for key, value in whole.compute().items():
        assert_close(chunked.compute()[key], value, rtol=1e-12, atol=1e-15)
    # Chunks of unequal size: a mean of per-batch means would differ, token-weighted sums do not.
    assert_close(chunked.tokens, torch.tensor(28.0, dtype=torch.float64))
    assert_close(chunked.elements, torch.tensor(224.0, dtype=torch.float64))


@pytest.mark.filterwarnings("ignore:The ``compute`` method.*before the ``update``")
def test_reset_and_errors():
    metric = EmbeddingSimilarity()
    with pytest.raises(ValueError, match="no samples"):
        metric.compute()
    x = torch.randn(2, 3, 4)
    metric.update(-x, x)
    metric.reset()
    with pytest.raises(ValueError, match="no samples"):
        metric.compute()
    metric.update(x, x)  # after reset only the new batch counts
    assert metric.compute()["cos"].item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"pred \(2, 3, 4\) and target \(2, 3, 5\)"):
        metric.update(x, torch.randn(2, 3, 5))
