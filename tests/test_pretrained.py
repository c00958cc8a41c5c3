"""The default job: dlib's pretrained face network, used as it is (epochs 0) or fine-tuned with
clipping, its gallery calibrated by leaving out (facegrad.recognition.open_set). Real ORL faces,
in process (the service runs the same ``run_training_job``; tests/test_open_set.py goes through
it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from facegrad.pipeline import run_training_job
from facegrad.recognition.inference import LoadedModel
from facegrad.recognition.open_set import (
    better,
    equal_error_threshold,
    leave_out_scores,
)
from facegrad.training.config import TrainConfig
from facegrad.training.loop import pretrained_state
from tests.harness import ORL, orl_chips

N_IDS = 12  # people trained / enrolled; the next 4 are strangers


@pytest.fixture(scope="module")
def faces():
    if not ORL.is_dir():
        pytest.skip(f"shared face data not found at {ORL}")
    train, test, strangers = orl_chips(N_IDS, 4)
    return {"train": train, "test": test, "strangers": strangers}


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrained")


def _identify(lm: LoadedModel, x: np.ndarray) -> list:
    return [m[0] for m in lm.match(lm.embed(x))]


def test_defaults_follow_the_architecture():
    cfg = TrainConfig()
    assert (cfg.architecture, cfg.epochs, cfg.image_size, cfg.learning_rate) == (
        "dlib_resnet", 8, 150, 0.01)
    assert cfg.optimizer.name == "sgd"
    scratch = TrainConfig(architecture="facenet_s")
    assert (scratch.epochs, scratch.image_size, scratch.learning_rate) == (60, 64, 3e-3)
    assert TrainConfig(epochs=0).epochs == 0  # the pretrained network as it is
    # the descriptor is chosen by the job (fused needs dlib's network: others use flip_mean)
    assert cfg.descriptor == "auto" and scratch.descriptor == "flip_mean"
    with pytest.raises(ValidationError, match="image_size must be 150"):
        TrainConfig(image_size=64)
    with pytest.raises(ValidationError, match="epochs must be >= 1"):
        TrainConfig(architecture="seed_cnn", epochs=0)


def test_pretrained_as_is_identifies_and_rejects(faces, weights_dir, tmp_path):
    res = run_training_job(TrainConfig(epochs=0, device="cpu"), faces["train"], tmp_path / "run",
                           pretrained_dir=weights_dir)
    assert res.history == []
    os_ = res.open_set
    # no training: every person is an honest stranger to the others
    assert os_["method"] == "leave_out" and os_["honest_identities"] == N_IDS
    assert os_["policy"] == "equal_error" and "fine_tuning" not in os_
    assert os_["rank1"] == 1.0 and os_["known_named"] >= 0.95
    assert os_["strangers_rejected"] >= 0.95
    lm = LoadedModel(res.model_path.parent)
    assert lm.meta["preprocessing"]["normalisation"] == "rgb_unit"
    xt, yt = faces["test"]
    named = _identify(lm, xt)
    truth = [faces["train"].names[i] for i in yt]
    assert np.mean([a == b for a, b in zip(named, truth)]) >= 0.95
    assert np.mean([a is None for a in _identify(lm, faces["strangers"])]) >= 0.95
    # the weights stored with the model are the pretrained network's
    stored = load_file(str(res.model_path.with_suffix(".safetensors")))
    ref = pretrained_state(weights_dir)
    assert torch.equal(stored["model.backbone.fc.weight"], ref["fc.weight"])
    _check_descriptor_choice(res, lm, people=2)  # a fifth of the 12, drawn as a job holds out


def _check_descriptor_choice(res, lm: LoadedModel, people: int) -> None:
    """descriptor 'auto': the job measured flip_mean and fused on ``people`` people the network
    did not train on, kept fused only where it was better, and the model is the chosen one."""
    choice = res.open_set["descriptor_choice"]
    assert choice["candidates"] == ["flip_mean", "fused"]
    for d in choice["candidates"]:
        f = choice[d]
        assert f["people"] == people and 0.5 <= f["verify_accuracy"] <= 1
        assert 0 <= f["tpir_at_fpir_0.05"] <= 1 and 0 <= f["verify_tar_at_far_0.01"] <= 1
    assert choice["gain"]["verify_accuracy"] == pytest.approx(
        choice["fused"]["verify_accuracy"] - choice["flip_mean"]["verify_accuracy"], abs=2e-4)
    want = "fused" if better(choice["fused"], choice["flip_mean"]) else "flip_mean"
    assert choice["chosen"] == want == lm.meta["preprocessing"]["descriptor"]
    assert lm.gallery.emb.shape[1] == (256 if want == "fused" else 128)
    assert (lm.fusion is not None) == (want == "fused")


@pytest.fixture(scope="module")
def fused_job(faces, weights_dir, tmp_path_factory):
    """The pretrained network as it is with descriptor 'fused' named (read, not changed, by
    the tests that use it)."""
    return run_training_job(TrainConfig(epochs=0, device="cpu", descriptor="fused"),
                            faces["train"], tmp_path_factory.mktemp("fused") / "run",
                            pretrained_dir=weights_dir)


def test_fused_descriptor_model_identifies_and_rejects(faces, fused_job):
    """descriptor 'fused': the gallery, the thresholds and identify use dlib's and SFace's
    descriptors side by side (256-d, unit length), SFace's centred and the two weighed on the
    job's images; the saved model says so, and describes a face as its gallery does."""
    res = fused_job
    assert res.open_set["known_named"] >= 0.95 and res.open_set["strangers_rejected"] >= 0.95
    lm = LoadedModel(res.model_path.parent)
    assert lm.meta["preprocessing"]["descriptor"] == "fused"
    assert "descriptor_choice" not in res.open_set  # named by the job: nothing to choose
    w1, w2 = lm.fusion.weights
    assert w1 ** 2 + w2 ** 2 == pytest.approx(1.0, abs=1e-5) and w1 != pytest.approx(w2)
    assert lm.fusion.centre.shape == (128,)
    gallery = load_file(str(res.model_path.with_suffix(".safetensors")))["gallery.emb"]
    # the served model describes a gallery image as the job did (traced network, other batch:
    # close, not equal)
    train_images = np.asarray(faces["train"].images)
    torch.testing.assert_close(lm.embed(train_images[:4]), gallery[:4], atol=1e-4, rtol=1e-3)
    xt, yt = faces["test"]
    emb = lm.embed(xt)
    assert emb.shape == (len(xt), 256)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(xt)))
    named = [m[0] for m in lm.match(emb)]
    truth = [faces["train"].names[i] for i in yt]
    assert np.mean([a == b for a, b in zip(named, truth)]) >= 0.95
    assert np.mean([a is None for a in _identify(lm, faces["strangers"])]) >= 0.95


