"""Face detection and alignment (dlib HOG + 5 landmarks) on real ORL faces."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from PIL import Image

from facegrad.data.preprocess import STORE_SIZE, prepare_face
from facegrad.recognition import detect
from facegrad.recognition.detect import CROP_MAX_SIDE, crop_faces, crop_one, find_faces
from tests.harness import ORL, orl_folder
from tests.scenes import paste as place

needs_orl = pytest.mark.skipif(not ORL.is_dir(), reason=f"shared ORL data not at {ORL}")

W, H = 640, 480


def orl(subject: int, image: int = 1) -> np.ndarray:
    """An ORL image (92×112) as (H, W, 3) uint8."""
    return np.asarray(Image.open(ORL / f"s{subject:02d}" / f"{image:02d}.png").convert("RGB"))


def backdrop(seed: int = 0, w: int = W, h: int = H) -> np.ndarray:
    """A textured RGB picture without a face: blurred noise at two scales, tinted."""
    rng = np.random.default_rng(seed)
    fine = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 2)
    coarse = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 8)
    g = cv2.normalize(fine / fine.std() + 2 * coarse / coarse.std(), None, 0, 255,
                      cv2.NORM_MINMAX)
    return np.clip(g[:, :, None] * np.array([1.0, 0.9, 0.8], np.float32), 0, 255).astype(np.uint8)


def contains(box, x: float, y: float) -> bool:
    bx, by, bw, bh = box
    return bx <= x < bx + bw and by <= y < by + bh


def eye_angle(points: np.ndarray) -> float:
    """Degrees of the line from the image-left eye to the image-right eye (5-point model: two
    landmarks per eye, then the nose)."""
    a, b = sorted([points[0:2].mean(0), points[2:4].mean(0)], key=lambda p: p[0])
    return float(np.degrees(np.arctan2(b[1] - a[1], b[0] - a[0])))


def landmarks(rgb: np.ndarray) -> np.ndarray:
    """The 5 landmarks of the biggest face found."""
    face = detect._find(rgb, fallback=True)[0]
    return detect._landmarks(rgb, face)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


def is_chip(chip: np.ndarray) -> bool:
    return chip.shape == (STORE_SIZE, STORE_SIZE, 3) and chip.dtype == np.uint8


def test_chip_size_is_dlibs():
    assert STORE_SIZE == 150


@needs_orl
def test_every_bare_orl_image_gives_one_chip():
    folder = orl_folder()
    assert sum(len(v) for v in folder.values()) == 400
    for paths in folder.values():
        for path in paths:
            rgb = np.asarray(Image.open(path).convert("RGB"))
            found = crop_faces(rgb)
            assert len(found) == 1, path
            box, chip = found[0]
            assert is_chip(chip)
            if box is not None:  # detected (directly or with the padded retry)
                assert all(isinstance(v, int) for v in box)
                assert contains(box, 46, 60), (path, box)  # around the image's middle


@needs_orl
@pytest.mark.parametrize("subject", [1, 17, 33])
def test_crop_one_is_crop_faces_first_chip(subject):
    for image in (1, 4, 8):
        rgb = orl(subject, image)
        assert np.array_equal(crop_one(rgb), crop_faces(rgb)[0][1])


@needs_orl
@pytest.mark.parametrize("subject", [1, 12, 25, 38])
@pytest.mark.parametrize("height", [80, 120, 200])
def test_placed_face_is_found_and_aligned(subject, height):
    """An ORL face placed in a 640×480 textured picture, upright and turned ±15°: one box,
    around the face; the landmarks turn with it; the chip of the turned face is the chip of
    the upright face (the turn is undone), much closer to it than the upright chip turned."""
    bare_angle = eye_angle(landmarks(orl(subject)))
    cx, cy = 300, 250
    chips = {}
    for turn in (0, 15, -15):
        img = backdrop(subject)
        place(img, orl(subject), height, cx, cy, turn)
        boxes = find_faces(img)
        assert len(boxes) == 1, (turn, boxes)
        box = boxes[0]
        assert contains(box, cx, cy), (turn, box)
        assert 0.4 * height <= box[2] <= 1.1 * height, (turn, box)
        # anticlockwise in the picture: the eye line rises to the right (negative angle)
        assert abs(eye_angle(landmarks(img)) - (bare_angle - turn)) <= 4.0, turn
        (found_box, chip), = crop_faces(img)
        assert found_box == box and is_chip(chip)
        chips[turn] = chip
    for turn in (15, -15):
        m = cv2.getRotationMatrix2D((STORE_SIZE / 2, STORE_SIZE / 2), turn, 1.0)
        unaligned = cv2.warpAffine(chips[0], m, (STORE_SIZE, STORE_SIZE),
                                   borderMode=cv2.BORDER_REPLICATE)
        aligned_err, unaligned_err = mad(chips[turn], chips[0]), mad(unaligned, chips[0])
        assert aligned_err < 0.5 * unaligned_err, (turn, aligned_err, unaligned_err)
        assert aligned_err < 15, (turn, aligned_err)


@needs_orl
@pytest.mark.parametrize("big_left", [True, False])
def test_two_faces_biggest_first(big_left):
    img = backdrop(7)
    big, small = ((160, 240), (470, 240)) if big_left else ((470, 240), (160, 240))
    place(img, orl(3), 170, *big)
    place(img, orl(4), 100, *small)
    boxes = find_faces(img)
    assert len(boxes) == 2, boxes
    assert contains(boxes[0], *big) and contains(boxes[1], *small), boxes
    assert boxes[0][2] * boxes[0][3] > boxes[1][2] * boxes[1][3]
    assert find_faces(img, max_faces=1) == boxes[:1]
    found = crop_faces(img)
    assert [b for b, _ in found] == boxes and all(is_chip(c) for _, c in found)
    assert len(crop_faces(img, max_faces=1)) == 1
    assert np.array_equal(crop_one(img), found[0][1])


@needs_orl
def test_big_photo_boxes_are_in_its_own_pixels():
    img = backdrop(3, 3000, 2000)
    place(img, orl(5), 700, 2100, 900)
    (box,) = find_faces(img)
    assert contains(box, 2100, 900) and 300 <= box[2] <= 770, box
    (found_box, chip), = crop_faces(img)
    assert found_box == box and is_chip(chip)


@needs_orl
def test_face_at_the_edge_gets_a_full_chip():
    """The chip reaches past the image's edge: filled from the edge pixels, not black."""
    img = backdrop(4)
    place(img, orl(9), 150, 40, 240)
    (box, chip), = crop_faces(img)
    assert contains(box, 40, 240)
    assert is_chip(chip) and (chip.max(axis=2) == 0).mean() < 0.01


