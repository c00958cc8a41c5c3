"""Safe decoding of user-uploaded images into RGB uint8 arrays.

Everything here works on bytes already in memory and raises only :class:`ImageError` for bad
input, with a ``reason`` that tells the user what to fix and an HTTP-like ``status`` the API layer
maps to a response (415 not an image, 413 over a limit, 422 truncated/corrupt/empty).
"""

from __future__ import annotations

import io
import threading
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "ACCEPTED_FORMATS",
    "BACKGROUND_GREY",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "decode_image",
    "image_size",
]

DEFAULT_MAX_PIXELS = 40_000_000
MAX_PIXELS_SETTING = "FACEGRAD_MAX_IMAGE_PIXELS"

# Pillow plugin names. "PPM" also reads PGM and PBM (P1-P6).
ACCEPTED_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "WEBP", "GIF", "TIFF")
_FORMATS_TEXT = "JPEG, PNG, PGM/PPM, BMP, WebP, GIF or TIFF"

# File-name extensions treated as images when scanning archives.
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".pgm",
        ".ppm",
        ".pnm",
        ".pbm",
        ".bmp",
        ".dib",
        ".webp",
        ".gif",
        ".tif",
        ".tiff",
    }
)

# Transparent pixels are composited onto this colour (mid-grey), see decode_image.
BACKGROUND_GREY = (128, 128, 128)

_ALPHA_MODES = frozenset({"P", "PA", "LA", "La", "RGBA", "RGBa"})
_WIDE_GREY_MODES = frozenset({"I", "F"})  # plus every "I;16*" variant