def test_auto_taking_fused_serves_what_a_fused_job_would(faces, weights_dir, fused_job,
                                                         tmp_path, monkeypatch):
    """When descriptor 'auto' judges fused better, the model is the one a job naming fused
    makes: SFace's part computed beside the gallery's flip_mean rows (not a second pass of
    dlib's network) gives the same gallery, fusion and served descriptors. The judgement is
    forced here (ORL's frontal faces tie, which keeps flip_mean)."""
    import facegrad.pipeline as pipeline

    named = fused_job
    monkeypatch.setattr(pipeline.open_set, "better", lambda a, b: True)
    auto = run_training_job(TrainConfig(epochs=0, device="cpu"), faces["train"],
                            tmp_path / "auto", pretrained_dir=weights_dir)
    assert auto.open_set["descriptor_choice"]["chosen"] == "fused"
    lm, ref = LoadedModel(auto.model_path.parent), LoadedModel(named.model_path.parent)
    assert lm.meta["preprocessing"]["descriptor"] == "fused"
    # other batch shapes on each side: close, not equal
    torch.testing.assert_close(lm.gallery.emb, ref.gallery.emb, atol=1e-4, rtol=1e-3)
    assert lm.fusion.weights == pytest.approx(ref.fusion.weights, abs=1e-4)
    torch.testing.assert_close(lm.fusion.centre, ref.fusion.centre, atol=1e-5, rtol=1e-4)
    train_images = np.asarray(faces["train"].images)
    torch.testing.assert_close(lm.embed(train_images[:4]), lm.gallery.emb[:4], atol=1e-4,
                               rtol=1e-3)
    assert auto.open_set["threshold"] == pytest.approx(named.open_set["threshold"], abs=1e-3)


