"""Face detection and cropping with OpenCV's Haar cascades (shipped with opencv-python).

Nothing is downloaded: the cascades are the XML files under ``cv2.data.haarcascades``.

Detection (:func:`find_faces`)
    The image is turned grey, shrunk so that its longest side is at most ``DETECT_MAX_SIDE``
    (bounds the runtime of a 40-megapixel upload to that of a 640×480 one), histogram-equalised
    and scanned by the frontal cascades ``frontalface_default`` (primary) and
    ``frontalface_alt2`` (recall). Overlapping boxes are merged by non-maximum suppression, the
    primary cascade's box winning, so the framing below is calibrated on one cascade. Faces whose
    side is under ``1/MIN_FACE_DIVISOR`` of the image's shorter side are ignored. Boxes come back
    as (x, y, w, h) in the original image's pixels, biggest first.

Framing (:func:`face_crop`)
    An ORL / AT&T image (92×112) is a tight face crop; as a stored crop it is its centred 92×92
    square. Measured on the 400 ORL images, the default cascade's box is 76.6 px wide (square), so
    that square is the box grown ×1.20, and the box's centre sits 5 px (0.07 box heights) below
    the image's centre (the cascade's box runs from the brows to the chin, an ORL frame from the
    hair to the chin). A detected face is therefore cropped to the square of side
    ``box * (1 + 2 * margin)`` with ``DEFAULT_MARGIN = 0.10`` (×1.20), centred ``FACE_LIFT = 0.07``
    box heights above the box's centre. Over the ORL images this framing is the closest to the
    whole-image crop (mean absolute difference 26 grey levels against 29 without the lift and 36
    with ``margin=0.25``), so a face cut from a photo looks like the face crops a gallery was built
    from. Dataset building and identification both use the default margin.

Crops (:func:`is_face_crop`)
    An image is "already a face crop", and used whole, when its shorter side is at most
    ``CROP_MAX_SIDE`` (160 px: too small to hold a scene worth searching; ORL images are 92×112),
    or when its aspect ratio (w/h) is within ``CROP_ASPECT`` and the detector finds a face and
    every face it finds is at least ``CROP_MIN_FACE`` (50 %) of the shorter side, i.e. one face
    fills the frame. A bigger image with no face found is a photo without a face, not a crop.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from facegrad.preprocess import prepare_face

__all__ = [
    "CROP_FALLBACK_SIDE",
    "CROP_MAX_SIDE",
    "DEFAULT_MARGIN",
    "DETECT_MAX_SIDE",
    "DETECT_MODES",
    "Box",
    "crop_faces",
    "crop_one",
    "face_crop",
    "find_faces",
    "is_face_crop",
]

Box = tuple[int, int, int, int]

DETECT_MODES = ("auto", "none")
DETECT_MAX_SIDE = 640       # longest side of the image the cascades scan
MIN_FACE_DIVISOR = 20       # faces under 1/20 of the shorter side are ignored
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 4           # ORL: 362/400 found by the default cascade (3: 371, 5: 353)
NMS_IOU = 0.3               # boxes overlapping more than this are one face ...
NMS_CONTAINED = 0.6         # ... as is a box lying mostly (by its area) inside a kept one

DEFAULT_MARGIN = 0.10       # square side = box side * 1.2, the ORL framing (see module doc)
FACE_LIFT = 0.07            # crop centre this many box heights above the box centre

CROP_MAX_SIDE = 160         # shorter side <= this: a face crop, used whole
CROP_ASPECT = (0.6, 1.4)    # w/h of an image that may be a (larger) face crop
CROP_MIN_FACE = 0.5         # ... when all its faces are at least this share of the shorter side
CROP_FALLBACK_SIDE = 400    # crop_one: no face found, shorter side <= this → whole image

# (cascade file, minNeighbors), the primary cascade first: it wins ties in the suppression.
_CASCADES = (
    ("haarcascade_frontalface_default.xml", MIN_NEIGHBORS),
    ("haarcascade_frontalface_alt2.xml", MIN_NEIGHBORS),
)

# CascadeClassifier.detectMultiScale is not documented as thread-safe. The classifiers are loaded
# once per process and used under one lock; detectMultiScale already spreads its scales over
# OpenCV's own worker threads, so serialising callers costs little throughput.
_lock = threading.Lock()
_classifiers: list[tuple[cv2.CascadeClassifier, int]] | None = None


def _load() -> list[tuple[cv2.CascadeClassifier, int]]:
    global _classifiers
    if _classifiers is None:  # called with _lock held
        loaded = []
        for name, neighbours in _CASCADES:
            clf = cv2.CascadeClassifier(cv2.data.haarcascades + name)
            if clf.empty():
                raise RuntimeError(f"OpenCV Haar cascade {name} could not be loaded from "
                                   f"{cv2.data.haarcascades}")
            loaded.append((clf, neighbours))
        _classifiers = loaded
    return _classifiers


def _as_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or min(img.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return img


def _grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def _overlaps(a: Box, b: Box) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = min(ax + aw, bx + bw) - max(ax, bx)
    ih = min(ay + ah, by + bh) - max(ay, by)
    if iw <= 0 or ih <= 0:
        return False
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter > NMS_IOU * union or inter > NMS_CONTAINED * min(aw * ah, bw * bh)


def _suppress(candidates: list[Box]) -> list[Box]:
    """Greedy NMS over boxes in priority order; the survivors come back biggest first."""
    kept: list[Box] = []
    for box in candidates:
        if not any(_overlaps(box, k) for k in kept):
            kept.append(box)
    return sorted(kept, key=lambda b: (-b[2] * b[3], b[1], b[0]))


def _detect(rgb: np.ndarray) -> list[Box]:
    """All faces of an (H, W, 3) uint8 image, biggest first, in its own pixel coordinates."""
    h, w = rgb.shape[:2]
    grey = _grey(rgb)
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    grey = cv2.equalizeHist(grey)
    gh, gw = grey.shape
    min_side = max(1, round(min(gh, gw) / MIN_FACE_DIVISOR))
    if min(gh, gw) < 20:  # smaller than the cascades' window: nothing to scan
        return []
    candidates: list[Box] = []
    with _lock:
        for clf, neighbours in _load():
            found = clf.detectMultiScale(grey, scaleFactor=SCALE_FACTOR, minNeighbors=neighbours,
                                         minSize=(min_side, min_side))
            # within one cascade, bigger boxes first
            for x, y, bw, bh in sorted((tuple(int(v) for v in f) for f in found),
                                       key=lambda b: -b[2] * b[3]):
                candidates.append((x, y, bw, bh))
    boxes = []
    for x, y, bw, bh in _suppress(candidates):
        x0, y0 = max(0, round(x / scale)), max(0, round(y / scale))
        x1, y1 = min(w, round((x + bw) / scale)), min(h, round((y + bh) / scale))
        if x1 > x0 and y1 > y0:
            boxes.append((x0, y0, x1 - x0, y1 - y0))
    return sorted(boxes, key=lambda b: (-b[2] * b[3], b[1], b[0]))


def find_faces(rgb: np.ndarray, max_faces: int = 10) -> list[Box]:
    """Face boxes (x, y, w, h) in ``rgb``'s pixel coordinates, biggest first, at most max_faces."""
    if max_faces < 1:
        raise ValueError("max_faces must be at least 1")
    return _detect(_as_rgb(rgb))[:max_faces]


