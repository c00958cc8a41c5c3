"""One registry of clip modes (facegrad.clipping.modes): a new mode, one module
(tests/clip_mode_toy.py) plus one ``register`` line, is accepted by TrainConfig, applied by
build_clipper, read by the CLI's --clip and labelled by sweeps."""

from __future__ import annotations

import pytest
import torch

from facegrad.clipping import CLIP_MODES, build_clipper, register
from facegrad.clipping.modes import unregister
from facegrad.service import sweeps
from facegrad.service.client_cli import parse_clip
from facegrad.training.config import TrainConfig
from tests.clip_mode_toy import TOY, ClipScale


@pytest.fixture
def toy_mode():
    register(TOY)
    yield TOY
    unregister(TOY.name)


def test_builtin_modes_are_registered():
    assert list(CLIP_MODES) == ["none", "value", "norm", "threshold", "agc", "autoclip"]
    assert TrainConfig().clip.mode == "norm"


def test_a_registered_mode_is_accepted_applied_and_offered(toy_mode):
    cfg = TrainConfig(architecture="seed_cnn", clip={"mode": "scale", "factor": 0.25})
    assert isinstance(cfg.clip, ClipScale) and cfg.clip.factor == 0.25

    model = torch.nn.Linear(3, 2)
    model(torch.ones(4, 3)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    result = build_clipper(cfg.clip, model)(model.parameters())
    for b, p in zip(before, model.parameters()):
        assert torch.allclose(p.grad, b * 0.25)
    assert bool(result.clipped)

    assert parse_clip("scale:0.25") == {"mode": "scale", "factor": 0.25}
    jobs = sweeps.expand({}, {"clip": [{"mode": "scale"}, {"mode": "norm", "max_norm": 5}]}, 10)
    assert [j["clip"]["mode"] for j in jobs] == ["scale", "norm"]
    # the knob is written even at its default
    assert sweeps.label_of({"clip": {"mode": "scale", "factor": 0.5}}) == "clip=scale:factor=0.5"


def test_an_unregistered_mode_is_refused():
    with pytest.raises(ValueError, match="scale"):
        TrainConfig(architecture="seed_cnn", clip={"mode": "scale"})