@pytest.mark.parametrize("shape", [(480, 640), (600, 800), (CROP_MAX_SIDE + 1, CROP_MAX_SIDE + 1)])
def test_picture_without_a_face_gives_nothing(shape):
    noise = backdrop(11, shape[1], shape[0])
    for img in (noise, np.full(shape + (3,), 128, np.uint8)):
        assert find_faces(img) == []
        assert crop_faces(img) == []
        assert crop_one(img) is None


def test_small_image_without_a_face_is_taken_as_a_face_crop():
    """The tight-crop rule: no face found, longest side <= CROP_MAX_SIDE, sides within 2×."""
    img = backdrop(5, 120, 150)
    assert find_faces(img) == []
    (box, chip), = crop_faces(img)
    assert box is None and is_chip(chip)
    assert crop_one(img) is not None
    assert crop_faces(backdrop(5, CROP_MAX_SIDE, 100)) == []  # too elongated for a face crop


@needs_orl
def test_grey_and_rgba_inputs():
    img = backdrop(6)
    place(img, orl(2), 140, 320, 240)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    rgb_of_grey = np.repeat(grey[:, :, None], 3, axis=2)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    ref = crop_faces(img)
    assert len(ref) == 1
    out = crop_faces(rgba)
    assert [b for b, _ in out] == [b for b, _ in ref]
    assert np.array_equal(out[0][1], ref[0][1])
    for g in (grey, grey[:, :, None]):
        out = crop_faces(g)
        assert [b for b, _ in out] == [b for b, _ in crop_faces(rgb_of_grey)]
        assert is_chip(out[0][1]) and np.array_equal(out[0][1], crop_faces(rgb_of_grey)[0][1])
    assert is_chip(crop_one(orl(2)[:, :, 0]))


