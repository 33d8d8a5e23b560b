"""scatter_visual: `<image>` rows replaced in order, everything else untouched, loud count errors."""
from __future__ import annotations

import pytest
import torch

from components.multimodal import count_image_runs, image_run_index, scatter_visual

IMG = 9


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0: two images of 2 tokens; row 1: one image; padding and text around them."""
    ids = torch.tensor([[1, IMG, IMG, 2, IMG, IMG, 3],
                        [0, 0, 4, IMG, IMG, 5, 6]])
    torch.manual_seed(0)
    embeds = torch.randn(2, 7, 4, requires_grad=True)
    visual = torch.randn(3, 2, 4, requires_grad=True)
    return ids, embeds, visual


def test_rows_land_in_order_and_others_are_untouched() -> None:
    ids, embeds, visual = batch()
    out = scatter_visual(embeds, ids, visual, IMG)
    assert out.shape == embeds.shape
    torch.testing.assert_close(out[0, 1:3], visual[0])
    torch.testing.assert_close(out[0, 4:6], visual[1])
    torch.testing.assert_close(out[1, 3:5], visual[2])
    text = ids != IMG
    torch.testing.assert_close(out[text], embeds[text])
    assert count_image_runs(ids, IMG) == 3


def test_gradient_flows_to_visual_and_text_embeddings() -> None:
    ids, embeds, visual = batch()
    out = scatter_visual(embeds, ids, visual, IMG)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    torch.testing.assert_close(visual.grad, weights[ids == IMG].reshape(3, 2, 4))
    text = (ids != IMG).unsqueeze(-1).float()
    torch.testing.assert_close(embeds.grad, weights * text)  # overwritten rows get no gradient


def test_position_count_mismatch_raises_with_counts() -> None:
    ids, embeds, visual = batch()
    with pytest.raises(ValueError, match=r"6 <image> positions .* 2 images × 2 tokens = 4"):
        scatter_visual(embeds, ids, visual[:2], IMG)


def test_run_count_mismatch_raises_with_counts() -> None:
    ids, embeds, _ = batch()
    visual = torch.randn(2, 3, 4)  # 6 tokens as 2 images of 3, but the batch has 3 runs of 2
    with pytest.raises(ValueError, match="3 <image> runs in batch but 2 images given"):
        scatter_visual(embeds, ids, visual, IMG)


def test_adjacent_rows_are_separate_runs() -> None:
    ids = torch.tensor([[1, IMG], [IMG, 2]])  # run ends row 0, another starts row 1: two images
    assert count_image_runs(ids, IMG) == 2
    out = scatter_visual(torch.zeros(2, 2, 3), ids, torch.ones(2, 1, 3), IMG)
    assert out[0, 1].eq(1).all() and out[1, 0].eq(1).all() and out[0, 0].eq(0).all()


def test_no_images_is_identity() -> None:
    ids, embeds, _ = batch()
    ids = torch.where(ids == IMG, torch.ones_like(ids), ids)
    out = scatter_visual(embeds, ids, torch.zeros(0, 2, 4), IMG)
    torch.testing.assert_close(out, embeds)


def test_several_placeholder_ids_fill_their_runs_in_reading_order() -> None:
    """The Emu2 release's video frames sit at `[gIMG]` and its images at `<image>` (baaivision/Emu 13c395e,
    `Emu2/emu/emu.py` L62-65): given both ids, each run of either is one image, in reading order."""
    FRAME = 8
    ids = torch.tensor([[1, FRAME, FRAME, 2, FRAME, FRAME, 3, IMG, IMG],
                        [IMG, IMG, 4, 5, 6, 0, 0, 0, 0]])
    embeds = torch.zeros(2, 9, 2)
    visual = torch.arange(1.0, 17.0).view(4, 2, 2)                 # frame 0, frame 1, image, image
    expected = torch.zeros(2, 9, 2)
    expected[0, 1:3], expected[0, 4:6], expected[0, 7:9], expected[1, 0:2] = visual
    torch.testing.assert_close(scatter_visual(embeds, ids, visual, (IMG, FRAME)), expected, rtol=0, atol=0)
    assert count_image_runs(ids, (IMG, FRAME)) == 4 and count_image_runs(ids, IMG) == 2
    assert image_run_index(ids, [IMG, FRAME]).tolist() == [[-1, 0, 0, -1, 1, 1, -1, 2, 2],
                                                           [3, 3, -1, -1, -1, -1, -1, -1, -1]]
    with pytest.raises(ValueError, match="4 <image> positions in batch but 4 images × 2 tokens = 8"):
        scatter_visual(embeds, ids, visual, IMG)                    # `<image>` alone leaves the frames out
