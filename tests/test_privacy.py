"""Private training (DP-SGD): per-example clipping is exact, the noise has the sd the
accountant assumes, epsilon agrees with Google's dp-accounting, and every setting that would
void the guarantee is refused saying why."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_accounting import PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.dp_event import GaussianDpEvent
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from pydantic import ValidationError
from torch import nn

from facegrad.clipping import build_clipper
from facegrad.clipping.config import ClipPerExample
from facegrad.data.store import FaceArrays
from facegrad.pipeline import GalleryEmbeddings, tune_second_network
from facegrad.recognition.dlib_resnet import Affine
from facegrad.recognition.models import CosineClassifier
from facegrad.training import private
from facegrad.training.config import TrainConfig
from facegrad.training.loop import Cancelled, Hooks, privacy_plan_for_dataset, train


class Tiny(nn.Module):
    """A frozen conv, dlib's per-channel affine, a conv, a linear projection and the CosFace
    head: every kind of layer a private dlib_resnet job trains, each with its per-sample (and
    per-unit) gradient rule."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.affine = Affine(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 16)
        self.classifier = CosineClassifier(16, classes, scale=30.0, margin=0.35)

    def forward(self, x, y):
        h = self.conv2(F.relu(self.affine(self.conv(x))))
        emb = F.normalize(self.fc(h.flatten(1)), dim=1)
        return emb, self.classifier(emb, y)


