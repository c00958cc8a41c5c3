"""Face detection and cropping with OpenCV's Haar cascades (shipped with opencv-python).

Nothing is downloaded: the cascades are the XML files under ``cv2.data.haarcascades``.

Detection (:func:`find_faces`)
    The image is turned grey, shrunk so that its longest side is at most ``DETECT_MAX_SIDE``
    (a 40-megapixel upload then costs what a 640×480 one does), histogram-equalised and scanned
    by the frontal cascade ``frontalface_default``. Each box it finds must be confirmed by the
    second frontal cascade, ``frontalface_alt2``, run on the box's surroundings only: the two
    cascades were trained apart and seldom fire on the same non-face. On the 400 bare ORL images
    this finds 363 faces (91 %; ``frontalface_default`` alone at ``minNeighbors=4``: 362), on
    ORL faces with surroundings (×2, inside a larger picture) 373-399 of 400, and on 640×480
    blurred-noise textures (the cascades' worst case) it fired in 11 of 80 images, against 31
    for ``frontalface_default`` alone and 35 for the union of both cascades.
    Boxes overlapping a bigger one are dropped (non-maximum suppression); faces under
    ``1/MIN_FACE_DIVISOR`` of the (shrunk) image's shorter side, or under the cascade's 24 px
    window, are not searched for. Boxes come back as (x, y, w, h) in the original image's pixels,
    biggest first.

Framing (:func:`face_crop`)
    An ORL / AT&T image (92×112) is a tight face crop; stored, it is its centred 92×92 square.
    Placed (×2) inside a larger picture, so that the cascade sees some surroundings as it does in
    a photo, the primary cascade's box on an ORL face is 0.96-0.99 times the image's width, and
    its centre lies 0.07 box heights below the image's centre (the box runs from the brows to the
    chin, the ORL frame from the hair to the chin). A detected face is therefore cropped to the
    square of side ``box * (1 + 2 * margin)`` with ``DEFAULT_MARGIN = 0.02`` (×1.04, i.e. the ORL
    square), centred ``FACE_LIFT = 0.07`` box heights above the box's centre. Over those ORL
    faces this crop is the closest to the image's own stored crop (mean absolute difference 29.8
    grey levels; 33.2 without the lift, 34.5 with ``margin=0.10``, 43.2 with ``0.25``), so a face
    cut out of a photo is framed like the face crops a gallery may have been built from. (On a
    bare ORL image the box is only 0.84 of the width: the frame leaves no room for the larger,
    shifted windows the box is averaged from; such images are used whole anyway, see below.)
    Dataset building and identification both use the default margin.

Alignment (:func:`_eye_angle`)
    Haar cascades give a box, not landmarks; the eye cascades shipped beside them
    (``EYE_CASCADES``) give the eyes. In the top of each face box two eyes a plausible distance
    apart give the face's tilt, and a face leaning at least ``ALIGN_MIN_ANGLE`` (6°) is turned
    level about its crop's centre before it is cut out (:func:`face_crop`). On ORL faces placed
    (×2) in a 640×480 picture the eyes were paired in about 65 % of the faces found, the tilt off
    by 2.5° (median; 5° at the 90th percentile) on upright faces, which the 6° floor therefore
    leaves alone (6 of 89 turned, figures unchanged); faces turned 15° were identified by a model
    trained on the upright ORL images 0.31 of the time aligned against 0.12 unaligned
    (closed-set 0.75 against 0.72), faces turned 8° 0.45 against 0.41. The frontal cascades
    find few faces leaning more than about 20°. The eye search costs about 15 ms per face found
    (a 640×480 photo with two faces: 97 ms against 66 ms without it, on a 2-core VM).

Crops (:func:`is_face_crop`)
    An image is "already a face crop", and used whole, when its shorter side is at most
    ``CROP_MAX_SIDE`` (160 px: too small to be a scene worth searching; ORL images are 92×112;
    no detection is run), or when its aspect ratio w/h is within ``CROP_ASPECT`` (0.6 to 1.4),
    the detector finds a face, and every face found spans at least ``CROP_MIN_FACE`` (50 %) of
    the shorter side, i.e. one face fills the frame. With ``detect="auto"``, an image with no
    face found is used whole when its shorter side is at most ``CROP_FALLBACK_SIDE`` (400 px:
    most likely a face crop the cascade missed, as it misses 9 % of bare ORL images), and is a
    photo without a face when bigger: :func:`crop_faces` returns [] and :func:`crop_one` None.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np

from facegrad.preprocess import prepare_face, square_crop, to_store

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
    "find_tilted_faces",
    "is_face_crop",
]

Box = tuple[int, int, int, int]

DETECT_MODES = ("auto", "none")
DETECT_MAX_SIDE = 640       # longest side of the image the cascades scan
MIN_FACE_DIVISOR = 20       # faces under 1/20 of the shorter side are ignored
MIN_WINDOW = 24             # the primary cascade's window (alt2's is 20)
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 3           # primary cascade (frontalface_default)
VERIFY_NEIGHBORS = 2        # verifying cascade (frontalface_alt2), searched around each box
VERIFY_CONTEXT = 0.5        # ... in the box grown by this share of its side on every side
VERIFY_IOU = 0.4            # ... and must overlap the box by more than this
NMS_IOU = 0.3               # boxes overlapping more than this are one face,
NMS_CONTAINED = 0.6         # as is a box lying mostly (by its area) inside a bigger one

DEFAULT_MARGIN = 0.02       # crop side = box side * (1 + 2 * margin) = ×1.04, the ORL framing
FACE_LIFT = 0.07            # crop centre this many box heights above the box centre

CROP_MAX_SIDE = 160         # shorter side <= this: a face crop, used whole
CROP_ASPECT = (0.6, 1.4)    # w/h of a larger image that may be a face crop ...
CROP_MIN_FACE = 0.5         # ... when all its faces span at least this share of the shorter side
CROP_FALLBACK_SIDE = 400    # "auto", no face found, shorter side <= this: whole image

PRIMARY_CASCADE = "haarcascade_frontalface_default.xml"
VERIFY_CASCADE = "haarcascade_frontalface_alt2.xml"
# eyes, for levelling a tilted face (:func:`_eye_angle`): the glasses-tolerant cascade first
EYE_CASCADES = ("haarcascade_eye_tree_eyeglasses.xml", "haarcascade_eye.xml")
EYE_REGION = 0.6            # eyes are searched in the top 60 % of a face box
EYE_SIZE = (1 / 8, 1 / 3)   # an eye's box, as a share of the face box's width
EYE_SPACING = (0.25, 0.65)  # two eyes' centres lie this share of the box width apart ...
EYE_MAX_SLOPE = 0.6         # ... and at most this times as far apart vertically
ALIGN_MIN_ANGLE = 6.0       # degrees; a face tilted less is cropped as it is

# CascadeClassifier.detectMultiScale is not documented as thread-safe. The classifiers are loaded
# once per process and used under one lock; detectMultiScale already spreads its work over
# OpenCV's own worker threads, so serialising the callers costs little throughput.
_lock = threading.Lock()
_classifiers: tuple[cv2.CascadeClassifier, cv2.CascadeClassifier] | None = None
_eye_classifiers: list[cv2.CascadeClassifier] | None = None


def _cascade(name: str) -> cv2.CascadeClassifier:
    clf = cv2.CascadeClassifier(cv2.data.haarcascades + name)
    if clf.empty():
        raise RuntimeError(f"OpenCV Haar cascade {name} could not be loaded from "
                           f"{cv2.data.haarcascades}")
    return clf


def _load() -> tuple[cv2.CascadeClassifier, cv2.CascadeClassifier]:
    """(primary, verifier), loaded on first use; call with ``_lock`` held."""
    global _classifiers
    if _classifiers is None:
        _classifiers = (_cascade(PRIMARY_CASCADE), _cascade(VERIFY_CASCADE))
    return _classifiers


def _load_eyes() -> list[cv2.CascadeClassifier]:
    """The eye cascades, loaded on first use; call with ``_lock`` held."""
    global _eye_classifiers
    if _eye_classifiers is None:
        _eye_classifiers = [_cascade(name) for name in EYE_CASCADES]
    return _eye_classifiers


def _eye_angle(grey: np.ndarray, box: Box) -> float:
    """How far the face in ``box`` is tilted, in degrees (positive: its eye line falls to the
    right, in image coordinates), from its two eyes; 0 when no plausible pair of eyes is found
    or the tilt is under ``ALIGN_MIN_ANGLE``. Call with ``_lock`` held.

    Eyes are searched in the top ``EYE_REGION`` of the box (histogram-equalised on its own), by
    each of ``EYE_CASCADES`` in turn; the first pair of the four biggest eyes whose centres are
    ``EYE_SPACING`` of the box width apart, and no more than ``EYE_MAX_SLOPE`` as far
    vertically, gives the angle.
    """
    x, y, w, h = box
    roi = grey[y:y + int(EYE_REGION * h), x:x + w]
    if min(roi.shape) < 16:
        return 0.0
    roi = cv2.equalizeHist(np.ascontiguousarray(roi))
    lo, hi = max(8, int(w * EYE_SIZE[0])), max(9, int(w * EYE_SIZE[1]))
    for clf in _load_eyes():
        eyes = clf.detectMultiScale(roi, scaleFactor=SCALE_FACTOR, minNeighbors=MIN_NEIGHBORS,
                                    minSize=(lo, lo), maxSize=(hi, hi))
        centres = [(ex + ew / 2, ey + eh / 2) for ex, ey, ew, eh in
                   sorted((tuple(int(v) for v in e) for e in eyes), key=lambda e: -e[2])[:4]]
        for i, a in enumerate(centres):
            for b in centres[i + 1:]:
                (ax, ay), (bx, by) = sorted((a, b))
                dx, dy = bx - ax, by - ay
                if EYE_SPACING[0] * w <= dx <= EYE_SPACING[1] * w and abs(dy) <= EYE_MAX_SLOPE * dx:
                    angle = float(np.degrees(np.arctan2(dy, dx)))
                    return angle if abs(angle) >= ALIGN_MIN_ANGLE else 0.0
    return 0.0


def _as_rgb(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 view of an RGB, RGBA or greyscale uint8 image."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or min(img.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    return img[:, :, :3]


def _intersection(a: Box, b: Box) -> int:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return iw * ih if iw > 0 and ih > 0 else 0


def _iou(a: Box, b: Box) -> float:
    inter = _intersection(a, b)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter) if inter else 0.0


def _size_order(box: Box) -> tuple[int, int, int]:
    """Sort key: biggest first, then top to bottom, then left to right."""
    return (-box[2] * box[3], box[1], box[0])


def _biggest_first(boxes: list[Box]) -> list[Box]:
    return sorted(boxes, key=_size_order)


def _suppress(boxes: list[Box]) -> list[Box]:
    """Greedy non-maximum suppression, bigger boxes winning; survivors biggest first."""
    kept: list[Box] = []
    for box in _biggest_first(boxes):
        if not any(_iou(box, k) > NMS_IOU
                   or _intersection(box, k) > NMS_CONTAINED * box[2] * box[3] for k in kept):
            kept.append(box)
    return kept


def _verified(grey: np.ndarray, box: Box, verifier: cv2.CascadeClassifier) -> bool:
    """Whether the verifying cascade also finds a face on ``box`` (searched around it only)."""
    x, y, w, h = box
    gh, gw = grey.shape
    g = int(round(VERIFY_CONTEXT * w))
    x0, y0, x1, y1 = max(0, x - g), max(0, y - g), min(gw, x + w + g), min(gh, y + h + g)
    lo, hi = max(20, int(w * 0.6)), int(np.ceil(w * 1.6))
    found = verifier.detectMultiScale(grey[y0:y1, x0:x1], scaleFactor=SCALE_FACTOR,
                                      minNeighbors=VERIFY_NEIGHBORS, minSize=(lo, lo),
                                      maxSize=(hi, hi))
    local = (x - x0, y - y0, w, h)
    return any(_iou(local, tuple(int(v) for v in f)) > VERIFY_IOU for f in found)


@dataclass(frozen=True)
class _Found:
    """The faces :func:`_detect` found in an image; their tilts are measured on demand, so
    that faces beyond ``max_faces``, and images used whole, cost no eye search."""

    boxes: list[Box]  # in the image's pixels, biggest first
    scanned: list[Box]  # the same faces in the image the cascades scanned
    grey: np.ndarray | None  # that image, before histogram equalisation

    def tilted(self, max_faces: int) -> list[tuple[Box, float]]:
        """(box, tilt in degrees, :func:`_eye_angle`) of the first ``max_faces`` faces."""
        with _lock:
            return [(box, _eye_angle(self.grey, scanned))
                    for box, scanned in zip(self.boxes[:max_faces], self.scanned)]


_NONE_FOUND = _Found([], [], None)


def _detect(rgb: np.ndarray) -> _Found:
    """All faces of an (H, W, 3) uint8 image, biggest first, in its own pixel coordinates."""
    h, w = rgb.shape[:2]
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    if min(grey.shape) < MIN_WINDOW:
        return _NONE_FOUND
    raw, grey = grey, cv2.equalizeHist(grey)
    min_side = max(MIN_WINDOW, round(min(grey.shape) / MIN_FACE_DIVISOR))
    with _lock:
        primary, verifier = _load()
        found = primary.detectMultiScale(grey, scaleFactor=SCALE_FACTOR,
                                         minNeighbors=MIN_NEIGHBORS, minSize=(min_side, min_side))
        candidates = [b for b in (tuple(int(v) for v in f) for f in found)
                      if _verified(grey, b, verifier)]
    faces = []  # (box in the image's pixels, box in the scanned image)
    for x, y, bw, bh in _suppress(candidates):
        x0, y0 = max(0, round(x / scale)), max(0, round(y / scale))
        x1, y1 = min(w, round((x + bw) / scale)), min(h, round((y + bh) / scale))
        if x1 > x0 and y1 > y0:
            faces.append(((x0, y0, x1 - x0, y1 - y0), (x, y, bw, bh)))
    faces.sort(key=lambda f: _size_order(f[0]))
    return _Found([b for b, _ in faces], [b for _, b in faces], raw)


def find_faces(rgb: np.ndarray, max_faces: int = 10) -> list[Box]:
    """Face boxes (x, y, w, h) in ``rgb``'s pixel coordinates, biggest first, at most max_faces."""
    if max_faces < 1:
        raise ValueError("max_faces must be at least 1")
    return _detect(_as_rgb(rgb)).boxes[:max_faces]


