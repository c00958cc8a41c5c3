"""A client generated from the served /openapi.json works as it comes.

``openapi-python-client generate`` runs on the live session service's document; the generated
package is imported and the whole journey goes through it, nothing patched: upload, train
(epochs 0: the pretrained network, gallery and calibration only), identify, verify, enroll,
the weights, a sweep and its leaderboard (JSON and CSV), a 404, and a keyed server's 401/403,
each error parsed as the typed ``Error``. Plus what generators rely on, read from the document.
"""

from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.harness import zip_of
from tests.test_auth import ADMIN_KEY, IDENTIFY_KEY, WRONG_KEY, keyed  # noqa: F401 (keyed: fixture)

PACKAGE = "facegrad_generated_client"
FILE_OPERATIONS = ("upload_dataset", "identify", "verify", "enroll")
METHODS = ("get", "post", "put", "patch", "delete")


def v1_operations(doc: dict) -> list[tuple[str, str, dict]]:
    return [(m, path, op) for path, item in doc["paths"].items() if path.startswith("/v1")
            for m, op in item.items() if m in METHODS]


def test_served_document_is_what_generators_need(client):
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    ops = [op for item in doc["paths"].values() for m, op in item.items() if m in METHODS]
    ids = [op["operationId"] for op in ops]
    assert len(ids) == len(set(ids)), ids
    assert all(len(i) < 32 for i in ids), [i for i in ids if len(i) >= 32]
    assert {"upload_dataset", "create_job", "get_job", "identify", "verify", "enroll",
            "create_sweep", "get_sweep_leaderboard", "get_sweep_leaderboard_csv",
            "get_model_weights", "list_clip_modes"} <= set(ids)

    for method, path, op in v1_operations(doc):
        for status in ("401", "403", "422"):
            content = op["responses"].get(status, {}).get("content", {})
            assert content == {"application/json": {"schema": {"$ref":
                                                               "#/components/schemas/Error"}}}, \
                (method, path, status, op["responses"].get(status))
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas

    by_id = {op["operationId"]: op for op in ops}
    for name in FILE_OPERATIONS:
        ref = by_id[name]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        field = schemas[ref.rsplit("/", 1)[1]]["properties"]["file"]
        field = field.get("items", field)
        assert field["type"] == "string" and field["format"] == "binary", (name, field)

    text = json.dumps(doc)
    for name in ("JobStatus", "SweepStatus", "Detect", "OnNonfinite", "ClipScope", "MetricName"):
        # the component's own list only: every field with these values refers to it
        assert text.count(json.dumps(schemas[name]["enum"])) == 1, name
    assert '"$ref": "#/components/schemas/OnNonfinite"' in text

    # the CSV is its own operation; the old ?format=csv still works but is not documented
    assert not [p for op in ops for p in op.get("parameters", []) if p["name"] == "format"]
    csv_ok = by_id["get_sweep_leaderboard_csv"]["responses"]["200"]["content"]
    assert list(csv_ok) == ["text/csv"]
    assert list(by_id["get_sweep_leaderboard"]["responses"]["200"]["content"]) == [
        "application/json"]
    weights = by_id["get_model_weights"]["responses"]["200"]["content"]
    assert weights == {"application/octet-stream": {"schema": {"type": "string",
                                                               "format": "binary"}}}
    ready = by_id["readyz"]["responses"]
    assert ready["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Readiness"}


