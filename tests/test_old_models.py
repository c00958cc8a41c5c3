"""Models written by earlier versions, whose faces were described otherwise than by the model's
normalised embedding, are refused with a message that says to retrain; the API answers 409."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from facegrad.recognition.architectures import build_model
from facegrad.recognition.inference import LoadedModel, UnsupportedModel
from facegrad.training import checkpoint as ckpt

LABELS = ["ann", "bob"]


def _write_model(folder, preprocessing: dict, open_set: dict | None = None) -> None:
    """A seed_cnn model folder (random weights, a 4-image gallery) with this model.json."""
    torch.manual_seed(0)
    net = build_model("seed_cnn", len(LABELS), preprocessing["image_size"])
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    tensors |= {"gallery.emb": torch.nn.functional.normalize(torch.randn(4, 128), dim=1),
                "gallery.owner": torch.tensor([0, 0, 1, 1]),
                "gallery.counts": torch.tensor([2, 2])}
    meta = {"kind": "model", "architecture": "seed_cnn", "labels": LABELS,
            "classifier_labels": LABELS, "num_classes": len(LABELS),
            "preprocessing": preprocessing,
            "open_set": {"threshold": 0.5, "verify_threshold": 0.5} | (open_set or {})}
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.save(folder / "model", tensors, meta)


CURRENT = {"version": 2, "store_size": 150, "image_size": 32, "channels": 3,
           "normalisation": "per_image_standardise", "descriptor": "embedding"}
# what models of the first preprocessing version recorded (cascade crops of 128 px, the
# backbone descriptor beside LBP histograms, within-class normalisation)
VERSION_1 = {"version": 1, "store_size": 128, "image_size": 32, "channels": 3,
             "normalisation": "per_image_standardise", "flip_tta": False,
             "scale_tta": [1.0, 0.9], "descriptor": "backbone+lbp", "lbp_share": 0.35,
             "mid_stage_share": 0.0,
             "within_class": {"method": "wccn", "identities": 2}}
OLD = {
    "version 1": (VERSION_1, {"score_adjustment": {"method": "cluster_tightness"}}),
    "no version": ({k: v for k, v in CURRENT.items() if k != "version"}, None),
    "backbone descriptor": (CURRENT | {"descriptor": "backbone"}, None),
    "within-class normalisation": (CURRENT | {"within_class": {"method": "wccn"}}, None),
    "LBP share": (CURRENT | {"lbp_share": 0.35}, None),
    "score adjustment": (CURRENT, {"score_adjustment": {"method": "cluster_tightness",
                                                        "weight": 0.5, "reference": 0.9}}),
    "scale TTA": (CURRENT | {"scale_tta": [1.0, 0.9]}, None),
}


@pytest.mark.parametrize("case", list(OLD))
def test_old_models_are_refused_with_a_clear_message(tmp_path, case):
    preprocessing, open_set = OLD[case]
    _write_model(tmp_path / "m", preprocessing, open_set)
    with pytest.raises(UnsupportedModel) as e:
        LoadedModel(tmp_path / "m")
    msg = str(e.value)
    assert "earlier facegrad" in msg and "no longer computes" in msg
    assert "retrain" in msg and "POST /v1/jobs" in msg
    assert isinstance(e.value, ValueError)


def test_a_current_model_loads_and_answers(tmp_path):
    _write_model(tmp_path / "m", CURRENT)
    lm = LoadedModel(tmp_path / "m")
    crops = np.random.default_rng(0).integers(0, 256, (3, 150, 150, 3), dtype=np.uint8)
    emb = lm.embed(crops)
    assert emb.shape == (3, 128)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert len(lm.match(emb, top_k=2)) == 3


def test_the_api_answers_409_with_the_message(tmp_path):
    from app.main import create_app
    from facegrad.service.db import Model, session_scope
    from facegrad.service.settings import Settings

    settings = Settings(data_dir=tmp_path, api_keys="", cors_origins="")
    folder = tmp_path / "runs" / "old"
    _write_model(folder, *OLD["version 1"])
    with session_scope(settings.db_url) as db:  # creates the tables
        m = Model(architecture="seed_cnn", path=str(folder / "model.json"), labels=LABELS,
                  preprocessing=VERSION_1, open_set={"threshold": 0.5})
        db.add(m)
        db.flush()
        model_id = m.id
    # the model is loaded before anything else of the request is used: no lifespan needed
    client = TestClient(create_app(settings, reconcile=False))
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(png, "PNG")
    files = {"file": ("face.png", png.getvalue(), "image/png")}
    for url, data in (("/v1/identify", {"model_id": model_id, "detect": "none"}),
                      (f"/v1/models/{model_id}/identities", {"identity": "carl"})):
        r = client.post(url, data=data, files=files)
        assert r.status_code == 409, (url, r.text)
        detail = r.json()["detail"]
        assert "earlier facegrad" in detail and "POST /v1/jobs" in detail