class ImageError(ValueError):
    """A user-supplied file is not a usable image.

    ``reason`` is a user-facing sentence saying what to fix; ``status`` is 415 (not an image /
    unsupported format), 413 (over a size or pixel limit) or 422 (empty, truncated, corrupt).
    """

    def __init__(self, reason: str, status: int = 422):
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _sniff(data: bytes) -> str | None:
    """Name of the format the magic bytes claim, or None (used to tell 415 from 422)."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if len(data) >= 3 and data[:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "PPM"
    return None


# ImageFile.LOAD_TRUNCATED_IMAGES is a process-wide flag that other code may set to True; while
# any decode runs here it is forced to False (re-entrant across threads via a depth counter).
_trunc_lock = threading.Lock()
_trunc_depth = 0
_trunc_saved = False


@contextmanager
def _refuse_truncated():
    global _trunc_depth, _trunc_saved
    with _trunc_lock:
        if _trunc_depth == 0:
            _trunc_saved = ImageFile.LOAD_TRUNCATED_IMAGES
        _trunc_depth += 1
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        with _trunc_lock:
            _trunc_depth -= 1
            if _trunc_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _trunc_saved


def _label(filename: str) -> str:
    return f"'{filename}': " if filename else ""


def _too_many_pixels(prefix: str, w: int | None, h: int | None, max_pixels: int) -> ImageError:
    size = f"{w}x{h} = {w * h:,} pixels" if w and h else "its pixel count"
    return ImageError(
        f"{prefix}image is too large ({size}); the limit is {max_pixels:,} pixels "
        f"(setting {MAX_PIXELS_SETTING}). Downscale the image and upload it again.",
        413,
    )


def _open(data: bytes, filename: str, max_pixels: int) -> Image.Image:
    """Image.open (lazy: reads only the header) with every failure mapped to ImageError."""
    prefix = _label(filename)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"{prefix}expected the file's bytes, got {type(data).__name__}.", 422)
    if len(data) == 0:
        raise ImageError(f"{prefix}empty file (0 bytes); upload the image file itself.", 422)
    claimed = _sniff(bytes(data[:16]))
    try:
        with warnings.catch_warnings():
            # Pillow warns past Image.MAX_IMAGE_PIXELS and raises past twice that; both are 413.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(prefix, None, None, max_pixels) from None
    except UnidentifiedImageError:
        if claimed is not None:
            raise ImageError(
                f"{prefix}file looks like {claimed} but its header is truncated or corrupt; "
                "re-export or re-upload the image.",
                422,
            ) from None
        raise ImageError(f"{prefix}not a recognised image; upload {_FORMATS_TEXT}.", 415) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises SyntaxError, OSError, struct.error...
        raise ImageError(
            f"{prefix}could not read the image header ({type(exc).__name__}: {exc}); "
            "the file is truncated or corrupt, re-export it as PNG or JPEG.",
            422,
        ) from None


def _check_size(im: Image.Image, prefix: str, max_pixels: int) -> tuple[int, int]:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{prefix}image has no pixels ({w}x{h}); upload a real image.", 422)
    if w * h > max_pixels:
        raise _too_many_pixels(prefix, w, h, max_pixels)
    return w, h


def image_size(
    data: bytes, *, max_pixels: int | None = None, filename: str = ""
) -> tuple[int, int]:
    """Return ``(width, height)`` read from the header only, without decoding pixels.

    Raises ImageError like :func:`decode_image` (415/422; 413 if ``max_pixels`` is given and
    exceeded, or if the size is beyond Pillow's own decompression-bomb limit).
    """
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    im = _open(data, filename, limit)
    try:
        if max_pixels is not None:
            return _check_size(im, _label(filename), max_pixels)
        return im.size
    finally:
        im.close()


def _wide_grey_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale to 8-bit, scaled by the image's own range.

    Pillow's convert("L") clips everything above 255 (a 16-bit image becomes almost white), so
    instead ``min(0, lowest value)`` maps to 0 and the highest value maps to 255.
    """
    a = np.asarray(im, dtype=np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo = min(0.0, float(a.min()))
    hi = float(a.max())
    if hi <= lo:
        out = np.zeros(a.shape, dtype=np.uint8)
    else:
        out = np.rint((a - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _to_rgb(im: Image.Image, prefix: str) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _WIDE_GREY_MODES or mode.startswith("I;16"):
        return _wide_grey_to_l(im).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_GREY + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        # "1", "L", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", ...
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(
            f"{prefix}unsupported pixel mode {mode!r} ({exc}); re-export the image as 8-bit "
            "RGB or greyscale PNG/JPEG.",
            415,
        ) from None


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, filename: str = ""
) -> np.ndarray:
    """Decode an uploaded image into a C-contiguous RGB ``uint8`` array of shape (H, W, 3).

    Accepts JPEG, PNG, PGM/PPM/PBM, BMP, WebP, GIF and TIFF. ``filename`` only prefixes messages.

    - The pixel count is read from the header and refused (413, naming FACEGRAD_MAX_IMAGE_PIXELS)
      before any pixel buffer is allocated; Pillow's own decompression-bomb warning/error is also
      a 413, so the effective limit is ``min(max_pixels, 2 * PIL.Image.MAX_IMAGE_PIXELS)`` and
      sizes above ``PIL.Image.MAX_IMAGE_PIXELS`` (about 89.5 M) are refused as well.
    - Truncated or corrupt data is a 422 even if ``ImageFile.LOAD_TRUNCATED_IMAGES`` was set.
    - EXIF orientation is applied, so the array is upright as a viewer shows it.
    - Animated GIF/WebP/PNG and multi-page TIFF: the first frame only.
    - 16/32-bit integer and float greyscale ("I;16", "I", "F") is scaled linearly to 0..255 by the
      image's own range (0, or the minimum if negative, maps to 0; the maximum maps to 255).
    - Anything with transparency (palette "P" with or without a transparent index, "PA", "LA",
      "RGBA") is composited onto a mid-grey background ``BACKGROUND_GREY`` = (128, 128, 128)
      and then made RGB; transparent pixels therefore come out as (128, 128, 128).
    - "1" (bi-level), "L" (greyscale, channels replicated), "CMYK", "YCbCr" -> RGB.

    Raises only :class:`ImageError` for bad input (415 / 413 / 422).
    """
    prefix = _label(filename)
    im = _open(data, filename, max_pixels)
    try:
        _check_size(im, prefix, max_pixels)
        try:
            with _refuse_truncated(), warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                im.load()
                _check_size(im, prefix, max_pixels)  # a plugin may change size on load
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _too_many_pixels(prefix, *im.size, max_pixels) from None
        except MemoryError:
            raise _too_many_pixels(prefix, *im.size, max_pixels) from None
        except Exception as exc:  # noqa: BLE001 - bad input must map to our error
            msg = str(exc) or type(exc).__name__
            kind = "truncated" if "truncated" in msg else "corrupt"
            raise ImageError(
                f"{prefix}the image data is {kind} ({msg}); re-export or re-upload the file.",
                422,
            ) from None
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - malformed EXIF
            upright = im  # unreadable EXIF: keep the stored orientation rather than reject
        try:
            rgb = _to_rgb(upright, prefix)
            arr = np.asarray(rgb, dtype=np.uint8)
        except ImageError:
            raise
        except Exception as exc:  # noqa: BLE001 - bad input must map to our error
            raise ImageError(
                f"{prefix}could not convert the image to RGB ({type(exc).__name__}: {exc}); "
                "re-export it as an 8-bit RGB or greyscale PNG/JPEG.",
                422,
            ) from None
    finally:
        im.close()
    if arr.ndim != 3 or arr.shape[2] != 3:  # defensive; _to_rgb always returns RGB
        raise ImageError(f"{prefix}could not convert the image to RGB.", 422)
    return np.ascontiguousarray(arr)
