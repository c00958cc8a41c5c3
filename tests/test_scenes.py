"""tests/scenes.py: the harder ORL pictures are deterministic, well-formed and as described."""

from __future__ import annotations

import numpy as np
import pytest

from tests.scenes import ORL, in_photo, photo_set, two_faces


def _face(seed: int = 0) -> np.ndarray:
    """A stand-in 92x112 'face' (no shared data needed): a bright oval on a dark ground."""
    yy, xx = np.mgrid[0:112, 0:92]
    oval = ((xx - 46) / 30) ** 2 + ((yy - 56) / 42) ** 2 <= 1
    noise = np.random.default_rng(seed).integers(0, 30, size=(112, 92))
    return (np.where(oval, 200, 40) + noise).astype(np.uint8)


def test_in_photo_deterministic_and_well_formed():
    a = in_photo(_face(), np.random.default_rng(7))
    b = in_photo(_face(), np.random.default_rng(7))
    c = in_photo(_face(), np.random.default_rng(8))
    assert a.shape == (243, 320, 3) and a.dtype == np.uint8 and a.flags.c_contiguous
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
    small = in_photo(_face(), np.random.default_rng(7), size=(200, 150), background="flat")
    assert small.shape == (150, 200, 3)
    with pytest.raises(ValueError):
        in_photo(_face(), np.random.default_rng(7), background="sky")


def test_in_photo_keeps_background_on_both_sides():
    for seed in range(10):
        pic, (left, top, right, bottom) = in_photo(_face(), np.random.default_rng(seed), box=True)
        w, h = pic.shape[1], pic.shape[0]
        assert left >= 0.08 * w - 1 and right <= 0.92 * w + 1
        assert 0 <= top < bottom <= h
        assert (bottom - top) >= 0.5 * h  # face_height 0.55-0.8, turned at most 15 degrees


def test_side_light_darkens_one_side():
    for seed in range(6):
        flat = dict(background="flat", turn=(0, 0), box=True)
        lit, (left, _, right, _) = in_photo(_face(), np.random.default_rng(seed), **flat)
        # the background strips left and right of the face, as lit
        lm = lit[:, :left, 0].astype(float).mean()
        rm = lit[:, right:, 0].astype(float).mean()
        assert max(lm, rm) > 1.6 * min(lm, rm), (seed, lm, rm)
        even = in_photo(_face(), np.random.default_rng(seed), side_light=False, **flat)[0]
        em, er = even[:, :left, 0].astype(float).mean(), even[:, right:, 0].astype(float).mean()
        assert max(em, er) < 1.1 * min(em, er), (seed, em, er)


def test_two_faces_apart():
    pic, boxes = two_faces(_face(1), _face(2), np.random.default_rng(3), boxes=True)
    again = two_faces(_face(1), _face(2), np.random.default_rng(3))
    assert pic.shape == (480, 640, 3) and pic.dtype == np.uint8
    assert np.array_equal(pic, again)
    (al, at, ar, ab), (bl, bt, br, bb) = boxes
    assert ar <= 320 <= bl  # left half, right half: no overlap
    for left, top, right, bottom in boxes:
        assert right - left >= 60 and bottom - top >= 100
        inside = pic[top:bottom, left:right, 0].astype(float)
        # each box holds a face: a bright oval (200) on the stand-in's dark ground (40)
        assert inside.max() - inside.min() > 80


@pytest.mark.skipif(not ORL.is_dir(), reason=f"shared face data not found at {ORL}")
def test_photo_set_per_person_and_seeded():
    one = photo_set(["s01", "s02"], 5)
    assert sorted(one) == ["s01", "s02"] and all(len(v) == 10 for v in one.values())
    alone = photo_set(["s02"], 5)
    assert all(np.array_equal(x, y) for x, y in zip(one["s02"], alone["s02"]))
    other = photo_set(["s02"], 6)
    assert not np.array_equal(one["s02"][0], other["s02"][0])
    assert one["s01"][0].shape == (243, 320, 3)
