"""Multimodal seam: write adapter outputs into the LLM input embeddings at `<image>` positions.

Follows the Emu release (docs/design.md §1, "Injecting images"): the rows of the text embedding where
`input_ids == image_token_id` are overwritten, in reading order, by the visual tokens of each image.
Mismatches raise with counts instead of silently truncating or padding (our choice, docs/design.md §1).

`image_token_id` may also be several ids: the Emu2 release feeds video frames at `[gIMG]` rows and images at
`<image>` rows (baaivision/Emu 13c395e,
`Emu2/emu/emu.py` L62-65), so a model reading that layout takes both as placeholders. Every run of
either, in reading order, is one image of `visual`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def placeholder_mask(input_ids: Tensor, image_token_id: int | Sequence[int]) -> Tensor:
    """(B,T) True where `input_ids` is the placeholder id, or any of the placeholder ids."""
    if isinstance(image_token_id, int):
        return input_ids == image_token_id
    return torch.isin(input_ids, torch.as_tensor(list(image_token_id), dtype=input_ids.dtype, device=input_ids.device))


def count_image_runs(input_ids: Tensor, image_token_id: int | Sequence[int]) -> int:
    """Number of contiguous `<image>` blocks over the batch (a run never spans two rows)."""
    is_img = placeholder_mask(input_ids, image_token_id)          # (B,T)
    starts = is_img.clone()
    starts[:, 1:] &= ~is_img[:, :-1]                               # True at the first token of each run
    return int(starts.sum())


def image_run_index(input_ids: Tensor, image_token_id: int | Sequence[int]) -> Tensor:
    """(B,T) index of the image each `<image>` position belongs to, counted row-major over the batch; -1 elsewhere.

    This is the order in which `scatter_visual` consumes images, so it maps positions to `visual` rows.
    """
    is_img = placeholder_mask(input_ids, image_token_id)          # (B,T)
    starts = is_img.clone()
    starts[:, 1:] &= ~is_img[:, :-1]
    run = starts.flatten().cumsum(0).view_as(input_ids) - 1       # (B,T) running count of runs, row-major
    return run.masked_fill(~is_img, -1)


def scatter_visual(embeds: Tensor, input_ids: Tensor, visual: Tensor, image_token_id: int | Sequence[int]) -> Tensor:
    """Return `embeds` with `<image>` rows replaced by `visual`, image by image, token by token.

    Args:
        embeds: (B,T,D) text embeddings.
        input_ids: (B,T) ids; positions equal to `image_token_id` receive visual tokens.
        visual: (n_images,N,D) adapter outputs, in the order the runs appear (row-major over B,T).
        image_token_id: id of the `<image>` placeholder, or several ids (`<image>` and the release's `[gIMG]`
            video-frame placeholder): a position holding any of them receives visual tokens.

    Raises:
        ValueError: if the `<image>` position count != n_images*N, or the run count != n_images.
    """
    if visual.dim() != 3 or visual.shape[-1] != embeds.shape[-1]:
        raise ValueError(f"visual must be (n_images,N,{embeds.shape[-1]}), got {tuple(visual.shape)}")
    n_images, n_tokens, _ = visual.shape
    mask = placeholder_mask(input_ids, image_token_id)             # (B,T)
    n_positions = int(mask.sum())
    if n_positions != n_images * n_tokens:
        raise ValueError(f"{n_positions} <image> positions in batch but {n_images} images × "
                         f"{n_tokens} tokens = {n_images * n_tokens} visual tokens given")
    n_runs = count_image_runs(input_ids, image_token_id)
    if n_runs != n_images:
        raise ValueError(f"{n_runs} <image> runs in batch but {n_images} images given")
    # masked_scatter fills True positions in row-major order from the flattened source, out of place,
    # so gradients reach both `embeds` (unmasked rows) and `visual`.
    source = visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)  # (n_images*N,D)
    return embeds.masked_scatter(mask.unsqueeze(-1), source)       # (B,T,D)
