"""The training loop on real faces: reproducible, resumable, safe with non-finite gradients."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from facegrad.data.batches import AUG_SCALE, augment_batch, stratified_split
from facegrad.data.preprocess import normaliser, prepare_face, resize_uint8
from facegrad.data.store import FaceArrays
from facegrad.pipeline import run_training_job
from facegrad.recognition.architectures import architecture, build_model
from facegrad.recognition.gallery import embed, identity_scores
from facegrad.recognition.inference import LoadedModel
from facegrad.training import checkpoint as ckpt
from facegrad.training.config import TrainConfig
from facegrad.training.loop import Cancelled, Hooks, TrainingError, train
from tests.harness import ORL


def _orl_faces(n: int) -> FaceArrays:
    """``n`` ORL identities × 10 images, as stored crops."""
    if not ORL.is_dir():
        pytest.skip("shared face data missing")
    imgs, labels, names = [], [], []
    for i, d in enumerate(sorted(p for p in ORL.iterdir() if p.is_dir())[:n]):
        names.append(d.name)
        for f in sorted(d.glob("*.png")):
            imgs.append(prepare_face(np.asarray(Image.open(f).convert("RGB"))))
            labels.append(i)
    return FaceArrays(np.stack(imgs), np.array(labels), names)


@pytest.fixture(scope="module")
def small_faces():
    return _orl_faces(6)


def cfg(**kw) -> TrainConfig:
    base = {"architecture": "seed_cnn", "epochs": 4, "batch_size": 16, "image_size": 32,
            "learning_rate": 0.01, "optimizer": {"name": "sgd", "momentum": 0.9},
            "clip": {"mode": "norm", "max_norm": 5.0, "scope": "per_tensor"}, "seed": 3,
            "val_fraction": 0.2}
    base.update(kw)
    return TrainConfig.model_validate(base)


def test_split_is_stratified_and_seeded():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 2)
    tr, va, few = stratified_split(labels, 0.2, seed=1)
    tr2, va2, _ = stratified_split(labels, 0.2, seed=1)
    assert (tr == tr2).all() and (va == va2).all()
    assert np.bincount(labels[va], minlength=3).tolist() == [2, 2, 0]
    assert few == [2] and set(tr) | set(va) == set(range(22))


def test_augmentation_scales_the_face_within_its_range():
    """A bright disc in the middle of the frame comes out between AUG_SCALE's bounds in size,
    across the whole range (not only the old 0.9-1.1), the same for the same seed."""
    side, radius = 64, 10
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    disc = (((yy - side / 2 + 0.5) ** 2 + (xx - side / 2 + 0.5) ** 2) <= radius ** 2)
    x = (disc.to(torch.uint8) * 255).expand(512, 3, side, side).contiguous()
    out = augment_batch(x, torch.Generator().manual_seed(3))
    again = augment_batch(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and torch.equal(out, again)
    assert float(out.min()) >= 0 and float(out.max()) <= 255
    flat = out.mean(1).flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    area = (flat > (lo + hi) / 2).sum(1).double() / float(disc.sum())
    linear = area.sqrt()  # the disc's size relative to the original
    assert float(linear.min()) >= AUG_SCALE[0] - 0.05 and float(linear.max()) <= AUG_SCALE[1] + 0.05
    assert float(linear.min()) < 0.85 and float(linear.max()) > 1.18


@pytest.mark.parametrize("name", ["per_image_standardise", "rgb_unit"])
def test_normalisers_leave_their_input_alone(name):
    """Each normaliser works in place on a copy of its own: a float batch handed to it comes back
    unchanged, and uint8 and float batches of the same pixels give the same result."""
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    xf = x.float()
    keep = xf.clone()
    out = normaliser(name)(xf)
    assert torch.equal(xf, keep) and out.data_ptr() != xf.data_ptr()
    assert torch.allclose(out, normaliser(name)(x), atol=1e-6)
    if name == "per_image_standardise":
        flat = out.flatten(1)
        assert torch.allclose(flat.mean(1), torch.zeros(4), atol=1e-5)
        assert torch.allclose(flat.std(1), torch.ones(4), atol=1e-4)


def test_same_seed_same_metrics(small_faces, tmp_path):
    a = train(cfg(), small_faces, tmp_path / "a")
    b = train(cfg(), small_faces, tmp_path / "b")
    key = [(h["train_loss"], h["val_acc"], h["clipping"]["clipped_steps"]) for h in a.history]
    assert key == [(h["train_loss"], h["val_acc"], h["clipping"]["clipped_steps"])
                   for h in b.history]
    c = train(cfg(seed=4), small_faces, tmp_path / "c")
    assert c.history[-1]["train_loss"] != a.history[-1]["train_loss"]
    # training stops at the weights: the gallery and the model file are the job's next steps
    assert not (tmp_path / "a" / "model.json").exists()


def test_resume_continues_the_same_run(small_faces, tmp_path):
    full = train(cfg(augment=True), small_faces, tmp_path / "full")

    epochs_seen = []

    def stop_after_two():
        return len(epochs_seen) >= 2

    hooks = Hooks(on_epoch=lambda r: epochs_seen.append(r["epoch"]), should_stop=stop_after_two)
    with pytest.raises(Cancelled):
        train(cfg(augment=True), small_faces, tmp_path / "cut", hooks)
    last = sorted((tmp_path / "cut" / "checkpoints").glob("epoch-*.json"))[-1]
    assert last.name == "epoch-0002.json"
    resumed_at = []
    res = train(cfg(augment=True), small_faces, tmp_path / "cut",
                Hooks(on_resume=resumed_at.append), resume=last)
    assert resumed_at == [2] and res.resumed_from_epoch == 2
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    for a, b in zip(full.history, res.history):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-4)
        assert a["val_acc"] == b["val_acc"]
    assert res.clipping["steps"] == full.clipping["steps"]


def test_model_artifact_loads_and_identifies(small_faces, tmp_path):
    res = run_training_job(cfg(epochs=6), small_faces, tmp_path / "m")
    meta = json.loads(res.model_path.read_text())
    assert meta["labels"] == small_faces.names
    assert meta["preprocessing"]["image_size"] == 32
    assert meta["config"]["clip"] == {"mode": "norm", "max_norm": 5.0, "norm_type": 2.0,
                                      "scope": "per_tensor", "on_nonfinite": "skip"}
    lm = LoadedModel(tmp_path / "m")
    out = lm.match(lm.embed(small_faces.images[:20]), top_k=3, threshold=-1)
    assert len(out) == 20 and len(out[0][2]) == 3
    acc = np.mean([o[0] == small_faces.names[y] for o, y in zip(out, small_faces.labels[:20])])
    assert acc > 0.5
    # identification embeds a face exactly as training embedded the gallery: every image of
    # this 6-person set is in the gallery, so each finds its own embedding there
    assert meta["preprocessing"]["descriptor"] == "flip_mean"
    best = (lm.embed(small_faces.images) @ lm.gallery.emb.t()).max(1).values
    assert float(best.min()) > 0.999
    # the flip-mean descriptor of a face and of its mirror image are one descriptor (up to the
    # float rounding of a batch in another order)
    mirrored = np.ascontiguousarray(small_faces.images[:8, :, ::-1])
    torch.testing.assert_close(lm.embed(mirrored), lm.embed(small_faces.images[:8]),
                               rtol=0, atol=1e-5)
    # 6 identities are too few to hold some out: calibrated on all of them, and it says so
    os_ = meta["open_set"]
    assert os_["method"] == "leave_out" and os_["honest_identities"] == 6
    assert "optimistic" in os_["note"] and "held_out" not in os_
    # the face's confidence is its best identity's score, which the threshold applies to
    emb = lm.embed(small_faces.images[:20])
    scores = lm.gallery.scores(emb)
    for (identity, conf, cands), row in zip(lm.match(emb, top_k=2), scores):
        top = float(row.max())
        assert conf == cands[0][1] == pytest.approx(min(1.0, max(0.0, top)), abs=1e-4)
        assert (identity is not None) == (top >= lm.threshold)


def test_scratch_model_calibrates_on_held_out_identities(tmp_path):
    """facenet_s trained on 10 of 12 people: the 2 held out are the calibration's strangers,
    and a loaded model embeds faces (traced) as training embedded the gallery."""
    faces = _orl_faces(12)
    res = run_training_job(cfg(architecture="facenet_s", epochs=1, optimizer={"name": "adamw"},
                               learning_rate=3e-3, image_size=64, calibration_identities=0.2),
                           faces, tmp_path / "m")
    meta = json.loads(res.model_path.read_text())
    os_ = meta["open_set"]
    assert len(os_["held_out"]) == 2 and os_["honest_identities"] == 2
    assert "note" not in os_ and "fine_tuning" not in os_
    assert 0 < os_["threshold"] <= 1 and "verify_threshold" in os_
    assert meta["labels"] == faces.names and len(meta["classifier_labels"]) == 10
    assert meta["gallery"]["counts"] == {n: 10 for n in faces.names}
    lm = LoadedModel(tmp_path / "m")
    best = (lm.embed(faces.images) @ lm.gallery.emb.t()).max(1).values
    assert float(best.min()) > 0.999


@pytest.mark.parametrize("arch", ["seed_cnn", "facenet_s", "dlib_resnet"])
def test_every_architecture_embeds_by_its_normalised_embedding(arch):
    torch.manual_seed(0)
    size = 150 if arch == "dlib_resnet" else 48
    net = build_model(arch, 3, size).eval()
    crops = np.random.default_rng(1).integers(0, 256, (5, 150, 150, 3), dtype=np.uint8)
    emb = embed(net, crops, size, normalisation=architecture(arch).normalisation)
    x = normaliser(architecture(arch).normalisation)(resize_uint8(torch.from_numpy(crops), size))
    with torch.no_grad():
        want = net(x)[0]
    assert emb.shape == (5, 128)
    assert torch.allclose(emb.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(emb, want, atol=1e-5)
    norm = architecture(arch).normalisation
    assert embed(net, crops[:0], size, normalisation=norm).shape == (0, 128)


def test_identity_scores_take_the_nearest_image():
    gallery = torch.eye(4)[[0, 1, 2, 2]]
    owner = torch.tensor([0, 0, 1, 1])
    probe = torch.nn.functional.normalize(torch.tensor([[0.6, 0.8, 0.0, 0.0]]), dim=1)
    s = identity_scores(probe, gallery, owner, 3)
    assert s.tolist() == [[pytest.approx(0.8), 0.0, -2.0]]  # identity 2 has no images


def test_nonfinite_fail_policy_names_the_step(small_faces, tmp_path):
    # at 64 px the dense layer is big enough for an unclipped rate of 10 to overflow
    c = cfg(learning_rate=10.0, optimizer={"name": "sgd", "momentum": 0.0}, image_size=64,
            clip={"mode": "none", "on_nonfinite": "fail"}, lr_schedule="constant")
    with pytest.raises(TrainingError, match=r"non-finite .* at epoch \d+, step \d+"):
        train(c, small_faces, tmp_path / "f")


def test_nonfinite_skip_policy_never_writes_nan(small_faces, tmp_path):
    c = cfg(learning_rate=10.0, optimizer={"name": "sgd", "momentum": 0.0}, image_size=64,
            clip={"mode": "none", "on_nonfinite": "skip"}, lr_schedule="constant")
    with pytest.raises(TrainingError, match="diverged|non-finite"):
        train(c, small_faces, tmp_path / "s")
    for meta in (tmp_path / "s" / "checkpoints").glob("*.json"):
        tensors, _ = ckpt.load(meta)
        assert all(bool(t.float().isfinite().all()) for t in tensors.values())


def test_checkpoint_refuses_tampered_or_truncated(tmp_path):
    import torch

    meta = ckpt.save(tmp_path / "c", {"w": torch.arange(1000.0)}, {"epoch": 1})
    tensors, m = ckpt.load(meta)
    assert m["epoch"] == 1 and tensors["w"][999] == 999
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files
    weights = tmp_path / "c.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load(meta)
    weights.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ckpt.CheckpointError, match="truncated or modified"):
        ckpt.load(meta)
    meta.write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load(meta)
