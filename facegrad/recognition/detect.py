"""Face detection and alignment with dlib: HOG detector → 5 landmarks → aligned 150×150 chip.

Models (loaded once per process, on first use): dlib's HOG frontal face detector
(``dlib.get_frontal_face_detector()``, built into dlib), its CNN face detector
``mmod_human_face_detector.dat`` (run in PyTorch: "Turned faces" below) and its 5-point landmark
model ``shape_predictor_5_face_landmarks.dat``, both from the ``face-recognition-models``
package (the 68-point model is not used: its training data restricts commercial use).

Detection (:func:`find_faces`)
    The HOG detector scans the image resized so that its longest side is ``DETECT_SIDE`` (960 px),
    enlarged at most ``MAX_UPSCALE`` (2×): in grey, or, where the photo is enlarged exactly 2×, in
    colour by dlib's own upsampling (:func:`_scan`). HOG (an 80×80 window) finds faces whose box is
    about 70 px and more in the image it scans (boxes come in steps of 6/5), so the smallest face
    found has a box of about 1/13 of the longest side (48 px in a 640×480 photo), and a big upload
    costs what a 960-px one does. The cost grows with the pixels scanned. On this 2-core VM, per
    640×480 picture (``bench/detection.py``, CPU ms, 40 faces per cell):

    ====================  ==========  ====================  ==========================
    scanned longest side  ms per img  ORL face 60 px high   false boxes, 40 noise pics
    ====================  ==========  ====================  ==========================
    640 (as it is)        38          0 of 120              0
    960 (chosen)          70-76       114 of 120            0
    1280                  124         120 of 120            2
    ====================  ==========  ====================  ==========================

    960 px finds the 60-px ORL frames (48-px boxes) at a cost an identify call can carry.
    Boxes come back as (x, y, w, h) in the original image's pixels, clipped to the image,
    biggest first.

Tight crops
    The HOG window wants some context around the face; a crop cut at the chin and hairline
    (ORL) gives little. When nothing is found, the scan is repeated on the image with a border
    of ``PAD_RETRY`` (25 %) of its longest side on every side, filled by replicating its edge
    pixels (not mirrored: a mirrored border makes mirrored faces), scanned at ``RETRY_SIDE``
    (320 px: a face filling the frame is still over 80 px there, and the retry costs about
    12 ms on a picture with no face); only faces whose centre lies inside the original image
    count. When that finds nothing either, an image whose longest side is at most
    ``CROP_MAX_SIDE`` (256 px) and whose sides differ at most ``CROP_MAX_ASPECT`` (2×) is taken
    to be a face crop: face-crop data sets come at about that size (ORL 92×112, Extended Yale B
    168×192, CelebA 178×218, LFW 250×250), a picture that small holds little more than one face,
    and photos and screenshots are bigger. Its face box is the image's largest centred square
    and the landmarks are predicted inside it (on the ORL images the detector finds, landmarks
    predicted in that square lie 2 % of the eye distance from those predicted in the detector's
    box; with the whole image as the box, 10 %). A bigger image with no face found has no face:
    :func:`crop_faces` returns [] and :func:`crop_one` None, and the caller reports it.

Alignment (:func:`crop_faces`)
    The 5 landmarks (the corners of both eyes and the bottom of the nose) are predicted on the
    full-resolution image inside each face box, and the chip is ``dlib.get_face_chip(rgb, shape,
    size=STORE_SIZE, padding=0.25)``: rotated so that the eyes are level and scaled to the
    150×150 chip dlib's face-recognition ResNet reads. Where the chip (or the landmark model's
    view around the box) reaches past the image's edge, the missing pixels are the edge pixels
    replicated (dlib itself would read and fill black); inside the image the chip is dlib's own.

Turned faces
    HOG is a frontal detector: faces turned past about 45° escape it. Where HOG and its padded
    retry find nothing, dlib's CNN face detector (MMOD, King 2015: "Max-Margin Object
    Detection"; ``mmod_human_face_detector.dat`` of ``face-recognition-models``, trained on faces
    in every pose) scans the photo at ``CNN_SIDE`` (320 px), and its faces are aligned by their
    landmarks like HOG's. The detector runs in PyTorch (:mod:`facegrad.recognition.mmod`, read
    from the same file, with dlib's boxes), about 15× faster than dlib-bin's own on one thread
    (``bench/detection.py``).

    The 5-point alignment scales the chip by the spread of the eye corners, which shrinks with
    the cosine of the head's turn, so a turned face's chip comes out zoomed in on the near eye.
    The detector's box does not shrink that way: the chip is enlarged about its centre (angle
    kept) to span at least ``MIN_CHIP_TO_BOX`` (1.0) times the box's width. On frontal faces the
    chip spans 1.23× the HOG box (median over cfp_dev's 2,478; below 1.0 on 18, 0.7 %), on
    profiles 0.89× (HOG) and 0.97× (CNN) of theirs. The floor was chosen among 0.8-1.1 of the
    frontal median and 1.0-1.08 of the box on folds 1-4 of cfp_dev's frontal-profile pairs
    (pretrained network, flip_mean; the tie between 1.0 and 1.08 went to the rule that changes
    fewer frontal chips) and confirmed on fold 5: frontal-profile accuracy 0.863 → 0.884 over
    folds 1-4, 0.820 → 0.829 on fold 5, frontal-frontal unchanged (0.995, 0.993).

    On CFP's profile photos enlarged 3× (``bench/detection.py``) HOG finds 77 of
    200, HOG then the CNN 198; on CFP's frontal-profile pairs (folds 1-5) landmark alignment of
    the CNN's faces verified 0.848, alignment by the CNN's box 0.802.

Measured (``bench/detection.py``, seed 0)
    Bare ORL images (92×112): 388 of 400 found by the detector directly, 10 by the padded retry,
    2 by the CNN.
    ORL faces placed at random spots of 640×480 blurred-noise pictures, 40 per cell: all found at
    frame heights 100 and 160 px, upright and turned ±15°; at 60 px 40, 38 and 36 of 40 (upright,
    +15°, -15°). The eye line from the landmarks follows the turn within 1° (median). Two faces
    side by side (160 and 100 px): both found, biggest first, in 20 of 20. No box in 40 noise
    pictures. crop_faces on a 640×480 picture with one face: about 70 ms of CPU.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import dlib
import numpy as np

from facegrad.data.preprocess import STORE_SIZE, prepare_face
from facegrad.recognition.mmod import MMODDetector

__all__ = [
    "CHIP_PADDING",
    "CROP_MAX_ASPECT",
    "CROP_MAX_SIDE",
    "DETECT_MODES",
    "DETECT_SIDE",
    "MAX_UPSCALE",
    "PAD_RETRY",
    "RETRY_SIDE",
    "Box",
    "crop_faces",
    "crop_one",
    "find_faces",
]

Box = tuple[int, int, int, int]

DETECT_MODES = ("auto", "none")
DETECT_SIDE = 960        # longest side of the image the detector scans ...
MAX_UPSCALE = 2.0        # ... enlarged at most this much
PAD_RETRY = 0.25         # nothing found: retry with a replicated border of this share of the side,
RETRY_SIDE = 320         # ... the bordered image scanned at this longest side (at most MAX_UPSCALE)
CNN_SIDE = 320           # still nothing: dlib's CNN (MMOD) detector scans at this longest side
CNN_MIN_SIDE = 40        # ... when the scanned image's shorter side is at least this
CROP_MAX_SIDE = 256      # still nothing, longest side <= this ...
CROP_MAX_ASPECT = 2.0    # ... and longest / shortest side <= this: a face crop (module doc)
CHIP_PADDING = 0.25      # dlib.get_face_chip's padding for the face-recognition ResNet
LANDMARK_CONTEXT = 0.5   # the landmark model is run on the box grown by this share of its side
MIN_CHIP_TO_BOX = 1.0    # the chip spans at least the detector's box (module doc, "Turned faces")

PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
CNN_FILE = "mmod_human_face_detector.dat"

# dlib's object_detector keeps the image it scans in the object itself, so one detector is not
# safe to call from two threads; the Python binding holds the GIL while it runs anyway, so a lock
# costs nothing. The shape predictor and get_face_chip keep no state.
_load_lock = threading.Lock()
_detect_lock = threading.Lock()
_models: tuple[object, object] | None = None
_cnn: MMODDetector | None = None


def predictor_path(name: str = PREDICTOR_FILE) -> Path:
    """A model file of the ``face-recognition-models`` package (not imported: its
    ``__init__`` needs pkg_resources): the 5-point landmark model by default."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the face-recognition-models package is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise RuntimeError(f"dlib model not found at {path}")
    return path