@pytest.fixture(scope="module")
def gen(service, tmp_path_factory):
    """The package openapi-python-client generates from the running service's document."""
    out = tmp_path_factory.mktemp("generated")
    config = out / "config.yaml"
    config.write_text(f"package_name_override: {PACKAGE}\npost_hooks: []\n")
    tool = Path(sys.executable).with_name("openapi-python-client")
    r = subprocess.run([str(tool), "generate", "--url", f"{service.url}/openapi.json",
                        "--meta", "none", "--output-path", str(out / PACKAGE),
                        "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    sys.path.insert(0, str(out))
    try:
        mods = {name: importlib.import_module(f"{PACKAGE}.{name}") for name in (
            "client", "models", "types", "api.datasets.upload_dataset",
            "api.datasets.get_dataset", "api.jobs.create_job",
            "api.jobs.get_job", "api.identify.identify", "api.identify.verify",
            "api.models.enroll", "api.models.get_model", "api.models.get_model_weights",
            "api.models.list_models", "api.datasets.list_datasets", "api.sweeps.create_sweep",
            "api.sweeps.get_sweep", "api.sweeps.get_sweep_leaderboard",
            "api.sweeps.get_sweep_leaderboard_csv")}
        yield SimpleNamespace(**{k.rsplit(".", 1)[-1]: v for k, v in mods.items()})
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _file(g, path: Path):
    return g.types.File(payload=io.BytesIO(path.read_bytes()), file_name=path.name,
                        mime_type="image/png")


def _poll(get, done, timeout: float):
    end = time.time() + timeout
    while True:
        doc = get()
        if done(doc) or time.time() > end:
            return doc
        time.sleep(0.5)


def test_generated_client_journey(gen, service, orl):
    g, m = gen, gen.models
    train, test = orl
    people = sorted(train)[:4]
    api = g.client.Client(base_url=service.url, raise_on_unexpected_status=True,
                          timeout=httpx.Timeout(120))

    zipped = zip_of({p: train[p][:4] for p in people})
    ds = g.upload_dataset.sync(client=api, body=m.BodyUploadDataset(
        file=g.types.File(payload=io.BytesIO(zipped), file_name="gen.zip",
                          mime_type="application/zip"),
        name="generated-client", detect=m.Detect.AUTO))
    assert isinstance(ds, m.DatasetOut), ds
    # 201 ready when the ingest ended while the request waited, else 202 ingesting: polled
    ds = _poll(lambda: g.get_dataset.sync(ds.id, client=api),
               lambda d: d.status != m.DatasetOutStatus.INGESTING, 180)
    assert ds.status == m.DatasetOutStatus.READY, ds.error
    assert ds.num_identities == 4 and ds.detect == m.Detect.AUTO

    job = g.create_job.sync(client=api, body=m.JobCreate(dataset_id=ds.id, epochs=0))
    assert isinstance(job, m.JobOut) and job.status == m.JobStatus.QUEUED, job
    job = _poll(lambda: g.get_job.sync(job.id, client=api),
                lambda j: j.status in (m.JobStatus.SUCCEEDED, m.JobStatus.FAILED,
                                       m.JobStatus.CANCELLED), 180)
    assert job.status == m.JobStatus.SUCCEEDED, job.error
    assert isinstance(job.metrics, m.TrainMetrics)
    assert isinstance(job.metrics.open_set, m.OpenSetFigures)
    model = g.get_model.sync(job.model_id, client=api)
    assert isinstance(model.open_set, m.OpenSetFigures)
    assert isinstance(model.open_set.threshold, float)
    assert model.open_set.threshold == model.threshold

    probes = [test[p][0] for p in people[:2]]
    out = g.identify.sync(client=api, body=m.BodyIdentify(
        file=[_file(g, p) for p in probes], model_id=model.id, top_k=2))
    assert isinstance(out, m.IdentifyOut), out
    assert [r.filename for r in out.results] == [p.name for p in probes]
    for r, person in zip(out.results, people):
        assert r.faces and r.faces[0].candidates[0].identity == person

    same = g.verify.sync(client=api, body=m.BodyVerify(
        file=[_file(g, test[people[0]][0]), _file(g, test[people[0]][1])], model_id=model.id))
    assert isinstance(same, m.VerifyOut) and isinstance(same.same_person, bool), same

    newcomer = sorted(train)[4]
    enrolled = g.enroll.sync(model.id, client=api, body=m.BodyEnroll(
        identity="newcomer", file=[_file(g, p) for p in train[newcomer][:2]]))
    assert isinstance(enrolled, m.IdentityList), enrolled
    assert enrolled.identities["newcomer"] == 2

    weights = g.get_model_weights.sync(model.id, client=api)
    assert isinstance(weights, g.types.File), weights
    assert len(weights.payload.read()) > 1_000_000

    sweep = g.create_sweep.sync(client=api, body=m.SweepCreate(
        name="generated-client", base=m.JobCreate(dataset_id=ds.id, epochs=0),
        grid=m.SweepCreateGrid.from_dict({"seed": [0, 1]}), metric=m.MetricName.VAL_ACC))
    assert isinstance(sweep, m.SweepOut) and len(sweep.job_ids) == 2, sweep
    sweep = _poll(lambda: g.get_sweep.sync(sweep.id, client=api),
                  lambda s: s.status not in (m.SweepStatus.QUEUED, m.SweepStatus.RUNNING), 180)
    assert sweep.status == m.SweepStatus.SUCCEEDED, sweep
    board = g.get_sweep_leaderboard.sync(sweep.id, client=api)
    assert isinstance(board, m.Leaderboard) and board.status == m.SweepStatus.SUCCEEDED
    assert len(board.rows) == 1 and board.rows[0].runs == 2
    csv_text = g.get_sweep_leaderboard_csv.sync(sweep.id, client=api, metric="wall_seconds")
    assert isinstance(csv_text, str), csv_text
    lines = csv_text.strip().splitlines()
    assert lines[0].startswith("runs,succeeded,failed,") and lines[1].startswith("2,2,0,"), lines

    missing = g.get_job.sync(str(uuid.uuid4()), client=api)
    assert isinstance(missing, m.Error) and "no job" in missing.detail, missing
    bad = g.identify.sync(client=api, body=m.BodyIdentify(
        file=[_file(g, probes[0])], model_id=model.id, top_k=1000))
    assert isinstance(bad, m.Error) and isinstance(bad.detail[0], m.FieldError), bad
    assert bad.detail[0].loc == ["body", "top_k"]
    bad = g.get_job.sync("not-a-uuid", client=api)
    assert isinstance(bad, m.Error) and bad.detail[0].loc == ["path", "job_id"], bad


def test_generated_client_on_a_keyed_server(gen, keyed):  # noqa: F811
    g, m = gen, gen.models
    anonymous = g.client.Client(base_url=keyed.url, raise_on_unexpected_status=True)

    def keyed_client(key):
        return g.client.AuthenticatedClient(base_url=keyed.url, token=key, prefix="",
                                            auth_header_name="X-API-Key",
                                            raise_on_unexpected_status=True)

    for c in (anonymous, keyed_client(WRONG_KEY)):
        refused = g.list_models.sync(client=c)
        assert isinstance(refused, m.Error) and "X-API-Key" in refused.detail, refused
    refused = g.list_datasets.sync(client=keyed_client(IDENTIFY_KEY))
    assert isinstance(refused, m.Error) and "role 'identify'" in refused.detail, refused
    listed = g.list_models.sync(client=keyed_client(ADMIN_KEY))
    assert isinstance(listed, m.ModelList), listed