def _batch(n=12, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def _naive(model, x, y, groups, c):
    """The definition: each unit's gradient alone (its rows' summed loss), clipped to c,
    summed, divided by the number of units."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for g in groups:
        loss = F.cross_entropy(model(x[g], y[g])[1], y[g], reduction="sum")
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(gr.pow(2).sum() for gr in grads))
        factor = min(1.0, c / (float(norm) + 1e-6))
        for t, gr in zip(total, grads, strict=True):
            t += factor * gr
    return [t / len(groups) for t in total]


@pytest.mark.parametrize("unit", ["image", "person", "person-rows"])
@pytest.mark.parametrize("max_norm", [0.05, 1e6])  # every unit clipped; none
def test_per_example_clipping_equals_a_naive_loop(unit, max_norm):
    """'person': Opacus' per-photo rows summed by person in the clipper; 'person-rows': one
    row per person from the per-unit rules (``private.grouped_rows``), as private jobs run."""
    torch.manual_seed(0)
    model = Tiny()
    model.conv.requires_grad_(False)  # a frozen layer, as a private job freezes early stages
    x, y = _batch()
    clipper = build_clipper(ClipPerExample(mode="per_example", max_norm=max_norm), model)
    gsm = private.wrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if unit == "image":
        groups = [[i] for i in range(len(y))]
        units, n_units = None, None
    else:  # a person's photos: rows sharing a label, split over two chunks (virtual steps)
        groups = [torch.nonzero(y == c).view(-1).tolist() for c in y.unique()]
        units = torch.empty(len(y), dtype=torch.long)
        for u, g in enumerate(groups):
            units[g] = u
        n_units = len(groups)
    order = torch.cat([torch.tensor(g) for g in groups])
    halves = (order[: len(order) // 2], order[len(order) // 2:]) if unit == "image" else (order,)
    for rows in halves:
        loss = F.cross_entropy(gsm(x[rows], y[rows])[1], y[rows], reduction="sum")
        if unit == "person-rows":
            with private.grouped_rows(units[rows]):
                loss.backward()
            assert all(p.grad_sample.shape[0] == n_units for p in params)
            clipper.accumulate(params)
        else:
            loss.backward()
            clipper.accumulate(params, None if units is None else units[rows], n_units)
    result = clipper(params)
    got = [p.grad.clone() for p in params]
    gsm.remove_hooks()
    want = _naive(model, x, y, groups, max_norm)
    # float32 sums taken in another order (per unit, then over units): rounding only
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)
    assert int(result.examples) == len(groups)
    assert int(result.examples_clipped) == (len(groups) if max_norm < 1 else 0)


def test_noise_has_the_sd_the_accountant_assumes():
    """sd of each coordinate of the averaged gradient = sigma * C / expected units."""
    model = nn.Linear(500, 400)
    clipper = build_clipper(ClipPerExample(mode="per_example", max_norm=2.0), model)
    clipper.set_noise(1.5, 50.0, torch.Generator().manual_seed(1))
    params = list(model.parameters())
    for p in params:  # one example whose gradient is zero: only noise remains
        p.grad_sample = torch.zeros(1, *p.shape)
    clipper.accumulate(params)
    clipper(params)
    noise = torch.cat([p.grad.flatten() for p in params])
    want = 1.5 * 2.0 / 50.0
    assert abs(float(noise.std()) / want - 1) < 0.01  # 200k draws: sd of the estimate ~0.16 %
    assert abs(float(noise.mean())) < 4 * want / noise.numel() ** 0.5


def _dp_accounting_epsilon(sigma, q, steps, delta, kind):
    event = SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)
    acc = PLDAccountant() if kind == "prv" else RdpAccountant()
    return acc.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("kind", ["prv", "rdp"])
@pytest.mark.parametrize("sigma,q,steps", [(1.1, 0.01, 1000), (0.8, 0.05, 300), (2.0, 0.1, 60)])
def test_epsilon_agrees_with_dp_accounting(kind, sigma, q, steps):
    plan = private.PrivacyPlan("person", 1000, 10000, q, int(1 / q), steps, sigma, 1e-5, kind,
                               1.0, None)
    acc = private.Accountant(plan)
    for _ in range(steps):
        acc.step()
    ours = acc.epsilon()
    theirs = _dp_accounting_epsilon(sigma, q, steps, 1e-5, kind)
    assert abs(ours / theirs - 1) < 0.02, (ours, theirs)


def test_accountant_state_survives_a_checkpoint():
    plan = private.PrivacyPlan("image", 100, 100, 0.1, 10, 20, 1.0, 1e-5, "prv", 1.0, None)
    whole, first = private.Accountant(plan), private.Accountant(plan)
    for _ in range(20):
        whole.step()
    for _ in range(12):
        first.step()
    resumed = private.Accountant(plan)
    resumed.load_state_dict(first.state_dict())
    for _ in range(8):
        resumed.step()
    assert resumed.steps == 20
    assert resumed.epsilon() == pytest.approx(whole.epsilon(), rel=1e-9)


def _cfg(**kw) -> TrainConfig:
    base = {"clip": {"mode": "per_example", "max_norm": 1.0},
            "privacy": {"target_epsilon": 8, "delta": 1e-5}}
    return TrainConfig.model_validate(base | kw)


@pytest.mark.parametrize("kw,reason", [
    ({"clip": {"mode": "norm", "max_norm": 5}}, "needs clip mode 'per_example'"),
    ({"epochs": 0}, "epochs 0 trains nothing"),
    ({"devices": 2}, "runs on one device"),
    ({"privacy": {"target_epsilon": 8, "noise_multiplier": 1.0}}, "exactly one of"),
    ({"privacy": {"delta": 1e-5}}, "exactly one of"),
])
def test_settings_that_void_the_guarantee_are_refused(kw, reason):
    with pytest.raises(ValidationError, match=reason):
        _cfg(**kw)


def test_private_defaults_train_the_projection_only_unless_asked():
    assert _cfg().freeze_stages == 5
    assert _cfg(freeze_stages=2).freeze_stages == 2
    assert TrainConfig().freeze_stages == 2


def _labels(people: int, per_person: int) -> FaceArrays:
    labels = np.repeat(np.arange(people), per_person)
    return FaceArrays(np.zeros((len(labels), 1, 1, 3), np.uint8), labels,
                      [f"p{i}" for i in range(people)])


@pytest.mark.parametrize("kw,reason", [
    ({"architecture": "facenet_s"}, "cannot clip per example.*[Bb]atch"),
    ({"privacy": {"target_epsilon": 8, "expected_batch_size": 4096}},
     "not smaller than the .* training images"),
    ({"privacy": {"target_epsilon": 8, "delta": 0.005}}, "is not below 1 /"),
])
def test_dataset_dependent_refusals_say_why(kw, reason):
    with pytest.raises(private.PrivacyError, match=reason):
        privacy_plan_for_dataset(_cfg(**kw), _labels(300, 8))


def test_plan_counts_people_for_unit_person_and_images_for_unit_image():
    data = _labels(300, 8)
    person = privacy_plan_for_dataset(
        _cfg(privacy={"target_epsilon": 8, "expected_batch_size": 64}), data)
    image = privacy_plan_for_dataset(_cfg(privacy={
        "target_epsilon": 8, "delta": 1e-5, "unit": "image", "expected_batch_size": 64}), data)
    # 20 % of the people are held out for calibration, 10 % of each one's photos validate
    assert person.units == 240 and image.units == person.images == image.images
    assert person.sample_rate == image.sample_rate == pytest.approx(64 / person.images)
    # the architecture's default epochs (8 for dlib_resnet), each of about 1/q steps
    assert _cfg().epochs == 8
    assert person.steps == image.steps == int(1 / person.sample_rate) * 8
    # unset: 256 images a step, at most a quarter of the training images
    small = privacy_plan_for_dataset(_cfg(), _labels(100, 8))
    assert small.expected_batch_size == small.images // 4
    default = privacy_plan_for_dataset(_cfg(), data).expected_batch_size
    assert default == min(256, person.images // 4)


def test_a_resumed_private_run_accounts_the_whole_run(tmp_path):
    """Killed after epoch 2 of 3 and resumed from its checkpoint: epsilon covers all 3 epochs
    (the accountant's history is in the checkpoint), exactly as the uninterrupted run's."""
    from tests.test_training import _orl_faces
    from tests.test_training import cfg as small_cfg

    faces = _orl_faces(8)
    c = small_cfg(clip={"mode": "per_example", "max_norm": 1.0}, epochs=3, batch_size=8,
                  calibration_identities=0,
                  privacy={"noise_multiplier": 1.0, "delta": 1e-3, "unit": "person",
                           "expected_batch_size": 16})
    whole = train(c, faces, tmp_path / "whole")
    seen = []
    with pytest.raises(Cancelled):
        train(c, faces, tmp_path / "cut", Hooks(on_epoch=lambda r: seen.append(r["epoch"]),
                                                should_stop=lambda: len(seen) >= 2))
    last = sorted((tmp_path / "cut" / "checkpoints").glob("epoch-*.json"))[-1]
    resumed = train(c, faces, tmp_path / "cut", resume=last)
    assert resumed.resumed_from_epoch == 2
    assert resumed.privacy["steps_done"] == whole.privacy["steps_done"] == whole.privacy["steps"]
    assert resumed.privacy["epsilon"] == pytest.approx(whole.privacy["epsilon"], rel=1e-9)
    assert [h["epsilon"] for h in resumed.history] == pytest.approx(
        [h["epsilon"] for h in whole.history], rel=1e-9)
    # epsilon grows with every epoch; the telemetry counts people, one by one
    eps = [h["epsilon"] for h in whole.history]
    assert eps == sorted(eps) and eps[0] > 0
    assert all(h["clipping"]["examples"]["count"] <= 8 * whole.privacy["steps_per_epoch"]
               for h in whole.history)
    # with the fused descriptor, SFace is not fine-tuned on the dataset: the guarantee covers
    # the training that clips and noises each example, and that fine-tuning would not
    fused = _cfg(descriptor="fused")
    gallery = GalleryEmbeddings(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), "fused")
    served, rec = tune_second_network(fused, whole, gallery)
    assert served is gallery and rec["kept"] == "pretrained" and "private job" in rec["note"]
