"""Open-set identification on real faces through the real service, with the default job.

Two face sets: bare ORL images (30 known people, 10 strangers) and the same people's faces
placed uncropped in wider photos under harsh side light (tests/scenes.py; 10 known, 5
strangers). Each known person is trained from 7 images and asked about the 3 others; strangers
are people the model never saw, first to be rejected, then three of them enrolled from 5 photos
and asked about their other 5. Bars are issue 16's; figures are recorded in docs/checks.md.
"""

from __future__ import annotations

import io
import random
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.harness import identify_all, top_identity, upload, wait_job
from tests.scenes import photo_set, two_faces

KNOWN_MIN = 0.95  # held-out images of known people named
CLOSED_MIN = 0.98  # ... and named right at the model's threshold, 3 per person held out
REJECT_MIN = 0.95  # images of people never seen answered "unknown"
ENROLLED_MIN = 0.94  # people enrolled from 5 photos after training, named on their others
VERIFY_MIN = 0.95  # same/different-person pairs told apart
N_ENROLLED = 3


def _report(name: str, value: float, bar: float) -> None:
    print(f"{name}: {value:.3f} (bar {bar:.2f})")


def _rate(results: list[dict], truth: list[str | None]) -> float:
    return float(np.mean([top_identity(r) == t for r, t in zip(results, truth)]))


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _train_default(client, folder: dict[str, list[Path]], name: str) -> dict:
    ds = upload(client, folder, name)
    assert not ds["rejected"], ds["rejected"]
    t0 = time.monotonic()
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"]})  # the default job
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout=1200)
    assert job["status"] == "succeeded", job
    seconds = (datetime.fromisoformat(job["finished_at"])
               - datetime.fromisoformat(job["started_at"])).total_seconds()
    print(f"{name}: default job {seconds:.1f} s on the worker "
          f"({time.monotonic() - t0:.1f} s from submission)")
    return client.get(f"/v1/models/{job['model_id']}").json()


def _as_files(photos: dict[str, list[np.ndarray]], folder: Path) -> dict[str, list[Path]]:
    out = {}
    for name, pics in photos.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        out[name] = []
        for i, pic in enumerate(pics):
            p = folder / name / f"{i + 1:02d}.png"
            p.write_bytes(_png(pic))
            out[name].append(p)
    return out


def _split(orl, names: list[str], files: dict[str, list[Path]] | None = None):
    """(train, test) of ``names`` by orl_split's choice of images: photo i shows ORL image i."""
    train, test = orl
    if files is None:
        return {n: train[n] for n in names}, {n: test[n] for n in names}

    def pick(split, n):
        return [files[n][int(p.stem) - 1] for p in split[n]]

    return {n: pick(train, n) for n in names}, {n: pick(test, n) for n in names}


@pytest.fixture(scope="module", params=["orl", "photos"])
def case(request, client, orl, tmp_path_factory):
    names = sorted(orl[0])
    if request.param == "orl":
        known, strangers, files = names[:30], names[30:], None
    else:  # people the ORL case did not choose on, in photos
        people = names[25:40]
        files = _as_files(photo_set(people, 2026), tmp_path_factory.mktemp("photos"))
        known, strangers = people[:10], people[10:]
    train, test = _split(orl, known, files)
    s_train, s_test = _split(orl, strangers, files)
    all_strangers = {n: s_train[n] + s_test[n] for n in strangers}
    model = _train_default(client, train, f"{request.param}-{len(known)}")
    return {"name": request.param, "model": model, "model_id": model["id"], "known": known,
            "train": train, "test": test, "strangers": all_strangers}


def test_model_records_its_calibration_and_both_networks(case):
    m = case["model"]
    os_ = m["open_set"]
    assert m["architecture"] == "dlib_resnet" and m["input_size"] == [150, 150, 3]
    assert os_["method"] == "leave_out" and os_["policy"] == "equal_error"
    assert 0 < m["threshold"] <= 1 and m["threshold"] == os_["threshold"]
    ft = os_["fine_tuning"]  # held-out people compare the fine-tuned network with the original
    assert len(ft["held_out"]) == round(0.2 * len(case["known"]))
    assert ft["kept"] in ("fine_tuned", "pretrained")
    # descriptor 'auto': flip_mean and fused measured on the same held-out people, one kept
    dc = os_["descriptor_choice"]
    assert dc["chosen"] == m["preprocessing"]["descriptor"] in ("flip_mean", "fused")
    assert dc["flip_mean"]["people"] == dc["fused"]["people"] == len(ft["held_out"])
    print(f"{case['name']}: pretrained {ft['pretrained']}, fine-tuned {ft['fine_tuned']}, "
          f"kept {ft['kept']}; descriptor flip_mean {dc['flip_mean']}, fused {dc['fused']}, "
          f"kept {dc['chosen']}; threshold {m['threshold']:.4f}")
    # the held-out people were enrolled from their images: the gallery knows every known person
    assert sorted(m["labels"]) == sorted(case["known"])