def _crop_rule(rgb: np.ndarray) -> tuple[bool, list[Box] | None]:
    """(is the image a face crop, all faces found or None when detection was not needed)."""
    h, w = rgb.shape[:2]
    short = min(h, w)
    if short <= CROP_MAX_SIDE:
        return True, None
    faces = _detect(rgb)
    crop = (CROP_ASPECT[0] <= w / h <= CROP_ASPECT[1] and bool(faces)
            and all(min(b[2], b[3]) >= CROP_MIN_FACE * short for b in faces))
    return crop, faces


def is_face_crop(rgb: np.ndarray) -> bool:
    """Whether ``rgb`` already is a face crop, to be used whole (rule in the module doc)."""
    return _crop_rule(_as_rgb(rgb))[0]


def face_crop(rgb: np.ndarray, box: Box, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """Stored-format crop (STORE_SIZE², 3) of the face in ``box``, framed like an ORL image."""
    x, y, w, h = box
    return prepare_face(_as_rgb(rgb), (x, int(round(y - FACE_LIFT * h)), w, h), margin)


def _check_mode(detect: str) -> None:
    if detect not in DETECT_MODES:
        raise ValueError(f"detect must be one of {DETECT_MODES}, got {detect!r}")


def crop_faces(rgb: np.ndarray, detect: str = "auto", max_faces: int = 10,
               margin: float = DEFAULT_MARGIN) -> list[tuple[Box | None, np.ndarray]]:
    """[(box or None, stored-format uint8 crop)] for the faces of an image, biggest first.

    ``detect="none"``: the whole image, box None. ``"auto"``: the whole image (box None) when it
    already is a face crop (:func:`is_face_crop`), otherwise one crop per detected face, at most
    ``max_faces``; an empty list when a photo holds no face.
    """
    _check_mode(detect)
    if max_faces < 1:
        raise ValueError("max_faces must be at least 1")
    rgb = _as_rgb(rgb)
    if detect == "none":
        return [(None, prepare_face(rgb))]
    crop, faces = _crop_rule(rgb)
    if crop:
        return [(None, prepare_face(rgb))]
    return [(box, face_crop(rgb, box, margin)) for box in (faces or [])[:max_faces]]


def crop_one(rgb: np.ndarray, detect: str = "auto") -> np.ndarray | None:
    """The stored-format crop of an image's biggest face, for building datasets.

    The whole image when ``detect="none"``, when it is a face crop, or when no face is found and
    its shorter side is at most ``CROP_FALLBACK_SIDE``; None for a bigger photo with no face.
    """
    _check_mode(detect)
    rgb = _as_rgb(rgb)
    if detect == "none":
        return prepare_face(rgb)
    crop, faces = _crop_rule(rgb)
    if crop:
        return prepare_face(rgb)
    if faces:
        return face_crop(rgb, faces[0])
    if min(rgb.shape[:2]) <= CROP_FALLBACK_SIDE:
        return prepare_face(rgb)
    return None