def find_tilted_faces(rgb: np.ndarray, max_faces: int = 10) -> list[tuple[Box, float]]:
    """(box, tilt in degrees) per face, as :func:`find_faces`; the tilt is 0 unless both eyes
    were found and the face leans at least ``ALIGN_MIN_ANGLE``."""
    if max_faces < 1:
        raise ValueError("max_faces must be at least 1")
    return _detect(_as_rgb(rgb)).tilted(max_faces)


def _crop_rule(rgb: np.ndarray) -> tuple[bool, _Found]:
    """(whether the image is a face crop, the faces found: none when detection was not run)."""
    h, w = rgb.shape[:2]
    short = min(h, w)
    if short <= CROP_MAX_SIDE:
        return True, _NONE_FOUND
    found = _detect(rgb)
    crop = (CROP_ASPECT[0] <= w / h <= CROP_ASPECT[1] and bool(found.boxes)
            and all(min(b[2], b[3]) >= CROP_MIN_FACE * short for b in found.boxes))
    return crop, found


def is_face_crop(rgb: np.ndarray) -> bool:
    """Whether ``rgb`` already is a face crop, to be used whole (rule in the module doc)."""
    return _crop_rule(_as_rgb(rgb))[0]


def face_crop(rgb: np.ndarray, box: Box, margin: float = DEFAULT_MARGIN,
              angle: float = 0.0) -> np.ndarray:
    """Stored-format crop (STORE_SIZE², 3) of the face in ``box``, framed like an ORL image;
    with ``angle`` (degrees, :func:`find_tilted_faces`) turned about the crop's centre so that
    the eyes are level."""
    x, y, w, h = box
    framed = (x, int(round(y - FACE_LIFT * h)), w, h)
    rgb = _as_rgb(rgb)
    if not angle:
        return prepare_face(rgb, framed, margin)
    # a window half as large again as the crop, turned, then the crop cut from its middle
    window = square_crop(rgb, framed, (1.5 * (1 + 2 * margin) - 1) / 2)
    side = window.shape[0]
    turn = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
    window = cv2.warpAffine(np.ascontiguousarray(window), turn, (side, side),
                            flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inner = int(round(max(w, h) * (1 + 2 * margin)))
    o = (side - inner) // 2
    return to_store(window[o:o + inner, o:o + inner])


def _check(detect: str, max_faces: int = 1) -> None:
    if detect not in DETECT_MODES:
        raise ValueError(f"detect must be one of {DETECT_MODES}, got {detect!r}")
    if max_faces < 1:
        raise ValueError("max_faces must be at least 1")


def _faces_to_crop(rgb: np.ndarray) -> _Found | None:
    """The "auto" decision: None to use the whole image, else the faces to crop (maybe none)."""
    crop, found = _crop_rule(rgb)
    if crop or (not found.boxes and min(rgb.shape[:2]) <= CROP_FALLBACK_SIDE):
        return None
    return found


def crop_faces(rgb: np.ndarray, detect: str = "auto", max_faces: int = 10,
               margin: float = DEFAULT_MARGIN) -> list[tuple[Box | None, np.ndarray]]:
    """[(box or None, stored-format uint8 crop)] for the faces of an image, biggest first.

    ``detect="none"``: the whole image, box None. ``"auto"``: the whole image (box None) when it
    already is a face crop (:func:`is_face_crop`) or when no face is found in an image whose
    shorter side is at most ``CROP_FALLBACK_SIDE`` (most likely a face crop the detector missed);
    otherwise one crop per detected face, at most ``max_faces``, and an empty list when a larger
    photo holds no face (the caller reports it). ``margin`` should stay the default: dataset
    building (:func:`crop_one`) crops with it.
    """
    _check(detect, max_faces)
    rgb = _as_rgb(rgb)
    faces = None if detect == "none" else _faces_to_crop(rgb)
    if faces is None:
        return [(None, prepare_face(rgb))]
    return [(box, face_crop(rgb, box, margin, angle)) for box, angle in faces.tilted(max_faces)]


def crop_one(rgb: np.ndarray, detect: str = "auto") -> np.ndarray | None:
    """The stored-format crop of an image's biggest face, for building datasets.

    The same decision as :func:`crop_faces`, so that a training image and the same image sent
    to identify give the same crop: the whole image when ``detect="none"``, when it is a face
    crop, or when no face is found and its shorter side is at most ``CROP_FALLBACK_SIDE``; None
    for a bigger photo with no face.
    """
    found = crop_faces(rgb, detect, max_faces=1)
    return found[0][1] if found else None