def test_known_named_and_strangers_rejected(client, case):
    mid, test = case["model_id"], case["test"]
    paths = [p for n in case["known"] for p in test[n]]
    truth = [n for n in case["known"] for _ in test[n]]
    res = identify_all(client, paths, mid)
    known = _rate(res, truth)
    assert all(0 <= f["confidence"] <= 1 for r in res for f in r["faces"])
    spaths = [p for ps in case["strangers"].values() for p in ps]
    sres = identify_all(client, spaths, mid)
    rejected = _rate(sres, [None] * len(spaths))
    # threshold-free: known faces named at the score only 5 % of strangers reach
    stranger_conf = [r["faces"][0]["confidence"] if r["faces"] else 0.0 for r in sres]
    at = float(np.quantile(stranger_conf, 0.95))
    at5 = float(np.mean([bool(r["faces"]) and r["faces"][0]["candidates"][0]["identity"] == t
                         and r["faces"][0]["confidence"] > at for r, t in zip(res, truth)]))
    name = case["name"]
    _report(f"{name}: known, {len(paths)} held-out images, at threshold "
            f"{case['model']['threshold']:.3f}", known, CLOSED_MIN)
    _report(f"{name}: strangers rejected, {len(spaths)} images", rejected, REJECT_MIN)
    _report(f"{name}: known named at 5 % stranger acceptance", at5, KNOWN_MIN)
    assert known >= CLOSED_MIN and rejected >= REJECT_MIN and at5 >= KNOWN_MIN
    # the request's threshold overrides the model's
    r = identify_all(client, spaths[:2], mid, threshold=-1.0)
    assert all(top_identity(x) is not None for x in r)


def test_enrolled_strangers_named(client, case):
    mid = case["model_id"]
    strangers = list(case["strangers"])
    enrolled, others = strangers[:N_ENROLLED], strangers[N_ENROLLED:]
    try:
        for n in enrolled:
            files = [("file", (p.name, p.read_bytes())) for p in case["strangers"][n][:5]]
            r = client.post(f"/v1/models/{mid}/identities", data={"identity": n}, files=files)
            assert r.status_code == 201, r.text
            assert r.json()["identities"][n] == 5
        paths = [p for n in enrolled for p in case["strangers"][n][5:]]
        truth = [n for n in enrolled for _ in case["strangers"][n][5:]]
        acc = _rate(identify_all(client, paths, mid), truth)
        opaths = [p for n in others for p in case["strangers"][n]]
        rejected = _rate(identify_all(client, opaths, mid), [None] * len(opaths))
        _report(f"{case['name']}: enrolled people, {len(paths)} other images", acc,
                ENROLLED_MIN)
        _report(f"{case['name']}: remaining strangers rejected, {len(opaths)} images",
                rejected, REJECT_MIN)
    finally:
        for n in enrolled:
            client.delete(f"/v1/models/{mid}/identities/{n}")
    ids = client.get(f"/v1/models/{mid}/identities").json()["identities"]
    assert sorted(ids) == sorted(case["known"])
    assert acc >= ENROLLED_MIN and rejected >= REJECT_MIN


def test_verify_separates_pairs(client, case):
    mid, test, known = case["model_id"], case["test"], case["known"]
    rng = random.Random(5)
    same = [(a, b) for n in known for i, a in enumerate(test[n]) for b in test[n][i + 1:]]
    diff = []
    while len(diff) < len(same):
        x, y = rng.sample(known, 2)
        diff.append((rng.choice(test[x]), rng.choice(test[y])))
    right = 0
    for pairs, want in ((same, True), (diff, False)):
        for a, b in pairs:
            r = client.post("/v1/verify", data={"model_id": mid},
                            files=[("file", (a.name, a.read_bytes())),
                                   ("file", (b.name, b.read_bytes()))])
            assert r.status_code == 200, r.text
            v = r.json()
            # both identified: the identities decide; otherwise the similarity does
            if None in v["identities"]:
                assert v["basis"] == "similarity"
                assert v["same_person"] == (v["similarity"] >= v["threshold"]), v
            else:
                assert v["basis"] == "identity"
                assert v["same_person"] == (v["identities"][0] == v["identities"][1]), v
            right += v["same_person"] == want
    acc = right / (len(same) + len(diff))
    _report(f"{case['name']}: verify, {len(same)} same + {len(diff)} different pairs", acc,
            VERIFY_MIN)
    assert acc >= VERIFY_MIN


def test_two_faces_in_one_picture(client, case):
    """Two known people side by side in one 640x480 picture: two boxes, biggest first, each
    around its face, both named."""
    a, b = case["known"][3], case["known"][7]
    img_a = Image.open(case["train"][a][0]) if case["name"] == "orl" else _orl_of(case, a)
    img_b = Image.open(case["train"][b][0]) if case["name"] == "orl" else _orl_of(case, b)
    pic, boxes = two_faces(img_a, img_b, np.random.default_rng(0), boxes=True)
    r = client.post("/v1/identify", data={"model_id": case["model_id"]},
                    files=[("file", ("two.png", _png(pic)))])
    assert r.status_code == 200, r.text
    faces = r.json()["results"][0]["faces"]
    assert len(faces) == 2, faces
    areas = [f["box"][2] * f["box"][3] for f in faces]
    assert areas[0] >= areas[1]
    named = {}
    for f in faces:
        x, y, w, h = f["box"]
        cx, cy = x + w / 2, y + h / 2
        who = [n for n, (left, top, right, bottom) in zip((a, b), boxes)
               if left <= cx < right and top <= cy < bottom]
        assert len(who) == 1, (f["box"], boxes)
        named[who[0]] = f["identity"]
    print(f"{case['name']}: two faces named {named}")
    assert named == {a: a, b: b}


def _orl_of(case, name):
    """The ORL image behind a person's first training photo (photo i shows ORL image i)."""
    from tests.harness import ORL

    return Image.open(ORL / name / case["train"][name][0].name)
