"""Harder pictures made from ORL faces: uncropped photos, harsh side light, two faces at once.

The service is judged on faces it has never seen, in photos nothing like ORL's tight, evenly lit
92x112 crops: a wider picture with background on both sides of the head, the face at any size
and place and turned a little, one side of the picture in shadow (like the Yale face set's
320x243 photos taken under a single side lamp), or several people in one picture. We only have
ORL, so these generators put ORL faces into such pictures:

- :func:`in_photo`: one face, uncropped, in a wider grey picture (textured background, random
  size, position and in-plane turn), optionally under harsh side light;
- :func:`two_faces`: two faces side by side in one picture;
- :func:`photo_set`: a whole set of photos, ``in_photo`` of each of a person's 10 ORL images.

Everything is deterministic given the ``numpy.random.Generator`` (or seed) passed in, so tests
and bench/ scripts can share it; :func:`paste` puts a face at an exact size, place and turn.
Pictures are RGB uint8 (grey in all three channels, as ORL is grey).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ORL = Path(__file__).resolve().parents[2] / "shared" / "data" / "att_faces"

Box = tuple[int, int, int, int]  # left, top, right, bottom (exclusive) of a pasted face image

MARGIN = 0.08  # at least this share of the picture's width stays background left and right


def _grey(img) -> np.ndarray:
    """An ORL image (PIL image, (H, W) or (H, W, 3) array) as float32 grey 0-255."""
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("L"))
    a = np.asarray(img, dtype=np.float32)
    return a.mean(axis=2) if a.ndim == 3 else a


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float (H, W) array (separable, edges repeated)."""
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        b = np.pad(a, pad, mode="edge")
        n = a.shape[axis]
        a = sum(w * np.take(b, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return a.astype(np.float32)


def _background(rng: np.random.Generator, w: int, h: int, kind: str) -> np.ndarray:
    """(h, w) float32 grey background.

    "flat": one grey; "gradient": a linear ramp between two greys in a random direction;
    "texture": the gradient plus smooth blotches (walls, curtains), a few soft-edged rectangles
    (door and picture frames: edges a face detector may fire on) and fine grain.
    """
    if kind not in ("flat", "gradient", "texture"):
        raise ValueError(f"background must be flat, gradient or texture, not {kind!r}")
    a, b = rng.uniform(60, 200, size=2)
    if kind == "flat":
        return np.full((h, w), a, np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(theta) * xx / w + np.sin(theta) * yy / h)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    bg = a + (b - a) * t
    if kind == "gradient":
        return bg.astype(np.float32)
    coarse = rng.uniform(-1, 1, size=(h // 24 + 2, w // 24 + 2)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))
    bg = bg + 30 * blotches
    shapes = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(2, 5))):
        x0, x1 = sorted(rng.integers(0, w, size=2))
        y0, y1 = sorted(rng.integers(0, h, size=2))
        shapes[y0:y1 + 1, x0:x1 + 1] += rng.uniform(-50, 50)
    bg = bg + _blur(shapes, 1.5)
    bg = bg + rng.normal(0, 4, size=(h, w))
    return np.clip(bg, 0, 255).astype(np.float32)


def _place(canvas: np.ndarray, face: np.ndarray, rng: np.random.Generator, x_range: tuple[int, int],
           height: float, turn: tuple[float, float]) -> Box:
    """Paste ``face`` (grey float) into ``canvas`` in place, its image ``height`` x the canvas'
    height tall (shrunk to fit), turned by an angle drawn from ``turn`` (degrees), at a random
    position whose left and right edges lie within ``x_range``. The ORL image's edges are
    feathered over a few pixels so that no hard rectangle marks the face."""
    ch = canvas.shape[0]
    fh = max(8, int(round(height * ch)))
    fw = max(8, int(round(fh * face.shape[1] / face.shape[0])))
    img = Image.fromarray(np.ascontiguousarray(face, dtype=np.float32))
    img = img.resize((fw, fh), Image.BICUBIC)
    feather = max(1, fh // 40)
    mask = np.zeros((fh, fw), np.float32)
    mask[feather:fh - feather, feather:fw - feather] = 1
    mask = Image.fromarray(_blur(mask, feather))
    angle = float(rng.uniform(*turn))
    img = img.rotate(angle, Image.BICUBIC, expand=True)
    mask = mask.rotate(angle, Image.BILINEAR, expand=True)
    room_w, room_h = x_range[1] - x_range[0], ch
    if img.width > room_w or img.height > room_h:  # too big for its place: shrink to fit
        s = min(room_w / img.width, room_h / img.height)
        size = (max(1, int(img.width * s)), max(1, int(img.height * s)))
        img, mask = img.resize(size, Image.BICUBIC), mask.resize(size, Image.BILINEAR)
    w, h = img.size
    x = int(rng.integers(x_range[0], x_range[1] - w + 1))
    y = int(rng.integers(0, ch - h + 1))
    m = np.clip(np.asarray(mask), 0, 1)
    region = canvas[y:y + h, x:x + w]
    region[:] = region * (1 - m) + np.asarray(img) * m
    return x, y, x + w, y + h


def _side_light(pic: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Harsh light from one side: a multiplicative left-to-right (or right-to-left) ramp over the
    whole picture, from 25-40 % brightness on the shadow side to 100-125 % (clipped) on the lit
    side, then a gamma of 1.0-1.6 that deepens the shadows further."""
    w = pic.shape[1]
    lo, hi = rng.uniform(0.25, 0.40), rng.uniform(1.0, 1.25)
    ramp = np.linspace(lo, hi, w, dtype=np.float32)
    if rng.random() < 0.5:
        ramp = ramp[::-1]
    lit = np.clip(pic * ramp[None, :], 0, 255)
    return 255.0 * (lit / 255.0) ** rng.uniform(1.0, 1.6)


def _finish(pic: np.ndarray, rng: np.random.Generator, side_light: bool) -> np.ndarray:
    if side_light:
        pic = _side_light(pic, rng)
    pic = pic + rng.normal(0, 2, size=pic.shape)  # sensor noise
    grey = np.clip(np.rint(pic), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def in_photo(img, rng: np.random.Generator, size: tuple[int, int] = (320, 243),
             face_height: tuple[float, float] = (0.55, 0.8),
             turn: tuple[float, float] = (-15, 15), side_light: bool = True,
             background: str = "texture", box: bool = False):
    """One ORL face, uncropped, in a ``size`` = (width, height) grey photo: RGB uint8 (H, W, 3).

    The ORL image (face, hair and its own dark surround) is ``face_height`` (drawn from the
    range) x the photo's height tall, so the face itself spans about 0.35-0.55 of it, turned in
    the image plane by an angle drawn from ``turn`` and placed at a random position with at least
    8 % of the width of ``background`` ("texture", "gradient" or "flat") on each side. With
    ``side_light`` the whole photo is lit harshly from one side (:func:`_side_light`). With
    ``box`` returns ``(photo, (left, top, right, bottom))`` of the pasted face image.
    """
    w, h = size
    canvas = _background(rng, w, h, background)
    m = int(round(MARGIN * w))
    where = _place(canvas, _grey(img), rng, (m, w - m), rng.uniform(*face_height), turn)
    pic = _finish(canvas, rng, side_light)
    return (pic, where) if box else pic


def two_faces(img_a, img_b, rng: np.random.Generator, size: tuple[int, int] = (640, 480),
              face_height: tuple[float, float] = (0.35, 0.55),
              turn: tuple[float, float] = (-10, 10), side_light: bool = False,
              background: str = "texture", boxes: bool = False):
    """Two ORL faces side by side in one photo (``img_a`` in the left half, ``img_b`` in the
    right, each with background around it), for several-faces-per-picture checks. RGB uint8;
    with ``boxes`` returns ``(photo, [box_a, box_b])``."""
    w, h = size
    canvas = _background(rng, w, h, background)
    m = int(round(MARGIN * w / 2))
    half = w // 2
    where = [_place(canvas, _grey(img_a), rng, (m, half - m), rng.uniform(*face_height), turn),
             _place(canvas, _grey(img_b), rng, (half + m, w - m), rng.uniform(*face_height),
                    turn)]
    pic = _finish(canvas, rng, side_light)
    return (pic, where) if boxes else pic


def identity_rng(identity: str, seed: int) -> np.random.Generator:
    """A person's own generator: their photos are the same whichever other people a set has."""
    return np.random.default_rng([seed, zlib.crc32(identity.encode())])


def photo_set(identities, rng_seed: int, root: Path = ORL, **kwargs) -> dict[str, list[np.ndarray]]:
    """{identity: 10 photos}: :func:`in_photo` (harsh side light by default; ``kwargs`` go to it)
    of each of the person's ORL images ``root/identity/*.png`` in sorted order, so photo ``i``
    shows the person's ``i``-th ORL image (``01.png`` is photo 0) and a split of the ORL images
    by index is the same split of the photos."""
    out = {}
    for ident in identities:
        rng = identity_rng(ident, rng_seed)
        paths = sorted((Path(root) / ident).glob("*.png"))
        if not paths:
            raise FileNotFoundError(f"no ORL images in {Path(root) / ident}")
        out[ident] = [in_photo(Image.open(p), rng, **kwargs) for p in paths]
    return out


def paste(canvas: np.ndarray, face: np.ndarray, height: int, cx: float, cy: float,
          turn: float = 0.0) -> None:
    """Paste ``face`` scaled to ``height`` px, turned ``turn`` degrees anticlockwise, centred at
    (cx, cy)."""
    s = height / face.shape[0]
    f = cv2.resize(face, None, fx=s, fy=s,
                   interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    fh, fw = f.shape[:2]
    m = cv2.getRotationMatrix2D((fw / 2, fh / 2), turn, 1.0)
    m[:, 2] += (cx - fw / 2, cy - fh / 2)
    size = (canvas.shape[1], canvas.shape[0])
    warped = cv2.warpAffine(f, m, size, flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.full((fh, fw), 255, np.uint8), m, size,
                          flags=cv2.INTER_NEAREST) > 0
    canvas[mask] = warped[mask]