def test_fine_tuning_reports_both_networks_and_keeps_frozen_stages(faces, weights_dir,
                                                                   tmp_path):
    cfg = TrainConfig(epochs=1, device="cpu", calibration_identities=0.2, freeze_stages=2,
                      clip={"mode": "norm", "max_norm": 5.0})
    res = run_training_job(cfg, faces["train"], tmp_path / "run", pretrained_dir=weights_dir)
    assert len(res.history) == 1 and res.clipping["steps"] > 0
    ft = res.open_set["fine_tuning"]
    assert len(ft["held_out"]) == 2 and ft["kept"] in ("fine_tuned", "pretrained")
    for net in ("pretrained", "fine_tuned"):
        f = ft[net]
        assert f["people"] == 2 and 0 <= f["tpir_at_fpir_0.05"] <= 1
        assert 0.5 <= f["verify_accuracy"] <= 1 and 0 <= f["verify_tar_at_far_0.01"] <= 1
    assert ft["gain"]["verify_accuracy"] == pytest.approx(
        ft["fine_tuned"]["verify_accuracy"] - ft["pretrained"]["verify_accuracy"], abs=2e-4)
    stored = load_file(str(res.model_path.with_suffix(".safetensors")))
    ref = pretrained_state(weights_dir)
    # the stem and the first residual stage were frozen: still the pretrained weights
    assert torch.equal(stored["model.backbone.stem.0.weight"], ref["stem.0.weight"])
    # the model's backbone is the average of the trained weights (the last checkpoint) and the
    # pretrained ones (fine_tuned_share 0.5), or the pretrained weights when the job kept them
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "epoch-0001.safetensors"))
    assert ft["fine_tuned_share"] == 0.5
    for name in ("fc.weight", "stages.3.3.conv2.weight"):
        want = ref[name] if ft["kept"] == "pretrained" else torch.lerp(
            ref[name], trained[f"model.backbone.{name}"], 0.5)
        assert not torch.equal(trained[f"model.backbone.{name}"], ref[name])
        torch.testing.assert_close(stored[f"model.backbone.{name}"], want)
    lm = LoadedModel(res.model_path.parent)
    xt, yt = faces["test"]
    truth = [faces["train"].names[i] for i in yt]
    assert np.mean([a == b for a, b in zip(_identify(lm, xt), truth)]) >= 0.9
    _check_descriptor_choice(res, lm, people=2)  # on the two people held out of training


def test_fine_tuning_that_wrecks_the_network_keeps_the_pretrained_one(faces, weights_dir,
                                                                      tmp_path):
    # no clipping, a huge constant rate on every layer: what clipping is there to prevent
    # (the weights as trained: fine_tuned_share 1, no average with the pretrained ones)
    cfg = TrainConfig(epochs=1, device="cpu", learning_rate=3.0, lr_schedule="constant",
                      backbone_lr_scale=1.0, freeze_stages=0, optimizer={"name": "sgd"},
                      clip={"mode": "none"}, fine_tuned_share=1.0)
    res = run_training_job(cfg, faces["train"], tmp_path / "run", pretrained_dir=weights_dir)
    ft = res.open_set["fine_tuning"]
    assert ft["kept"] == "pretrained" and "did not make the network better" in ft["note"]
    assert ft["fine_tuned"]["verify_accuracy"] < ft["pretrained"]["verify_accuracy"]
    stored = load_file(str(res.model_path.with_suffix(".safetensors")))
    assert torch.equal(stored["model.backbone.fc.weight"],
                       pretrained_state(weights_dir)["fc.weight"])
    assert res.open_set["known_named"] >= 0.95


