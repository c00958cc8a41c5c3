"""The PyTorch port of dlib's face recognition ResNet against dlib itself, on real face chips.

dlib (the dlib-bin wheel) is a test dependency: it cuts the chips and computes the reference
descriptors. If it is missing, these tests fail at import rather than being skipped.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import dlib
import numpy as np
import pytest
import torch
from PIL import Image

from facegrad.recognition import dlib_resnet
from facegrad.recognition.dlib_resnet import (
    DlibResNet,
    dlib_model_path,
    load_pretrained,
    pretrained_weights,
    state_dict_from_dlib,
)
from facegrad.recognition.dlib_serialize import read_network

ORL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "att_faces"
PEOPLE = range(1, 41, 2)  # 20 people, two images each: 40 chips


def _models_dir() -> Path:
    # Never import face_recognition_models: its __init__ needs pkg_resources.
    spec = importlib.util.find_spec("face_recognition_models")
    assert spec is not None, "face-recognition-models is a test dependency"
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _chip(detector, predictor, path: Path) -> np.ndarray:
    """dlib's own 150x150 aligned chip (as dnn_face_recognition_ex.cpp cuts it)."""
    img = np.asarray(Image.open(path).convert("RGB"))
    for image, upsample in ((img, 0), (img, 1), (np.repeat(np.repeat(img, 2, 0), 2, 1), 1)):
        faces = detector(image, upsample)
        if faces:
            return dlib.get_face_chip(image, predictor(image, faces[0]), size=150, padding=0.25)
    raise AssertionError(f"dlib finds no face in {path}")


@pytest.fixture(scope="module")
def chips() -> np.ndarray:
    assert ORL_DIR.is_dir(), f"ORL faces not found at {ORL_DIR}"
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(_models_dir() / "shape_predictor_5_face_landmarks.dat"))
    return np.stack([_chip(detector, predictor, ORL_DIR / f"s{person:02d}" / f"{image:02d}.png")
                     for person in PEOPLE for image in (1, 6)])


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> DlibResNet:
    return load_pretrained(tmp_path_factory.mktemp("dlib_cache"))


def _to_tensor(chips: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255.0


def test_descriptors_match_dlib(chips, net):
    assert chips.shape == (2 * len(PEOPLE), 150, 150, 3) and chips.dtype == np.uint8
    recognizer = dlib.face_recognition_model_v1(str(dlib_model_path()))
    reference = np.array([recognizer.compute_face_descriptor(chip) for chip in chips])
    with torch.no_grad():
        ours = net(_to_tensor(chips)).numpy().astype(np.float64)
    cosine = (ours * reference).sum(1) / (np.linalg.norm(ours, axis=1)
                                          * np.linalg.norm(reference, axis=1))
    max_diff = np.abs(ours - reference).max()
    print(f"\n{len(chips)} chips: 1 - min cosine {1 - cosine.min():.2e}, "
          f"max |diff| {max_diff:.3g}")
    assert cosine.min() >= 0.9999, cosine
    # the same descriptor, not a re-normalised one (dlib's have norms around 1.4)
    assert max_diff < 1e-4
    # and recognition still works: each person's two chips are closer than dlib's 0.6
    pairs = np.linalg.norm(ours[0::2] - ours[1::2], axis=1)
    assert (pairs < 0.6).mean() >= 0.9, pairs


def test_batch_of_one_matches_batch(chips, net):
    x = _to_tensor(chips[:4])
    with torch.no_grad():
        batch = net(x)
        single = torch.cat([net(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(single, batch, rtol=1e-5, atol=1e-5)


def test_layout_and_fine_tuning_hooks(net):
    arrays = read_network(dlib_model_path()).arrays()
    assert sum(p.numel() for p in net.parameters()) == sum(a.size for a in arrays.values())
    assert [len(stage) for stage in net.stages] == [3, 4, 3, 4]
    with pytest.raises(ValueError, match="150, 150"):
        net(torch.zeros(1, 3, 112, 92))
    # freezing the early stages leaves the rest, affine layers included, trainable
    tuned = DlibResNet()
    tuned.stem.requires_grad_(False)
    tuned.stages[:2].requires_grad_(False)
    trainable = {name for name, p in tuned.named_parameters() if p.requires_grad}
    assert "stages.3.0.affine1.weight" in trainable and "fc.weight" in trainable
    assert not any(name.startswith(("stem.", "stages.0.", "stages.1.")) for name in trainable)


def test_pretrained_weights_written_once_and_reused(tmp_path):
    path = pretrained_weights(tmp_path)
    meta = tmp_path / "dlib_resnet_v1.json"
    assert path == tmp_path / "dlib_resnet_v1.safetensors"
    info = json.loads(meta.read_text())
    assert info["source_file"] == "dlib_face_recognition_resnet_model_v1.dat"
    assert info["format_version"] == dlib_resnet.FORMAT_VERSION
    assert info["source_sha256"] == dlib_resnet._sha256(dlib_model_path())
    assert info["safetensors_sha256"] == dlib_resnet._sha256(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [meta.name, path.name]  # no temp files
    stamp = (path.stat().st_mtime_ns, path.stat().st_ino, meta.stat().st_mtime_ns)

    assert pretrained_weights(tmp_path) == path
    assert (path.stat().st_mtime_ns, path.stat().st_ino, meta.stat().st_mtime_ns) == stamp

    # the cached file holds exactly what the reader produces
    from safetensors.torch import load_file
    cached, fresh = load_file(str(path)), state_dict_from_dlib(dlib_model_path())
    assert cached.keys() == fresh.keys() == DlibResNet().state_dict().keys()
    assert all(torch.equal(cached[k], fresh[k]) for k in cached)


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete", "stale_json", "bad_json"])
def test_pretrained_weights_rewritten_when_damaged(tmp_path, damage):
    path = pretrained_weights(tmp_path)
    meta = tmp_path / "dlib_resnet_v1.json"
    good = path.read_bytes()
    if damage == "corrupt":
        data = bytearray(good)
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(good[:1000])
    elif damage == "delete":
        path.unlink()
    elif damage == "stale_json":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "source_sha256": "0" * 64}))
    else:
        meta.write_text("{not json")
    stamp = path.stat().st_mtime_ns if path.exists() else None

    assert pretrained_weights(tmp_path) == path
    assert path.read_bytes() == good
    assert path.stat().st_mtime_ns != stamp  # rewritten, not left alone
    assert json.loads(meta.read_text())["safetensors_sha256"] == dlib_resnet._sha256(path)
    net = load_pretrained(tmp_path)
    assert not net.training


def test_missing_models_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="face-recognition-models"):
        dlib_model_path()