def _load() -> tuple[object, object]:
    """(detector, shape predictor), loaded once per process."""
    global _models
    if _models is None:
        with _load_lock:
            if _models is None:
                _models = (dlib.get_frontal_face_detector(),
                           dlib.shape_predictor(str(predictor_path())))
    return _models


def _load_cnn() -> MMODDetector:
    """dlib's CNN face detector (MMOD, King 2015) in PyTorch, loaded once per process."""
    global _cnn
    if _cnn is None:
        with _load_lock:
            if _cnn is None:
                _cnn = MMODDetector.from_file(predictor_path(CNN_FILE))
    return _cnn


def _as_rgb(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 C-contiguous RGB from an RGB, RGBA or greyscale uint8 image."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or min(img.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _check(detect: str, max_faces: int) -> None:
    if detect not in DETECT_MODES:
        raise ValueError(f"detect must be one of {DETECT_MODES}, got {detect!r}")
    if not isinstance(max_faces, int) or max_faces < 1:
        raise ValueError("max_faces must be at least 1")


@dataclass(frozen=True)
class _Face:
    """A face: its box (left, top, right, bottom; exclusive, floats, may pass the image's edge)
    in the image's pixels, and how it was found: "detector", "padded" or "crop"."""

    rect: tuple[float, float, float, float]
    how: str

    def box(self, w: int, h: int) -> Box:
        left, top, right, bottom = self.rect
        x0, y0 = max(0, round(left)), max(0, round(top))
        x1, y1 = min(w, round(right)), min(h, round(bottom))
        return (x0, y0, max(1, x1 - x0), max(1, y1 - y0))


def _resized(img: np.ndarray, scale: float) -> np.ndarray:
    """``img`` scaled by ``scale`` (area-averaged when shrinking, bilinear when enlarging)."""
    if scale == 1.0:
        return img
    h, w = img.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _scan(rgb: np.ndarray, side: int, pad: float = 0.0
          ) -> list[tuple[float, float, float, float]]:
    """Faces the detector finds in ``rgb`` (with a replicated border of ``pad`` times its
    longest side) resized to ``side`` (enlarged at most ``MAX_UPSCALE``), as (left, top, right,
    bottom) in ``rgb``'s pixels, unsorted.

    An image enlarged by exactly 2 is scanned as ``face_recognition`` scans it, so that a photo
    of up to 480 px gets dlib's own boxes: in colour (dlib's HOG takes each pixel's strongest
    channel gradient) and enlarged by dlib's ``pyramid_up`` (upsample 1). Any other scale is
    scanned in grey, resized by OpenCV: a third of the gradient work, the cost that counts on
    the bigger photos (``bench/identify_speed.py``)."""
    h, w = rgb.shape[:2]
    p = pad * max(h, w)
    scale = min(MAX_UPSCALE, side / (max(h, w) + 2 * p))
    upsample = 1 if scale == 2.0 and not p else 0
    img = rgb
    if not upsample:
        img = _resized(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), scale)
    sx, sy = (img.shape[1] / w, img.shape[0] / h) if not upsample else (1.0, 1.0)
    ps = round(p * scale)
    if ps:
        img = cv2.copyMakeBorder(img, ps, ps, ps, ps, cv2.BORDER_REPLICATE)
    detector, _ = _load()
    with _detect_lock:
        found = detector(np.ascontiguousarray(img), upsample)
    return [((r.left() - ps) / sx, (r.top() - ps) / sy, (r.right() + 1 - ps) / sx,
             (r.bottom() + 1 - ps) / sy) for r in found]


