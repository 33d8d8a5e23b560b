"""One way to turn any image file into the RGB image the encoder reads, for every loader and for inference.

`Image.convert("RGB")` alone is silently wrong for several common encodings:
- 16-bit grayscale (`I;16`, or `I` from a 16-bit PNG) is clipped at 255, so almost the whole image turns white;
- transparency is dropped, so transparent pixels show whatever colour they happen to store (often black);
- EXIF orientation is ignored, so phone photos come out sideways.

`to_rgb` handles each mode explicitly:

| mode | rule |
|---|---|
| `1`, `L`, `P`, `RGB`, `CMYK`, `YCbCr`, `LAB`, `HSV` | PIL's conversion (`P` with transparency goes through RGBA) |
| `LA`, `PA`, `RGBA`, `RGBa`, `La` | composited over a solid background (`background`, white by default) |
| `I;16`, `I;16B`, `I;16L`, `I;16N` | 16-bit: scaled by 255 / 65535 |
| `I` (32-bit integer) | by 255 / 65535 when all values fit 16 bits (PIL opens 16-bit PNGs so), else by 255 / max |
| `F` (32-bit float) | values in [0, 1] scaled by 255, otherwise clipped to [0, 255] |

EXIF orientation is applied first. Aspect ratio is not changed here: the encoder transform
(`image_transform`, docs/design.md §1) resizes every image to a square, so a very wide or tall image is squeezed,
as the papers' preprocessing does; crop beforehand if that matters for your data.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)
UNDECODABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)   # what PIL raises on a bad file
ALPHA_MODES = {"LA", "PA", "RGBA", "RGBa", "La"}


def to_rgb(image: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """`image` as 8-bit RGB by the rules of the module docstring."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            values = values * 255.0 if values.size and values.min() >= 0 and values.max() <= 1 else values
        elif mode.startswith("I;16") or (values.size and values.min() >= 0 and values.max() <= 65535):
            values = values * (255.0 / 65535.0)
        else:
            values = values * (255.0 / max(float(values.max()), 1.0))
        gray = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    return image.convert("RGB")


def open_rgb(path, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """The image file at `path` (a path or a binary file object) as RGB; PIL's errors pass through."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(im, background)


def check_image_files(paths: list, listed_in: str, decode_sample: int = 16, show: int = 10) -> list[str]:
    """Start-up check of a source's (existing) image files, before any training: each must be non-empty, and an
    evenly spread sample of `decode_sample` must have a header PIL can read; full decoding stays lazy. The bad
    ones are listed in one warning now, so nobody learns of them hours in. Reading one later raises `BadImage`
    naming it, which training skips and counts (`train/skipped/bad_image`) up to the data's `max_bad_fraction`.
    Returns them."""
    empty = {p for p in paths if os.stat(p).st_size == 0}
    bad = [f"empty (0 bytes): {p}" for p in paths if p in empty]
    step = max(1, len(paths) // max(1, decode_sample))
    for path in list(paths)[::step][:decode_sample]:
        if path in empty:
            continue
        try:
            with Image.open(path) as im:
                im.size                                           # the header only
        except UNDECODABLE as err:
            bad.append(f"does not decode ({type(err).__name__}): {path}")
    if bad:
        sampled = min(decode_sample, len(paths))
        warnings.warn(f"{len(bad)} bad image file(s) listed in {listed_in} (every file checked for size, {sampled} "
                      f"sampled for a readable header); training skips and counts each (train/skipped/bad_image):"
                      f"\n  "
                      + "\n  ".join(bad[:show]) + (f"\n  ... and {len(bad) - show} more" if len(bad) > show else ""),
                      stacklevel=2)
    return bad
