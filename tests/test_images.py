import io

import numpy as np
import pytest
import torch
from PIL import Image

from l2r import images
from l2r.images import ImageDecodeError
from l2r.ranking import hard_order


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb_array(h=12, w=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_lossless_formats_round_trip(fmt):
    arr = rgb_array()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = images.decode_image(encode(Image.fromarray(arr), fmt, **kwargs))
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
    np.testing.assert_array_equal(out, arr)


def test_jpeg_decodes_close():
    arr = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    out = images.decode_image(encode(Image.fromarray(arr), "JPEG", quality=95))
    assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - arr).max() < 8


def test_grayscale_palette_cmyk_rgba_become_rgb():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L")
    out = images.decode_image(encode(gray, "PNG"))
    assert out.shape == (8, 8, 3) and (out[..., 0] == out[..., 2]).all() and out[0, 5, 1] == 5

    palette = Image.fromarray(rgb_array(8, 8)).convert("P", palette=Image.ADAPTIVE, colors=4)
    out = images.decode_image(encode(palette, "PNG"))
    np.testing.assert_array_equal(out, np.asarray(palette.convert("RGB")))

    cmyk = Image.new("CMYK", (6, 5), (0, 255, 255, 0))  # pure red in CMYK
    out = images.decode_image(encode(cmyk, "JPEG", quality=100))
    assert out.shape == (5, 6, 3) and out[..., 0].min() > 200 and out[..., 1:].max() < 60

    rgba = np.dstack([rgb_array(8, 8), np.full((8, 8), 7, np.uint8)])
    out = images.decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    np.testing.assert_array_equal(out, rgba[..., :3])


def test_sixteen_bit_grayscale_is_scaled():
    values = np.array([[0, 65535], [257 * 128, 257]], dtype=np.uint16)
    out = images.decode_image(encode(Image.fromarray(values), "PNG"))
    assert out[..., 0].tolist() == [[0, 255], [128, 1]]


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"definitely not an image", "not a recognised"),
        (b"GIF89a" + b"\0" * 20, "not a recognised"),
    ],
)
def test_bad_bytes_raise_with_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        images.decode_image(data)


def test_truncated_image_raises():
    data = encode(Image.fromarray(rgb_array(64, 64)), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        images.decode_image(data[: len(data) // 2])
    assert issubclass(ImageDecodeError, ValueError)


def test_decode_mask():
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    out = images.decode_mask(encode(Image.fromarray(mask.astype(np.uint8) * 255), "PNG"))
    assert out.dtype == bool
    np.testing.assert_array_equal(out, mask)


def test_resize_and_crop_geometry():
    arr = rgb_array(40, 80)
    out = images.resize_and_crop(arr, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    # crop_pct < 1 resizes the short side to floor(size / crop_pct) before the centre crop.
    assert images._resized_shape(40, 80, 20, 0.875) == (22, 44)
    assert images.resize_and_crop(arr, (16, 24), 0.875).shape == (16, 24, 3)
    # Already the right size: untouched.
    same = rgb_array(8, 8)
    np.testing.assert_array_equal(images.resize_and_crop(same, 8), same)


def test_resize_and_crop_centres_content():
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, 20:40] = 255  # the central square is white, the sides black
    out = images.resize_and_crop(arr, 10)
    assert out[:, 1:-1].min() >= 250  # the outer columns blend with the black sides


def test_mask_follows_image_geometry():
    mask = np.zeros((40, 80), bool)
    mask[:, 20:60] = True  # the central 40x40 after cropping
    out = images.resize_and_crop_mask(mask, 10, crop_pct=1.0)
    assert out.shape == (10, 10) and out.all()


def test_to_tensor():
    batch = np.stack([rgb_array(4, 5, s) for s in range(2)])
    batch.setflags(write=False)  # like a Ray batch
    t = images.to_tensor(batch)
    assert t.dtype == torch.float32 and t.shape == (2, 3, 4, 5)
    assert torch.allclose(t[1, 2, 3, 4], torch.tensor(batch[1, 3, 4, 2] / 255.0, dtype=torch.float32))
    assert images.to_tensor(torch.from_numpy(batch.copy())).shape == (2, 3, 4, 5)
    assert images.to_tensor(batch[0]).shape == (3, 4, 5)


@pytest.mark.parametrize("shape", [(7, 9), (300, 300)])
def test_heatmap_round_trip_keeps_ranking_with_ties(shape):
    rng = np.random.default_rng(0)
    heatmap = rng.integers(0, 4, shape).astype(np.float32)  # many ties
    decoded = images.decode_heatmap(images.encode_heatmap(heatmap))
    assert decoded.dtype == np.float32 and decoded.shape == shape
    assert len(np.unique(decoded)) == decoded.size
    original = hard_order(torch.from_numpy(heatmap)[None])
    assert torch.equal(hard_order(torch.from_numpy(decoded)[None]), original)
    np.testing.assert_array_equal(images.decode_heatmap_ranks(images.encode_heatmap(heatmap)), images.heatmap_ranks(heatmap))


def test_heatmap_tie_rule_and_header():
    heatmap = np.array([[1.0, 3.0], [3.0, 1.0]])
    ranks = images.heatmap_ranks(heatmap)
    assert ranks.tolist() == [[2, 0], [1, 3]]  # ties: lower flat index first
    data = images.encode_heatmap(torch.tensor(heatmap))
    assert data[:4] == b"L2RH" and data[5] == 2
    big = images.encode_heatmap(np.zeros((300, 300)))
    assert big[5] == 4


def test_heatmap_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        images.encode_heatmap(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="magic"):
        images.decode_heatmap(b"XXXX" + bytes(20))


def test_exif_orientation_is_applied():
    img = Image.fromarray(np.zeros((4, 8, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when viewed
    assert images.decode_image(encode(img, "JPEG", exif=exif)).shape == (8, 4, 3)