def _scan_cnn(rgb: np.ndarray, side: int) -> list[tuple[float, float, float, float]]:
    """Faces dlib's CNN detector finds in ``rgb`` resized to ``side`` (enlarged at most
    ``MAX_UPSCALE``), as (left, top, right, bottom) in ``rgb``'s pixels, unsorted. It was
    trained on faces in every pose up to full profile; its window finds faces of about 40 px
    and more at the scanned size."""
    h, w = rgb.shape[:2]
    img = _resized(rgb, min(MAX_UPSCALE, side / max(h, w)))
    if min(img.shape[:2]) < CNN_MIN_SIDE:  # too small for its window (dlib-bin refuses it)
        return []
    sx, sy = img.shape[1] / w, img.shape[0] / h
    found = _load_cnn().detect(img)[0]
    return [(left / sx, top / sy, (right + 1) / sx, (bottom + 1) / sy)
            for left, top, right, bottom in (d.rect for d in found)]


def _is_crop(h: int, w: int) -> bool:
    return max(h, w) <= CROP_MAX_SIDE and max(h, w) <= CROP_MAX_ASPECT * min(h, w)


def _find(rgb: np.ndarray, fallback: bool) -> list[_Face]:
    """The faces of an (H, W, 3) image, biggest first (module doc); the tight-crop rule only
    with ``fallback``."""
    h, w = rgb.shape[:2]

    def centred_inside(rects, how: str) -> list[_Face]:
        return [_Face(r, how) for r in rects
                if 0 <= (r[0] + r[2]) / 2 < w and 0 <= (r[1] + r[3]) / 2 < h]

    faces = [_Face(r, "detector") for r in _scan(rgb, DETECT_SIDE)]
    if not faces:
        faces = centred_inside(_scan(rgb, RETRY_SIDE, PAD_RETRY), "padded")
    if not faces:
        faces = centred_inside(_scan_cnn(rgb, CNN_SIDE), "cnn")
    if not faces and fallback and _is_crop(h, w):
        side = min(h, w)
        x0, y0 = (w - side) / 2, (h - side) / 2
        faces = [_Face((x0, y0, x0 + side, y0 + side), "crop")]

    def order(f: _Face):
        left, top, right, bottom = f.rect
        return (-(right - left) * (bottom - top), top, left)

    return sorted(faces, key=order)