@needs_orl
def test_detect_none_uses_the_whole_image():
    img = backdrop(8)
    place(img, orl(3), 170, 160, 240)
    place(img, orl(4), 100, 470, 240)
    found = crop_faces(img, "none")
    assert len(found) == 1 and found[0][0] is None
    assert np.array_equal(found[0][1], prepare_face(img)) and is_chip(found[0][1])
    assert np.array_equal(crop_one(img, "none"), prepare_face(img))
    noise = backdrop(9)
    assert np.array_equal(crop_one(noise, "none"), prepare_face(noise))


@needs_orl
def test_concurrent_calls_agree():
    imgs = []
    for k in range(6):
        img = backdrop(20 + k)
        place(img, orl(10 + k), 130, 320, 240, (-1) ** k * 10)
        imgs.append(img)
    serial = [crop_faces(i) for i in imgs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(crop_faces, imgs))
    for s, p in zip(serial, parallel):
        assert [b for b, _ in s] == [b for b, _ in p]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(s, p))


def test_bad_arguments():
    img = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(ValueError):
        crop_faces(img, "haar")
    with pytest.raises(ValueError):
        crop_one(img, "yes")
    for n in (0, -1):
        with pytest.raises(ValueError):
            crop_faces(img, max_faces=n)
        with pytest.raises(ValueError):
            find_faces(img, max_faces=n)
    with pytest.raises(ValueError):
        find_faces(img.astype(np.float32))
    with pytest.raises(ValueError):
        crop_faces(np.zeros((5, 5, 2), np.uint8))


CFP = ORL.parent / "cfp_dev"


def chip_and_box(path) -> tuple[float, float, bool]:
    """(chip side, box width, enlarged) of the biggest face of a cfp_dev photo, in its pixels."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    face = detect._find(rgb, fallback=True)[0]
    details, enlarged = detect._chip_details(detect._landmarks(rgb, face), face)
    r = details.rect
    return r.right() - r.left(), face.rect[2] - face.rect[0], enlarged


def test_turned_faces_chip_spans_their_box_and_frontal_chips_stay_dlibs():
    """A profile's landmark chip is zoomed in on the near eye (its eye corners foreshorten): it
    is enlarged to span at least the detector's box. Frontal faces' chips span more than their
    box already and stay dlib's (module doc, "Turned faces")."""
    people = [f"{p:03d}" for p in range(1, 251, 25)]
    profiles = [chip_and_box(CFP / p / "profile_01.jpg") for p in people]
    frontals = [chip_and_box(CFP / p / "frontal_01.jpg") for p in people]
    assert all(side >= width - 1e-6 for side, width, _ in profiles + frontals)
    assert sum(enlarged for *_, enlarged in profiles) >= len(people) // 2
    assert not any(enlarged for *_, enlarged in frontals)
    # an enlarged chip is still a 150x150 chip
    rgb = np.asarray(Image.open(CFP / people[0] / "profile_01.jpg").convert("RGB"))
    chips = crop_faces(rgb, max_faces=1)
    assert chips and chips[0][1].shape == (STORE_SIZE, STORE_SIZE, 3)
