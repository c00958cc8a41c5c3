"""dlib's CNN face detector in PyTorch (facegrad.recognition.mmod) against dlib-bin's own
``cnn_face_detection_model_v1`` on real photos: the same boxes, scores within float noise,
batches that find what single pictures do, and the tiled pyramid's geometry."""

from __future__ import annotations

import cv2
import dlib
import numpy as np
import pytest

from facegrad.recognition.detect import CNN_FILE, CNN_SIDE, _resized, predictor_path
from facegrad.recognition.mmod import MMODDetector, pyramid_layout
from tests.harness import ORL
from tests.scenes import paste

CFP = ORL.parent / "cfp_dev"
needs_data = pytest.mark.skipif(not (CFP.is_dir() and ORL.is_dir()),
                                reason=f"shared cfp_dev/ORL data not at {CFP.parent}")

# Scores are sums of float32 products computed in other orders here and in dlib, so a window
# whose score lies within this of the threshold (0) may fall either side of it on another CPU.
SCORE_NOISE = 1e-3


@pytest.fixture(scope="module")
def ours() -> MMODDetector:
    return MMODDetector.from_file(predictor_path(CNN_FILE))


@pytest.fixture(scope="module")
def theirs():
    return dlib.cnn_face_detection_model_v1(str(predictor_path(CNN_FILE)))


def _photo(path, side: int = CNN_SIDE) -> np.ndarray:
    """A cfp_dev photo as detect._scan_cnn scans it: RGB, longest side ``side``."""
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(_resized(rgb, side / max(rgb.shape[:2])))


def _scenes() -> list[np.ndarray]:
    """Pictures of several shapes: cfp_dev profiles and frontals, two ORL faces on a plain
    backdrop, a picture with no face, a square and a tall one."""
    pics = [_photo(CFP / f"{p:03d}" / f"profile_0{k}.jpg") for p, k in
            ((1, 1), (7, 2), (42, 3), (150, 4), (233, 1))]
    pics += [_photo(CFP / f"{p:03d}" / "frontal_03.jpg") for p in (5, 99)]
    rng = np.random.default_rng(0)
    two = np.full((240, 360, 3), 128, np.uint8)
    two += rng.integers(0, 40, two.shape, dtype=np.uint8)
    for s, x in ((3, 100.0), (17, 260.0)):
        face = cv2.imread(str(ORL / f"s{s:02d}" / "01.png"))[:, :, ::-1]
        paste(two, np.ascontiguousarray(face), 150, x, 120.0)
    pics += [two, rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)]
    pics += [_photo(CFP / "010" / "profile_02.jpg", 181)[:150, :150].copy(),
             np.ascontiguousarray(_photo(CFP / "011" / "frontal_01.jpg").transpose(1, 0, 2))]
    return pics


def _dlib_boxes(theirs, pic) -> list[tuple[tuple[int, int, int, int], float]]:
    return [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), d.confidence)
            for d in theirs(pic, 0)]


def _agree(mine, reference) -> None:
    """The same boxes, except windows whose score is within SCORE_NOISE of the threshold."""
    firm = [(r, c) for r, c in reference if c > SCORE_NOISE]
    got = {d.rect: d.confidence for d in mine}
    for rect, conf in firm:
        assert rect in got, (rect, conf, got)
        assert abs(got[rect] - conf) < SCORE_NOISE, (rect, conf, got[rect])
    ref = dict(reference)
    for rect, conf in got.items():
        assert rect in ref or conf <= SCORE_NOISE, (rect, conf, reference)


@needs_data
def test_boxes_and_scores_are_dlibs(ours, theirs):
    found = 0
    for pic in _scenes():
        reference = _dlib_boxes(theirs, pic)
        _agree(ours.detect(pic)[0], reference)
        found += len(reference)
    assert found >= 9  # the photos hold faces dlib finds, not only empty pictures


@needs_data
def test_a_batch_finds_what_each_picture_does(ours):
    same = [cv2.resize(_photo(CFP / f"{p:03d}" / "profile_01.jpg"), (200, 240))
            for p in range(20, 26)]
    batched = ours.detect(np.stack(same))
    assert sum(d.confidence > SCORE_NOISE for found in batched for d in found) >= 4
    for pic, got in zip(same, batched):
        alone = ours.detect(pic)[0]
        firm = [d for d in alone if d.confidence > SCORE_NOISE]
        assert [d.rect for d in firm] == [d.rect for d in got if d.confidence > SCORE_NOISE]
        for a, b in zip(firm, got):
            assert abs(a.confidence - b.confidence) < SCORE_NOISE


@pytest.mark.parametrize(("rows", "cols"), [(240, 320), (320, 240), (40, 40), (113, 301),
                                            (480, 640), (7, 500)])
def test_pyramid_levels_tile_without_overlap(rows, cols):
    rects, out_rows, out_cols = pyramid_layout(rows, cols, 10, 11)
    assert rects[0] == (11, 11, 11 + cols - 1, 11 + rows - 1)
    for i, (left, top, right, bottom) in enumerate(rects):
        assert 0 <= left <= right < out_cols and 0 <= top <= bottom < out_rows
        if i:  # each level is floor(5/6) of the one before
            pl, pt, pr, pb = rects[i - 1]
            assert right - left + 1 == int((pr - pl + 1) * 5 / 6)
            assert bottom - top + 1 == int((pb - pt + 1) * 5 / 6)
        for other in rects[:i]:
            assert (right < other[0] or left > other[2] or bottom < other[1]
                    or top > other[3])
    assert rects[-1][3] - rects[-1][1] + 1 >= 5


def test_rejects_what_is_not_a_picture(ours):
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((2, 10, 10, 4), np.uint8),
                np.zeros((10, 10, 3), np.float32)):
        with pytest.raises(ValueError, match="uint8 pictures"):
            ours.detect(bad)
    assert ours.detect(np.zeros((3, 2, 2, 3), np.uint8)) == [[], [], []]