def _window(rgb: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """rgb[y0:y1, x0:x1], with the part outside the image filled by its edge pixels."""
    h, w = rgb.shape[:2]
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if cx1 <= cx0 or cy1 <= cy0:  # wholly outside: the nearest edge pixels
        cx0, cy0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
        cx1, cy1 = cx0 + 1, cy0 + 1
    part = rgb[cy0:cy1, cx0:cx1]
    return cv2.copyMakeBorder(part, cy0 - y0, y1 - cy1, cx0 - x0, x1 - cx1,
                              cv2.BORDER_REPLICATE)


def _inside(h: int, w: int, x0: float, y0: float, x1: float, y1: float) -> bool:
    return x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h


def _landmarks(rgb: np.ndarray, face: _Face) -> np.ndarray:
    """The 5 landmarks (5, 2) int, in the image's pixels, predicted inside the face's box."""
    _, predictor = _load()
    h, w = rgb.shape[:2]
    left, top, right, bottom = face.rect
    rect = dlib.rectangle(round(left), round(top), round(right) - 1, round(bottom) - 1)
    g = LANDMARK_CONTEXT * max(right - left, bottom - top)
    x0, y0, x1, y1 = (math.floor(left - g), math.floor(top - g), math.ceil(right + g),
                      math.ceil(bottom + g))
    if _inside(h, w, x0, y0, x1, y1):
        x0 = y0 = 0
        img = rgb
    else:  # the model would read black past the edge; give it the edge pixels instead
        img = _window(rgb, x0, y0, x1, y1)
        rect = dlib.rectangle(rect.left() - x0, rect.top() - y0, rect.right() - x0,
                              rect.bottom() - y0)
    shape = predictor(img, rect)
    return np.array([(p.x + x0, p.y + y0) for p in shape.parts()], dtype=np.int64)


def _shape(points: np.ndarray):
    """A dlib full_object_detection of ``points``."""
    pts = [dlib.point(int(x), int(y)) for x, y in points]
    xs, ys = [p.x for p in pts], [p.y for p in pts]
    return dlib.full_object_detection(dlib.rectangle(min(xs), min(ys), max(xs), max(ys)), pts)


def _chip_details(points: np.ndarray, face: _Face):
    """dlib's chip details for these landmarks (``get_face_chip_details``), enlarged about its
    centre to ``MIN_CHIP_TO_BOX`` times the detector's box where the landmarks make it smaller
    (a turned face: module doc, "Turned faces"). Returns (details, enlarged)."""
    details = dlib.get_face_chip_details(_shape(points), STORE_SIZE, CHIP_PADDING)
    if face.how == "crop":  # the box is the picture, not a face's box
        return details, False
    left, top, right, bottom = face.rect
    want = MIN_CHIP_TO_BOX * (right - left)
    d = details.rect
    side = d.right() - d.left()
    if side >= want:
        return details, False
    cx, cy = (d.left() + d.right()) / 2, (d.top() + d.bottom()) / 2
    rect = dlib.drectangle(cx - want / 2, cy - want / 2, cx + want / 2, cy + want / 2)
    return dlib.chip_details(rect, dlib.chip_dims(STORE_SIZE, STORE_SIZE), details.angle), True


def _moved(details, dx: int, dy: int):
    """The same chip details in a window whose origin is (dx, dy) of the image."""
    r = details.rect
    rect = dlib.drectangle(r.left() - dx, r.top() - dy, r.right() - dx, r.bottom() - dy)
    return dlib.chip_details(rect, dlib.chip_dims(STORE_SIZE, STORE_SIZE), details.angle)


def _chip(rgb: np.ndarray, points: np.ndarray, face: _Face) -> np.ndarray:
    """``dlib.get_face_chip`` of the face with these landmarks (``extract_image_chip`` of its
    chip details, which is what get_face_chip does; at least ``MIN_CHIP_TO_BOX`` times its
    box), edge pixels replicated past the image's edge."""
    details, _ = _chip_details(points, face)
    d = details.rect
    cx, cy = (d.left() + d.right()) / 2, (d.top() + d.bottom()) / 2
    c, s = abs(math.cos(details.angle)), abs(math.sin(details.angle))
    dw, dh = d.right() - d.left(), d.bottom() - d.top()
    hw, hh = (dw * c + dh * s) / 2 + 2, (dw * s + dh * c) / 2 + 2
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = (math.floor(cx - hw), math.floor(cy - hh), math.ceil(cx + hw) + 1,
                      math.ceil(cy + hh) + 1)
    if _inside(h, w, x0, y0, x1, y1):
        return dlib.extract_image_chip(rgb, details)
    # keep the window's origin even so that dlib's 2:1 image pyramid samples the same pixels
    g = int(max(hw, hh) * 0.25) + 2
    x0, y0 = (x0 - g) // 2 * 2, (y0 - g) // 2 * 2
    window = _window(rgb, x0, y0, x1 + g, y1 + g)
    return dlib.extract_image_chip(window, _moved(details, x0, y0))


def find_faces(rgb: np.ndarray, max_faces: int = 10) -> list[Box]:
    """Detected face boxes (x, y, w, h) in ``rgb``'s pixels, biggest first, at most
    ``max_faces`` (the detector and its padded retry only, not the tight-crop rule)."""
    _check("auto", max_faces)
    rgb = _as_rgb(rgb)
    h, w = rgb.shape[:2]
    return [f.box(w, h) for f in _find(rgb, fallback=False)[:max_faces]]


def crop_faces(rgb: np.ndarray, detect: str = "auto", max_faces: int = 10
               ) -> list[tuple[Box | None, np.ndarray]]:
    """[(box or None, aligned uint8 chip (STORE_SIZE, STORE_SIZE, 3))], biggest face first.

    ``detect="auto"``: one aligned chip per face found (at most ``max_faces``) with its box;
    an image taken as a face crop by the tight-crop rule gives one chip with box None; a bigger
    image with no face gives []. ``detect="none"``: the image's centred square, resized
    (:func:`facegrad.data.preprocess.prepare_face`), box None.
    """
    _check(detect, max_faces)
    rgb = _as_rgb(rgb)
    if detect == "none":
        return [(None, prepare_face(rgb))]
    h, w = rgb.shape[:2]
    out = []
    for face in _find(rgb, fallback=True)[:max_faces]:
        chip = _chip(rgb, _landmarks(rgb, face), face)
        out.append((None if face.how == "crop" else face.box(w, h), chip))
    return out


def crop_one(rgb: np.ndarray, detect: str = "auto") -> np.ndarray | None:
    """The chip of an image's biggest face, for building datasets (the same decision as
    :func:`crop_faces`, so that a training image and the same image sent to identify give the
    same chip); None when ``detect="auto"`` finds no face in an image bigger than a face crop."""
    found = crop_faces(rgb, detect, max_faces=1)
    return found[0][1] if found else None
