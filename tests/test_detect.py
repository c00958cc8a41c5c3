"""Face detection and cropping on real ORL faces pasted into synthetic photos."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facegrad import detect
from facegrad.detect import (
    CROP_FALLBACK_SIDE,
    DEFAULT_MARGIN,
    crop_faces,
    crop_one,
    face_crop,
    find_faces,
    find_tilted_faces,
    is_face_crop,
)
from facegrad.preprocess import STORE_SIZE, prepare_face

ORL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "att_faces"
needs_orl = pytest.mark.skipif(not ORL_DIR.is_dir(), reason=f"shared ORL data not at {ORL_DIR}")

Rect = tuple[int, int, int, int]


def orl(subject: int, image: int = 1, scale: float = 1.0) -> np.ndarray:
    """An ORL image as (H, W, 3) uint8, optionally enlarged."""
    img = Image.open(ORL_DIR / f"s{subject:02d}" / f"{image:02d}.png").convert("RGB")
    if scale != 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)),
                         Image.Resampling.BICUBIC)
    return np.asarray(img)


def background(w: int, h: int, kind: str, seed: int = 0) -> np.ndarray:
    if kind == "grey":
        return np.full((h, w, 3), 128, np.uint8)
    rng = np.random.default_rng(seed)
    grey = np.clip(rng.normal(128, 12, (h, w)), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def paste(canvas: np.ndarray, face: np.ndarray, x: int, y: int) -> Rect:
    h, w = face.shape[:2]
    canvas[y:y + h, x:x + w] = face
    return (x, y, w, h)


def iou(a: Rect, b: Rect) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


# Two people, the first one bigger: (subject, scale, x, y) each; checked on both backgrounds.
LAYOUTS = {
    "left-big": ((1, 2.0, 40, 120), (2, 1.6, 420, 150)),
    "right-big": ((3, 2.0, 380, 200), (4, 1.6, 30, 60)),
}


def two_face_photo(layout: str = "left-big", kind: str = "grey"):
    """640×480 photo with two ORL people; their pasted rectangles, bigger first."""
    img = background(640, 480, kind)
    rects = [paste(img, orl(s, 1, scale), x, y) for s, scale, x, y in LAYOUTS[layout]]
    return img, rects


@needs_orl
@pytest.mark.parametrize("kind", ["grey", "noise"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_faces_found_biggest_first(layout, kind):
    img, rects = two_face_photo(layout, kind)
    boxes = find_faces(img)
    assert len(boxes) == 2, boxes
    for box, rect in zip(boxes, rects):
        assert iou(box, rect) >= 0.3, (box, rect)
        assert all(isinstance(v, int) for v in box)
    assert boxes[0][2] * boxes[0][3] > boxes[1][2] * boxes[1][3]
    assert find_faces(img, max_faces=1) == boxes[:1]


@needs_orl
def test_crop_faces_crops_each_face_like_its_orl_image():
    img, rects = two_face_photo()
    found = crop_faces(img, "auto")
    assert [box for box, _ in found] == find_faces(img)
    assert len(found) == 2
    for (box, crop), (_, angle) in zip(found, find_tilted_faces(img)):
        assert crop.shape == (STORE_SIZE, STORE_SIZE, 3) and crop.dtype == np.uint8
        assert angle == 0.0  # upright faces are cut out as they are
        assert np.array_equal(crop, face_crop(img, box))
    # Each crop is framed like its person's own ORL image (which is stored whole) and is closer
    # to it than to the other person's, and closer than a loose crop would be.
    refs = [prepare_face(orl(s, 1, scale)).astype(float) for s, scale, _, _ in LAYOUTS["left-big"]]
    for i, (box, crop) in enumerate(found):
        own = np.abs(crop.astype(float) - refs[i]).mean()
        other = np.abs(crop.astype(float) - refs[1 - i]).mean()
        loose = np.abs(face_crop(img, box, margin=0.25).astype(float) - refs[i]).mean()
        assert own < other and own < loose, (own, other, loose)
    assert len(crop_faces(img, "auto", max_faces=1)) == 1
    assert np.array_equal(crop_one(img), found[0][1])


def tilted_photo(subject: int, angle: float) -> np.ndarray:
    """640×480 grey picture with an ORL face (×2) turned ``angle`` degrees anticlockwise."""
    face = Image.fromarray(orl(subject, 1, 2.0)).rotate(
        angle, resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128))
    img = background(640, 480, "grey")
    paste(img, np.asarray(face), 200, 100)
    return img


@needs_orl
@pytest.mark.parametrize("subject", [7, 11, 12])
def test_tilted_face_is_levelled_by_its_eyes(subject):
    upright = crop_faces(tilted_photo(subject, 0), "auto")
    assert find_tilted_faces(tilted_photo(subject, 0))[0][1] == 0.0
    ref = upright[0][1].astype(float)
    for turn in (15, -15):
        img = tilted_photo(subject, turn)
        (box, angle), = find_tilted_faces(img, 1)
        # anticlockwise in the picture: the eye line rises to the right (negative in image
        # coordinates); found within a few degrees
        assert abs(angle + turn) <= 4.5, (turn, angle)
        (_, crop), = crop_faces(img, "auto", 1)
        assert np.array_equal(crop, face_crop(img, box, angle=angle))
        aligned = np.abs(crop.astype(float) - ref).mean()
        plain = np.abs(face_crop(img, box).astype(float) - ref).mean()
        assert aligned < 0.8 * plain, (turn, aligned, plain)


@needs_orl
@pytest.mark.parametrize("subject", [1, 17, 35])
def test_orl_image_is_used_whole(subject):
    for image in range(1, 11):
        rgb = orl(subject, image)
        assert is_face_crop(rgb)
        found = crop_faces(rgb, "auto")
        assert len(found) == 1 and found[0][0] is None
        assert np.array_equal(found[0][1], prepare_face(rgb))
        assert np.array_equal(crop_one(rgb), prepare_face(rgb))


@needs_orl
def test_enlarged_face_crop_is_used_whole():
    rgb = orl(1, 1, 2.0)  # 184×224: too big for the size rule, one face fills it
    assert len(find_faces(rgb)) == 1
    assert is_face_crop(rgb)
    assert [box for box, _ in crop_faces(rgb)] == [None]


def test_blank_photo_has_no_face():
    blank = np.full((600, 800, 3), 128, np.uint8)
    assert find_faces(blank) == []
    assert not is_face_crop(blank)
    assert crop_faces(blank, "auto") == []
    assert crop_one(blank) is None


def test_small_image_without_face_is_used_whole():
    img = np.full((CROP_FALLBACK_SIDE, 300, 3), 90, np.uint8)
    found = crop_faces(img)
    assert len(found) == 1 and found[0][0] is None
    assert np.array_equal(found[0][1], prepare_face(img))
    assert crop_one(img) is not None


@needs_orl
def test_detect_none_uses_whole_image():
    img, _ = two_face_photo()
    found = crop_faces(img, "none")
    assert len(found) == 1 and found[0][0] is None
    assert np.array_equal(found[0][1], prepare_face(img))
    assert np.array_equal(crop_one(img, "none"), prepare_face(img))


class _Spy:
    """Stands in for a cascade and records the shape of every image it scans."""

    def __init__(self, clf, shapes):
        self.clf, self.shapes = clf, shapes

    def detectMultiScale(self, image, **kw):  # noqa: N802 (OpenCV's name)
        self.shapes.append(image.shape)
        return self.clf.detectMultiScale(image, **kw)


@needs_orl
def test_large_photo_is_downscaled_and_boxes_are_in_original_pixels(monkeypatch):
    img = background(4000, 3000, "grey")
    rect = paste(img, orl(5, 1, 6.0), 2300, 900)  # 552×672
    primary, verifier = detect._load()
    scanned: list[tuple[int, ...]] = []
    monkeypatch.setattr(detect, "_load", lambda: (_Spy(primary, scanned), verifier))
    boxes = find_faces(img)
    assert scanned and max(scanned[0]) <= 640
    assert len(boxes) == 1
    x, y, w, h = boxes[0]
    assert iou(boxes[0], rect) >= 0.3, (boxes[0], rect)
    assert 0 <= x and x + w <= 4000 and 0 <= y and y + h <= 3000
    crop = crop_one(img)
    assert crop is not None and crop.shape == (STORE_SIZE, STORE_SIZE, 3)


@needs_orl
def test_greyscale_input_and_concurrent_calls():
    img, _ = two_face_photo()
    expected = find_faces(img)
    assert find_faces(img[:, :, 0].copy()) == expected
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: find_faces(img), range(8)))
    assert all(r == expected for r in results)


def test_bad_arguments():
    img = np.zeros((200, 200, 3), np.uint8)
    with pytest.raises(ValueError):
        crop_faces(img, "always")
    with pytest.raises(ValueError):
        crop_one(img, "")
    with pytest.raises(ValueError):
        find_faces(img, max_faces=0)
    with pytest.raises(ValueError):
        find_faces(img.astype(np.float32))
    assert 0 <= DEFAULT_MARGIN < 0.25
