"""facegrad's detection → landmarks → chip → descriptor path against dlib's own pipeline, as
``face_recognition.face_encodings`` runs it: ``get_frontal_face_detector()`` upsampled once,
the 5-point ``shape_predictor`` in its box, ``face_recognition_model_v1.compute_face_descriptor``
(the 150 px chip with padding 0.25 through dlib's ResNet). ``face_recognition`` itself is not
installed (it would build dlib from source); these are the three dlib calls it makes.

Where the two paths scan at the same scale (a photo of up to 480 px: facegrad enlarges it 2× by
dlib's own upsampling, as ``face_recognition`` does) they find the same boxes, and where the
chip lies inside the photo they give the same descriptor. They differ by design, and the tests
do not hide it, on (README, "Detection and alignment"): bigger photos, which facegrad scans at
960 px rather than at twice their size; and faces whose chip reaches past the photo's edge,
which facegrad fills with the edge pixels where dlib reads black; and faces whose landmarks give
a chip smaller than the detector's box (turned faces: the chip is enlarged to the box), which
the descriptor test counts apart and bounds.
"""

from __future__ import annotations

from pathlib import Path

import dlib
import numpy as np
import pytest
import torch
from PIL import Image

from facegrad.recognition import detect
from facegrad.recognition.dlib_resnet import load_pretrained
from facegrad.recognition.gallery import embed
from tests.scenes import paste

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CFP = SHARED / "cfp_dev"
ORL = SHARED / "att_faces"


@pytest.fixture(scope="module")
def dlib_pipeline():
    models = detect.predictor_path().parent
    network = models / "dlib_face_recognition_resnet_model_v1.dat"
    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat")),
            dlib.face_recognition_model_v1(str(network)))


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return load_pretrained(tmp_path_factory.mktemp("pretrained"))


def face_encoding(pipeline, rgb: np.ndarray) -> np.ndarray | None:
    """``face_recognition.face_encodings(rgb)[0]`` for the biggest face (its three dlib calls)."""
    detector, predictor, network = pipeline
    faces = detector(rgb, 1)
    if not faces:
        return None
    box = max(faces, key=lambda r: r.area())
    return np.asarray(network.compute_face_descriptor(rgb, predictor(rgb, box)))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_photos_up_to_480_px_get_dlibs_boxes(dlib_pipeline):
    """CFP's frontal web photos (up to 250 px): the boxes facegrad finds are dlib's, pixel for
    pixel, on every photo where dlib finds one."""
    detector = dlib_pipeline[0]
    compared = 0
    for person in range(1, 251, 5):
        rgb = np.asarray(Image.open(CFP / f"{person:03d}" / "frontal_03.jpg").convert("RGB"))
        theirs = detector(np.ascontiguousarray(rgb), 1)
        if not theirs:
            continue
        h, w = rgb.shape[:2]
        want = sorted((max(0, r.left()), max(0, r.top()), min(w, r.right() + 1) - max(0, r.left()),
                       min(h, r.bottom() + 1) - max(0, r.top())) for r in theirs)
        assert sorted(detect.find_faces(rgb)) == want, person
        compared += 1
    assert compared >= 45


def enlarged(rgb: np.ndarray) -> bool:
    """Whether facegrad enlarges the biggest face's landmark chip to its box."""
    face = detect._find(rgb, fallback=True)[0]
    return detect._chip_details(detect._landmarks(rgb, face), face)[1]


def test_descriptors_are_dlibs_where_the_chip_lies_inside_the_photo(dlib_pipeline, net):
    """ORL faces in 480x360 pictures: facegrad's chip through its PyTorch port of the network
    against face_recognition's descriptor, cosine >= 0.999 on at least 99 % of the faces both
    find (measured: 79 of 80 above 0.99999). Faces whose chip facegrad enlarges to the
    detector's box differ by design; they are at most 1 in 20 here (measured: 1 of 80)."""
    rng = np.random.default_rng(0)
    cos, widened = [], 0
    for s in range(1, 41):
        for image in (1, 6):
            face = np.asarray(Image.open(ORL / f"s{s:02d}" / f"{image:02d}.png").convert("RGB"))
            pic = np.empty((360, 480, 3), np.uint8)
            pic[:] = rng.integers(60, 190, 3, dtype=np.uint8)
            paste(pic, face, int(rng.integers(130, 200)), rng.uniform(180, 300),
                  rng.uniform(150, 210))
            theirs = face_encoding(dlib_pipeline, pic)
            ours = detect.crop_faces(pic, max_faces=1)
            if theirs is None or not ours:
                continue
            if enlarged(pic):
                widened += 1
                continue
            mine = embed(net, torch.from_numpy(ours[0][1][None]), 150,
                         normalisation="rgb_unit", descriptor="embedding")[0].numpy()
            cos.append(cosine(mine, theirs))
    assert len(cos) + widened >= 76
    assert widened <= 4
    assert np.mean(np.array(cos) >= 0.999) >= 0.99, sorted(cos)[:5]
