"""One registry of clip modes (facegrad.clipping.modes): a new mode, one module
(tests/clip_mode_toy.py) plus one ``register`` line, is accepted by TrainConfig, applied by
build_clipper, read by the CLI's --clip and labelled by sweeps. One registry of architectures
(facegrad.recognition.architectures): a new one (tests/arch_toy.py) is accepted by TrainConfig,
built by build_model, trained by a job and offered by the CLI's --arch."""

from __future__ import annotations

import json

import pytest
import torch

from facegrad.clipping import CLIP_MODES, build_clipper, register
from facegrad.clipping.modes import unregister
from facegrad.pipeline import run_training_job
from facegrad.recognition.architectures import (
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    build_model,
)
from facegrad.recognition.architectures import register as register_architecture
from facegrad.recognition.architectures import unregister as unregister_architecture
from facegrad.recognition.inference import LoadedModel
from facegrad.service import sweeps
from facegrad.service.client_cli import arch_choices, arch_help, parse_clip
from facegrad.training.config import TrainConfig
from tests.arch_toy import TOY_ARCH, TinyNet
from tests.clip_mode_toy import TOY, ClipScale
from tests.test_training import _orl_faces


@pytest.fixture
def toy_mode():
    register(TOY)
    yield TOY
    unregister(TOY.name)


def cli_help(command: str) -> str:
    """``facegrad COMMAND --help`` as one line of text (its --clip and --arch help are read from
    the registries when help is shown)."""
    from typer.testing import CliRunner

    from facegrad.cli import cli

    r = CliRunner().invoke(cli, [command, "--help"], env={"COLUMNS": "2000"})
    assert r.exit_code == 0, r.output
    return " ".join(line.strip(" │") for line in r.output.splitlines())


def test_builtin_modes_are_registered():
    assert list(CLIP_MODES) == ["none", "value", "norm", "threshold", "agc", "autoclip",
                               "per_example"]
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
    assert "scale:0.5 (multiply the gradient by factor)" in cli_help("train")
    assert "scale:0.5" in cli_help("sweep")


def test_an_unregistered_mode_is_refused():
    with pytest.raises(ValueError, match="scale"):
        TrainConfig(architecture="seed_cnn", clip={"mode": "scale"})


# --- architectures (facegrad.recognition.architectures) ------------------------------------


@pytest.fixture
def toy_arch():
    register_architecture(TOY_ARCH)
    yield TOY_ARCH
    unregister_architecture(TOY_ARCH.name)


def test_builtin_architectures_are_registered():
    assert list(ARCHITECTURES) == ["dlib_resnet", "facenet_s", "seed_cnn"]
    assert TrainConfig().architecture == DEFAULT_ARCHITECTURE == "dlib_resnet"
    assert arch_choices() == list(ARCHITECTURES)


def test_a_registered_architecture_is_accepted_built_trained_and_offered(toy_arch, tmp_path):
    cfg = TrainConfig(architecture="tiny", batch_size=16, val_fraction=0.2,
                      calibration_identities=0, seed=1)
    # the job's unset fields take the architecture's defaults
    assert (cfg.epochs, cfg.image_size, cfg.learning_rate, cfg.optimizer.name) == (
        1, 32, 3e-3, "adamw")
    assert "tiny" in TrainConfig.model_json_schema()["properties"]["architecture"]["enum"]
    assert isinstance(build_model("tiny", 4, 32), TinyNet)

    faces = _orl_faces(4)
    res = run_training_job(cfg, faces, tmp_path / "m")
    meta = json.loads(res.model_path.read_text())
    assert meta["architecture"] == "tiny" and len(meta["history"]) == 1
    assert meta["preprocessing"]["normalisation"] == "per_image_standardise"
    lm = LoadedModel(tmp_path / "m")
    assert isinstance(lm.net, TinyNet) and lm.embed(faces.images[:3]).shape == (3, 128)

    assert "tiny" in arch_choices() and "one convolution" in arch_help()
    assert "tiny: one convolution" in cli_help("train")


def test_an_unregistered_architecture_is_refused():
    with pytest.raises(ValueError, match="tiny"):
        TrainConfig(architecture="tiny")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("tiny", 3, 32)


def test_the_api_lists_the_registered_clip_modes(toy_mode, tmp_path):
    """GET /v1/clip-modes (what the console builds its clip choices from) reads the registry:
    a mode registered at run time is listed with its knob's default and bounds."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from facegrad.service.settings import Settings

    app = create_app(Settings(data_dir=tmp_path, db_url=f"sqlite:///{tmp_path}/db.sqlite"),
                     reconcile=False)
    items = TestClient(app).get("/v1/clip-modes").json()["items"]
    assert [m["name"] for m in items] == list(CLIP_MODES)
    scale = items[-1]
    assert scale["name"] == "scale" and scale["label"] == TOY.label
    assert scale["knob"] == {"name": "factor", "default": 0.5, "minimum": None, "maximum": 1.0,
                             "exclusive_minimum": 0.0, "exclusive_maximum": None,
                             "description": None}
    assert scale["fields"] == ["on_nonfinite", "factor"]
    norm = next(m for m in items if m["name"] == "norm")
    assert norm["knob"]["name"] == "max_norm" and norm["knob"]["default"] == 5.0
    assert "scope" in norm["fields"] and items[0]["knob"] is None
