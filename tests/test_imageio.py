"""Tests for facegrad.data.imageio.decode_image / image_size. Every bad input is generated here."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from facegrad.data.imageio import BACKGROUND_GREY, ImageError, decode_image, image_size

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FACE_PNG = DATA / "att_faces" / "s01" / "01.png"
FACE_PGM = DATA / "att_faces_pgm" / "s1" / "1.pgm"

needs_data = pytest.mark.skipif(not FACE_PNG.exists(), reason="shared ORL data not present")


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A 1-bit greyscale PNG whose IHDR claims width x height, with a tiny (incomplete) IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def face_rgb() -> Image.Image:
    return Image.open(FACE_PNG).convert("RGB")


def assert_error(exc_info, status: int, *fragments: str) -> None:
    err = exc_info.value
    assert isinstance(err, ImageError)
    assert err.status == status, err.reason
    for fragment in fragments:
        assert fragment in err.reason, err.reason


# --- rejected inputs ------------------------------------------------------------------------


def test_zero_bytes_is_422_empty():
    with pytest.raises(ImageError) as ei:
        decode_image(b"", filename="x.png")
    assert_error(ei, 422, "empty file", "'x.png'")


def test_text_file_is_415():
    with pytest.raises(ImageError) as ei:
        decode_image(b"name,label\nalice,1\n" * 20, filename="labels.csv")
    assert_error(ei, 415, "not a recognised image", "JPEG, PNG")


def test_unsupported_format_ico_is_415():
    data = encode(Image.new("RGB", (16, 16), "red"), "ICO")
    with pytest.raises(ImageError) as ei:
        decode_image(data)
    assert_error(ei, 415)


def test_png_signature_with_cut_header_is_422():
    data = encode(Image.new("L", (32, 32)), "PNG")[:12]
    with pytest.raises(ImageError) as ei:
        decode_image(data)
    assert_error(ei, 422, "PNG")


@needs_data
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("fraction", [0.5, 0.95])
def test_truncated_is_422(fmt, fraction):
    data = encode(face_rgb(), fmt)
    with pytest.raises(ImageError) as ei:
        decode_image(data[: int(len(data) * fraction)])
    assert_error(ei, 422, "truncated")


@needs_data
def test_truncated_refused_even_with_load_truncated_images(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(face_rgb(), "JPEG")
    with pytest.raises(ImageError) as ei:
        decode_image(data[: len(data) // 2])
    assert_error(ei, 422)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_20000x20000_png_bomb_is_413_without_decoding():
    data = png_header_only(20000, 20000)
    assert len(data) < 200
    with pytest.raises(ImageError) as ei:
        decode_image(data)
    assert_error(ei, 413, "FACEGRAD_MAX_IMAGE_PIXELS")


def test_pixel_limit_checked_from_header_before_decoding():
    # 7000x7000 = 49 M pixels: over our 40 M default, under Pillow's own warning threshold.
    # The IDAT is incomplete, so a 413 (not a 422 "truncated") proves the header check ran first.
    data = png_header_only(7000, 7000)
    with pytest.raises(ImageError) as ei:
        decode_image(data)
    assert_error(ei, 413, "FACEGRAD_MAX_IMAGE_PIXELS", "7000x7000")


def test_pillow_bomb_warning_is_413_even_if_max_pixels_is_higher():
    data = png_header_only(10000, 10000)  # 100 M: Pillow's DecompressionBombWarning range
    with pytest.raises(ImageError) as ei:
        decode_image(data, max_pixels=500_000_000)
    assert_error(ei, 413, "FACEGRAD_MAX_IMAGE_PIXELS")


def test_small_max_pixels_refuses_ordinary_image():
    data = encode(Image.new("RGB", (100, 50)), "PNG")
    with pytest.raises(ImageError) as ei:
        decode_image(data, max_pixels=4999)
    assert_error(ei, 413, "100x50", "4,999")
    assert decode_image(data, max_pixels=5000).shape == (50, 100, 3)


def test_corrupt_png_body_is_422():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    data = bytearray(encode(im, "PNG"))
    mid = len(data) // 2
    data[mid : mid + 40] = b"\xff" * 40  # garbage inside IDAT
    with pytest.raises(ImageError) as ei:
        decode_image(bytes(data))
    assert_error(ei, 422)


def test_non_bytes_input_is_image_error():
    with pytest.raises(ImageError) as ei:
        decode_image("not bytes")  # type: ignore[arg-type]
    assert_error(ei, 422)


# --- accepted inputs and conversions --------------------------------------------------------


@needs_data
def test_real_pgm_decodes_to_rgb():
    arr = decode_image(FACE_PGM.read_bytes(), filename="1.pgm")
    assert arr.shape == (112, 92, 3)
    assert arr.dtype == np.uint8
    assert arr.flags["C_CONTIGUOUS"]
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    # the PNG copy of the same face has identical pixels
    assert (decode_image(FACE_PNG.read_bytes()) == arr).all()
    assert image_size(FACE_PGM.read_bytes()) == (92, 112)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP", "PPM", "GIF"])
def test_formats_round_trip_rgb(fmt):
    a = np.zeros((20, 30, 3), dtype=np.uint8)
    a[:, :15] = (200, 30, 30)
    a[:, 15:] = (20, 40, 220)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(Image.fromarray(a), fmt, **kw))
    assert out.shape == (20, 30, 3)
    assert np.abs(out.astype(int) - a).max() <= 8  # GIF quantises


def test_jpeg_rgb():
    out = decode_image(encode(Image.new("RGB", (40, 24), (10, 200, 60)), "JPEG", quality=95))
    assert out.shape == (24, 40, 3)
    assert np.abs(out[12, 20].astype(int) - (10, 200, 60)).max() <= 4


def test_16bit_png_scaled_by_range_not_clipped():
    a = np.linspace(0, 4000, 64 * 32).reshape(32, 64).astype(np.uint16)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    data = encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data)
    assert out.shape == (32, 64, 3)
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out[..., 0])) > 200  # a gradient, not saturated at 255
    assert out[16, 32, 0] == round(int(a[16, 32]) * 255 / 4000)


def test_32bit_int_tiff_scaled():
    a = (np.arange(16 * 16).reshape(16, 16) * 1000).astype(np.int32)
    im = Image.fromarray(a)
    assert im.mode == "I"
    out = decode_image(encode(im, "TIFF"))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_palette_gif():
    im = Image.new("P", (10, 10))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    im.paste(1, (5, 0, 10, 10))
    out = decode_image(encode(im, "GIF"))
    assert out.shape == (10, 10, 3)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 9]) == (0, 255, 0)


def test_palette_with_transparency_gets_grey_background():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    im.paste(1, (2, 0, 4, 4))
    out = decode_image(encode(im, "GIF", transparency=0))
    assert tuple(out[0, 0]) == BACKGROUND_GREY
    assert tuple(out[0, 3]) == (0, 0, 255)


def test_cmyk_jpeg():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert out.shape == (16, 16, 3)
    assert np.abs(out[8, 8].astype(int) - (255, 0, 0)).max() <= 6


def test_rgba_png_composited_on_mid_grey():
    a = np.zeros((4, 6, 4), dtype=np.uint8)
    a[:, :2] = (255, 0, 0, 255)  # opaque red
    a[:, 2:4] = (0, 0, 0, 0)  # fully transparent
    a[:, 4:] = (0, 0, 255, 128)  # half-transparent blue
    out = decode_image(encode(Image.fromarray(a, "RGBA"), "PNG"))
    assert out.shape == (4, 6, 3)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 2]) == BACKGROUND_GREY
    assert np.abs(out[0, 5].astype(int) - (64, 64, 191)).max() <= 2


def test_la_png():
    a = np.zeros((2, 2, 2), dtype=np.uint8)
    a[0] = (255, 255)
    out = decode_image(encode(Image.fromarray(a, "LA"), "PNG"))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 0]) == BACKGROUND_GREY


def test_one_bit_image():
    im = Image.new("1", (8, 4), 0)
    im.paste(1, (4, 0, 8, 4))
    out = decode_image(encode(im, "PNG"))
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 7]) == (255, 255, 255)


def test_grayscale_replicated():
    a = np.arange(48, dtype=np.uint8).reshape(6, 8)
    out = decode_image(encode(Image.fromarray(a), "PNG"))
    assert out.shape == (6, 8, 3)
    for c in range(3):
        assert (out[..., c] == a).all()


def test_exif_orientation_6_is_applied():
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(im, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data)
    assert out.shape == (40, 20, 3)  # stored 40 wide x 20 high -> displayed 20 wide x 40 high
    assert out[2, 10].mean() > 200  # the left stripe is now along the top
    assert out[-2, 10].mean() < 50


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode_image(data)
    assert out.shape == (8, 8, 3)
    assert tuple(out[4, 4]) == (255, 0, 0)


def test_image_size_reads_header_only():
    assert image_size(png_header_only(7000, 5000)) == (7000, 5000)
    with pytest.raises(ImageError) as ei:
        image_size(png_header_only(7000, 5000), max_pixels=1000)
    assert_error(ei, 413, "FACEGRAD_MAX_IMAGE_PIXELS")
    with pytest.raises(ImageError) as ei:
        image_size(b"")
    assert_error(ei, 422)
