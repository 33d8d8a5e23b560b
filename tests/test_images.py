"""Every image encoding reaches the encoder as the picture it shows (`emu_lightning/data/real/images.py`):
files written in each PIL mode, read back through the one decoding path the loaders and `infer` share."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from emu_lightning.data.real.images import open_rgb


def _saved(image: Image.Image, tmp_path, name: str, **kw) -> str:
    path = tmp_path / name
    image.save(path, **kw)
    return str(path)


def _px(image: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 30000, dtype=np.uint16)
    arr[0, 0] = 65535
    path = _saved(Image.fromarray(arr), tmp_path, "gray16.png")
    with Image.open(path) as im:
        assert im.mode.startswith("I")                          # PIL opens it as I;16 / I
        assert im.convert("RGB").getpixel((1, 1)) == (255, 255, 255)   # what plain convert did: white
    rgb = open_rgb(path)
    assert _px(rgb, (1, 1)) == (117, 117, 117) and _px(rgb, (0, 0)) == (255, 255, 255)   # 30000 * 255 / 65535


def test_32_bit_integer_and_float_tiffs(tmp_path):
    big = np.full((4, 4), 1 << 20, dtype=np.int32)
    big[0, 0] = 1 << 19
    assert _px(open_rgb(_saved(Image.fromarray(big, mode="I"), tmp_path, "i32.tif")), (0, 0)) == (128, 128, 128)
    unit = np.full((4, 4), 0.5, dtype=np.float32)
    assert _px(open_rgb(_saved(Image.fromarray(unit, mode="F"), tmp_path, "f32.tif"))) == (128, 128, 128)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)                   # fully transparent black...
    rgba[0, 0] = (255, 0, 0, 128)                               # ...and one half-transparent red pixel
    rgb = open_rgb(_saved(Image.fromarray(rgba, mode="RGBA"), tmp_path, "rgba.png"))
    assert _px(rgb, (1, 1)) == (255, 255, 255)
    assert _px(rgb, (0, 0)) == (255, 127, 127)
    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[..., 0], la[0, 0, 1] = 40, 255                           # dark gray, opaque only at (0, 0)
    rgb = open_rgb(_saved(Image.fromarray(la, mode="LA"), tmp_path, "la.png"))
    assert _px(rgb, (0, 0)) == (40, 40, 40) and _px(rgb, (2, 2)) == (255, 255, 255)


def test_palette_with_a_transparent_index(tmp_path):
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)              # index 0 black, index 1 blue
    p.putpixel((0, 0), 1)
    path = _saved(p, tmp_path, "palette.png", transparency=0)    # index 0 transparent
    rgb = open_rgb(path)
    assert _px(rgb, (0, 0)) == (0, 0, 255) and _px(rgb, (3, 3)) == (255, 255, 255)


def test_bilevel_and_cmyk(tmp_path):
    one = Image.new("1", (4, 4), 0)
    one.putpixel((0, 0), 1)
    rgb = open_rgb(_saved(one, tmp_path, "one.png"))
    assert _px(rgb, (0, 0)) == (255, 255, 255) and _px(rgb, (1, 1)) == (0, 0, 0)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))           # red in CMYK
    r, g, b = _px(open_rgb(_saved(cmyk, tmp_path, "cmyk.jpg", quality=95)), (8, 8))
    assert r > 230 and g < 30 and b < 30


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))                     # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6                                             # rotate 90° clockwise to display
    rgb = open_rgb(_saved(image, tmp_path, "rotated.jpg", exif=exif, quality=95))
    assert rgb.size == (20, 40)
    r, g, b = _px(rgb, (10, 5))                                  # the blue half is now on top
    assert b > 200 and r < 60


def test_loaders_and_infer_share_the_path(tmp_path):
    from emu_lightning.data.real.captions import CocoCaptions
    from emu_lightning.inference.infer import read_image

    arr = np.full((8, 8), 30000, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "gray16.png")
    (tmp_path / "captions.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "gray16.png"}], "annotations": [{"image_id": 1, "caption": "gray."}]}))
    sample = CocoCaptions(str(tmp_path / "captions.json"), str(tmp_path))[0]
    assert _px(sample["image"]) == (117, 117, 117)
    assert _px(read_image(tmp_path / "gray16.png")) == (117, 117, 117)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    assert _px(open_rgb(io.BytesIO(buf.getvalue()))) == (117, 117, 117)     # tar shards read from bytes


@pytest.mark.parametrize("mode", ["L", "RGB", "YCbCr"])
def test_plain_modes_are_unchanged(tmp_path, mode):
    image = Image.new("RGB", (4, 4), (10, 200, 30)).convert(mode)
    assert open_rgb(_saved(image, tmp_path, f"{mode}.tif")).tobytes() == image.convert("RGB").tobytes()


def test_empty_and_undecodable_files_are_listed_at_startup(tmp_path):
    """A zero-byte or non-image file is named before training (one warning listing them), not hours in."""
    from emu_lightning.data.real.captions import BadImage, CocoCaptions

    Image.new("RGB", (4, 4)).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "captions.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": n} for i, n in enumerate(["good.png", "empty.png", "text.png"])],
        "annotations": [{"image_id": i, "caption": "x."} for i in range(3)]}))
    with pytest.warns(UserWarning, match=r"2 bad image file\(s\) listed in .*captions\.json") as record:
        ds = CocoCaptions(str(tmp_path / "captions.json"), str(tmp_path))
    text = str(record[0].message)
    assert "empty (0 bytes): " + str(tmp_path / "empty.png") in text and str(tmp_path / "text.png") in text
    assert _px(ds[0]["image"]) == (0, 0, 0)
    with pytest.raises(BadImage, match="empty.png"):
        ds[1]