def test_fine_tuning_judged_again_in_the_fused_descriptor(faces, weights_dir, tmp_path,
                                                         monkeypatch):
    """When descriptor 'auto' takes fused after the fine-tuned network was kept, the two
    networks are judged again, each beside SFace, on the same held-out people; where the
    fine-tuned one is not better there, the model serves the pretrained network beside SFace
    and says so. The four judgements are forced (ORL's frontal faces tie): fine-tuned kept,
    fused taken, then the pretrained network beside SFace preferred, and SFace as it is
    preferred to the fine-tuned one."""
    import facegrad.pipeline as pipeline

    # choose_network, choose_descriptor, in fused, tune_second_network
    verdicts = iter([True, True, False, False])
    monkeypatch.setattr(pipeline.open_set, "better", lambda a, b: next(verdicts))
    cfg = TrainConfig(epochs=1, device="cpu", calibration_identities=0.2, sface_epochs=1)
    res = run_training_job(cfg, faces["train"], tmp_path / "run", pretrained_dir=weights_dir)
    assert next(verdicts, None) is None  # each judgement made once
    ft, choice = res.open_set["fine_tuning"], res.open_set["descriptor_choice"]
    assert choice["chosen"] == "fused"
    in_fused = ft["in_fused"]
    assert in_fused["kept"] == ft["kept"] == "pretrained" and "beside SFace" in ft["note"]
    assert in_fused["fine_tuned"] == choice["fused"]  # the fine-tuned pair the choice measured
    assert in_fused["pretrained"]["people"] == 2
    assert in_fused["gain"]["verify_accuracy"] == pytest.approx(
        in_fused["fine_tuned"]["verify_accuracy"] - in_fused["pretrained"]["verify_accuracy"],
        abs=2e-4)
    stored = load_file(str(res.model_path.with_suffix(".safetensors")))
    ref = pretrained_state(weights_dir)
    for name in ("fc.weight", "stages.3.3.conv2.weight"):  # the pretrained weights, as read
        assert torch.equal(stored[f"model.backbone.{name}"], ref[name])
    lm = LoadedModel(res.model_path.parent)
    assert lm.meta["preprocessing"]["descriptor"] == "fused" and lm.fusion is not None
    assert res.open_set["sface_fine_tuning"]["kept"] == "pretrained"
    assert lm.meta["preprocessing"]["sface"] == "pretrained" and lm.fusion.network is None
    # the gallery is the pretrained pair's: the served model describes its images so
    # (other batch shapes: close, not equal)
    train_images = np.asarray(faces["train"].images)
    torch.testing.assert_close(lm.embed(train_images[:4]), lm.gallery.emb[:4], atol=1e-4,
                               rtol=1e-3)
    assert res.open_set["known_named"] >= 0.95


def test_leave_out_scores_leave_out_the_probe_and_its_person():
    # three people, two images each, on orthogonal axes; image 0 of person 0 has a twin
    emb = torch.eye(4)[[0, 0, 1, 1, 2, 3]]
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    s = leave_out_scores(emb, owner, 3, torch.arange(3))
    # known: each image against the gallery less itself
    assert s["known_ok"].tolist() == [True, True, True, True, False, False]
    assert s["known_score"].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # strangers: against the others only (nobody resembles anybody)
    assert s["stranger_score"].tolist() == [0.0] * 6


def test_equal_error_threshold():
    known = torch.linspace(0.90, 1.00, 101)
    stranger = torch.linspace(0.50, 0.70, 101)
    # separated: the middle of the gap between the 1 % tails
    t = equal_error_threshold(known, stranger)
    assert abs(t - (float(torch.quantile(known, 0.01)) + float(torch.quantile(stranger, 0.99)))
               / 2) < 1e-6
    # overlapping: as many known faces below as strangers above
    known, stranger = torch.linspace(0.5, 1.0, 1001), torch.linspace(0.3, 0.8, 1001)
    t = equal_error_threshold(known, stranger)
    assert abs(float((known < t).float().mean()) - float((stranger >= t).float().mean())) < 0.01
    assert abs(t - 0.65) < 0.01
