"""Bad input against the real running service: every one gets a clear 4xx whose detail says what
to fix (and names the setting for a limit), nothing is stored, and the service stays healthy.

Uses the session ``service``/``client`` (default limits) and, for the limits, a second API
process of its own started with small FACEGRAD_MAX_* values (no worker needed).
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import uuid
import zipfile
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.harness import Service, orl_folder, post_dataset, zip_of

MiB = 1024 * 1024
ZERO_UUID = "00000000-0000-0000-0000-000000000000"


# --- helpers ----------------------------------------------------------------------------------

def detail_text(r: httpx.Response) -> str:
    d = r.json()["detail"]
    return d if isinstance(d, str) else json.dumps(d)


def refused(r: httpx.Response, status: int, *words: str) -> str:
    """``r`` is ``status`` with a JSON detail containing every one of ``words`` (any case)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert "Traceback" not in r.text
    detail = detail_text(r)
    for w in words:
        assert w.lower() in detail.lower(), f"{w!r} not in {detail!r}"
    return detail


def error_locs(r: httpx.Response) -> list[list]:
    assert r.status_code == 422, r.text
    return [e["loc"] for e in r.json()["detail"]]


def dataset_count(c: httpx.Client) -> int:
    r = c.get("/v1/datasets", params={"limit": 1})
    assert r.status_code == 200, r.text
    return r.json()["total"]


def job_count(c: httpx.Client) -> int:
    r = c.get("/v1/jobs", params={"limit": 1})
    assert r.status_code == 200, r.text
    return r.json()["total"]


def assert_healthy(c: httpx.Client) -> None:
    assert c.get("/healthz").status_code == 200
    assert c.get("/v1/datasets").status_code == 200  # a good request still works


def leftovers(svc: Service) -> list[str]:
    """Files an upload left in the data folder's temp area."""
    tmp = svc.data_dir / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


class Nothing_stored:  # noqa: N801 - reads as a phrase at the call site
    """``with Nothing_stored(client, service):`` - same dataset and job counts, no temp files
    left, and the service healthy afterwards."""

    def __init__(self, c: httpx.Client, svc: Service):
        self.c, self.svc = c, svc

    def __enter__(self):
        self.datasets, self.jobs = dataset_count(self.c), job_count(self.c)
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            assert dataset_count(self.c) == self.datasets
            assert job_count(self.c) == self.jobs
            assert leftovers(self.svc) == []
            assert_healthy(self.c)
        return False


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        link = zipfile.ZipInfo("s01/1.png")
        link.create_system = 3  # unix
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "/etc/passwd")
        z.writestr("s02/1.png", b"x")
    return buf.getvalue()


def encrypted_zip() -> bytes:
    """Two members, the first flagged as encrypted (bit 0 of its general-purpose flags, set in
    its local header and in the central directory: zipfile does not write encrypted files)."""
    data = bytearray(zip_bytes({"s01/1.png": b"x" * 100, "s02/1.png": b"x"}))
    local, central = 0, data.index(b"PK\x01\x02")
    assert data[local:local + 4] == b"PK\x03\x04"
    data[local + 6] |= 0x1
    data[central + 8] |= 0x1
    return bytes(data)


def zip_bomb(mib: int) -> bytes:
    """``mib`` MiB of zeros deflated into one image member (about 1000:1), plus one more member."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("s01/bomb.png")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:
            zeros = bytes(MiB)
            for _ in range(mib):
                f.write(zeros)
        z.writestr("s02/1.png", b"x")
    return buf.getvalue()


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class _Mkdir:
    """Unpickling this makes a directory: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_header_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A ~100-byte PNG that claims width x height 8-bit grey pixels (one tiny IDAT)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def orl_image(label: str = "s01", i: int = 0) -> Path:
    return orl_folder()[label][i]


def image_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def multipart_chunks(name: str, payload: bytes, chunk: int = 64 * 1024):
    """A multipart body as a generator: httpx sends it chunked, without Content-Length."""
    yield (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="' + name.encode()
           + b'"\r\nContent-Type: application/octet-stream\r\n\r\n')
    for i in range(0, len(payload), chunk):
        yield payload[i:i + chunk]
    yield b"\r\n--xyz--\r\n"


# --- dataset upload: bad files ------------------------------------------------------------------

BAD_UPLOADS = {
    "text file": (("notes.txt", b"just some text\n"), 415, [".zip", ".npz"]),
    "text without a name": (("upload", b"just some text\n"), 415, [".zip", ".npz"]),
    "zero-byte zip": (("faces.zip", b""), 422, ["empty", "0 bytes"]),
    "zero-byte npz": (("faces.npz", b""), 422, ["empty"]),
    "text named .zip": (("faces.zip", b"not a zip at all"), 422, ["not a valid zip"]),
    "dot-dot path": (("faces.zip", zip_bytes({"../evil/1.png": b"x", "s02/1.png": b"x"})), 422,
                     ["'..'", "inside the archive"]),
    "nested dot-dot path": (("faces.zip", zip_bytes({"s01/../../etc/1.png": b"x"})), 422,
                            ["'..'"]),
    "absolute path": (("faces.zip", zip_bytes({"/etc/faces/1.png": b"x", "s02/1.png": b"x"})),
                      422, ["absolute path", "relative"]),
    "drive-letter path": (("faces.zip", zip_bytes({"C:/faces/s01/1.png": b"x"})), 422,
                          ["absolute path"]),
    "symlink member": (("faces.zip", symlink_zip()), 422, ["symbolic link"]),
    "encrypted member": (("faces.zip", encrypted_zip()), 422, ["encrypted", "password"]),
    "no images at all": (("faces.zip", zip_bytes({"README.txt": b"hi", "s01/notes.txt": b"x"})),
                         422, ["no images"]),
    "images outside identity folders": (("faces.zip", zip_bytes({"1.png": b"x", "2.png": b"x"})),
                                        422, ["identity folder"]),
    "all images unreadable": (("faces.zip", zip_bytes({f"s0{i % 2}/{i}.png": b"not a png"
                                                       for i in range(4)})),
                              422, ["no readable", "4 files rejected", "s00/0.png"]),
    "npz missing 'labels'": (("faces.npz", npz(images=np.zeros((4, 16, 16), np.uint8),
                                               names=np.array(["a", "b", "a", "b"]))),
                             422, ["'labels'", "np.savez"]),
    "npz float images": (("faces.npz", npz(images=np.zeros((4, 16, 16), np.float32),
                                           labels=np.array([0, 1, 0, 1]))), 422, ["uint8"]),
    "npz bytes labels": (("faces.npz", npz(images=np.zeros((4, 16, 16), np.uint8),
                                           labels=np.array([b"a", b"b", b"a", b"b"]))),
                         422, ["'labels'", "unicode"]),
    "npz mismatched N": (("faces.npz", npz(images=np.zeros((5, 16, 16), np.uint8),
                                           labels=np.array([0, 1, 0, 1]))), 422,
                         ["5 entries", "4"]),
    "npz 2-D labels": (("faces.npz", npz(images=np.zeros((4, 16, 16), np.uint8),
                                         labels=np.zeros((4, 2), np.int64))), 422, ["(N,)"]),
    "npz images wrong shape": (("faces.npz", npz(images=np.zeros((4, 16), np.uint8),
                                                 labels=np.array([0, 1, 0, 1]))), 422,
                               ["shape"]),
    "npz images too small": (("faces.npz", npz(images=np.zeros((4, 2, 2), np.uint8),
                                               labels=np.array([0, 1, 0, 1]))), 422,
                             ["between 8 and"]),
    "npz one identity": (("faces.npz", npz(images=np.zeros((4, 16, 16), np.uint8),
                                           labels=np.array([0, 0, 0, 0]))), 422,
                         ["at least 2 identities"]),
    "text named .npz": (("faces.npz", b"not an npz"), 422, ["not a valid zip", "np.savez"]),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS), ids=list(BAD_UPLOADS))
def test_bad_dataset_upload_refused(client, service, case):
    (name, data), status, words = BAD_UPLOADS[case]
    with Nothing_stored(client, service):
        r = client.post("/v1/datasets", files={"file": (name, data)}, data={"name": "bad"})
        refused(r, status, *words)


def test_npz_object_array_is_never_unpickled(client, service, tmp_path):
    """An object array is refused from its header: allow_pickle stays off, nothing runs."""
    marker = tmp_path / "unpickled"
    labels = np.empty(4, dtype=object)
    labels[:] = [_Mkdir(str(marker))] * 4
    data = npz(images=np.zeros((4, 16, 16), np.uint8), labels=labels)
    with Nothing_stored(client, service):
        r = client.post("/v1/datasets", files={"file": ("faces.npz", data)})
        refused(r, 422, "object array", "pickle")
    assert not marker.exists()


@pytest.mark.parametrize(("mib", "setting"), [(300, "FACEGRAD_MAX_MEMBER_BYTES"),
                                              (40, "FACEGRAD_MAX_COMPRESSION_RATIO")],
                         ids=["300MiB-member", "40MiB-ratio"])
def test_zip_bomb_refused_before_inflating(client, service, mib, setting):
    bomb = zip_bomb(mib)
    assert len(bomb) < mib * MiB / 500  # really a bomb
    with Nothing_stored(client, service):
        r = client.post("/v1/datasets", files={"file": ("faces.zip", bomb)})
        refused(r, 413, setting, "zip bomb" if "RATIO" in setting else "uncompressed")


def test_zip_with_single_identity_refused(client, service, orl):
    data = zip_of({"s01": orl_folder()["s01"][:4]})
    with Nothing_stored(client, service):
        r = client.post("/v1/datasets", files={"file": ("one.zip", data)})
        refused(r, 422, "at least 2 identities", "found 1", "'s01'")


# --- dataset upload: odd but valid ------------------------------------------------------------

def odd_images(src: Path) -> dict[str, bytes]:
    """The same face in formats and modes that are unusual but valid."""
    grey = Image.open(src)
    grey.load()
    rgb = grey.convert("RGB")
    arr16 = np.asarray(grey, dtype=np.uint16) * 257
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.full(grey.size[::-1], 200, np.uint8)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    frames = [rgb.convert("P"), rgb.rotate(5).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100,
                   loop=0)
    return {
        "16bit.png": image_bytes(Image.fromarray(arr16), "PNG"),
        "palette.png": image_bytes(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "cmyk.jpg": image_bytes(rgb.convert("CMYK"), "JPEG"),
        "rgba.png": image_bytes(rgba, "PNG"),
        "exif-rotated.jpg": image_bytes(rgb.rotate(90, expand=True), "JPEG", exif=exif),
        "animated.gif": gif.getvalue(),
        "grey.jpg": image_bytes(grey, "JPEG"),
        "image.bmp": image_bytes(rgb, "BMP"),
        "image.webp": image_bytes(rgb, "WEBP"),
        "image.tiff": image_bytes(rgb, "TIFF"),
    }


def test_odd_but_valid_images_accepted(client, orl):
    members = {}
    for label in ("s01", "s02"):
        for name, data in odd_images(orl_image(label)).items():
            members[f"{label}/{name}"] = data
    with zipfile.ZipFile(io.BytesIO(zip_bytes(members))) as z:
        assert z.testzip() is None
    ds = post_dataset(client, "odd.zip", zip_bytes(members), name="odd-formats")
    try:
        assert ds["rejected"] == {}
        assert ds["num_images"] == len(members)
        assert ds["identities"] == {"s01": len(members) // 2, "s02": len(members) // 2}
        assert ds["source_format"] == "zip"
    finally:
        assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204


def test_identity_with_too_few_images_kept_with_warning(client, orl):
    f = orl_folder()
    folder = {"s01": f["s01"][:5], "s02": f["s02"][:1], "s03": f["s03"][:2]}
    ds = post_dataset(client, "few.zip", zip_of(folder))
    try:
        assert ds["identities"] == {"s01": 5, "s02": 1, "s03": 2}  # not dropped
        assert ds["num_images"] == 8 and ds["num_identities"] == 3
        assert len(ds["warnings"]) == 1
        warning = ds["warnings"][0]
        assert "s02" in warning and "s03" in warning and "s01" not in warning
        assert "fewer than 3 images" in warning
        # the warning is kept with the dataset
        assert client.get(f"/v1/datasets/{ds['id']}").json()["warnings"] == ds["warnings"]
    finally:
        assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204


def test_detect_auto_rejects_a_photo_without_a_face_per_file(client, service, orl):
    """detect=auto: a large image with no face is listed in ``rejected``, the rest is kept
    (it used to reach np.stack as None: a 500)."""
    f = orl_folder()
    blank = image_bytes(Image.new("RGB", (600, 500), (90, 120, 150)), "PNG")
    members = {f"{lab}/{p.name}": p.read_bytes() for lab in ("s01", "s02") for p in f[lab][:3]}
    members["s01/landscape.png"] = blank
    ds = post_dataset(client, "auto.zip", zip_bytes(members), detect="auto")
    try:
        assert list(ds["rejected"]) == ["s01/landscape.png"]
        assert "no face" in ds["rejected"]["s01/landscape.png"]
        assert ds["identities"] == {"s01": 3, "s02": 3} and ds["detect"] == "auto"
    finally:
        assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204


def test_detect_auto_without_any_face_refused(client, service):
    blank = image_bytes(Image.new("RGB", (600, 500), (90, 120, 150)), "PNG")
    data = zip_bytes({f"s0{i % 2}/{i}.png": blank for i in range(4)})
    with Nothing_stored(client, service):
        r = client.post("/v1/datasets", files={"file": ("auto.zip", data)},
                        data={"detect": "auto"})
        refused(r, 422, "no readable", "no face")
    images = np.full((4, 500, 600, 3), 120, np.uint8)
    with Nothing_stored(client, service):
        r = client.post("/v1/datasets", files={"file": ("auto.npz", npz(
            images=images, labels=np.array(["a", "b", "a", "b"])))}, data={"detect": "auto"})
        refused(r, 422, "images[0]", "no face", "detect='none'")


@pytest.mark.parametrize(("form", "field"), [({"detect": "magic"}, "detect"),
                                             ({"name": "n" * 201}, "name"),
                                             ({"name": "bell\x07name"}, "name")])
def test_bad_upload_form_fields(client, service, form, field):
    data = npz(images=np.zeros((4, 16, 16), np.uint8), labels=np.array([0, 1, 0, 1]))
    with Nothing_stored(client, service):
        r = client.post("/v1/datasets", files={"file": ("f.npz", data)}, data=form)
        assert ["body", field] in error_locs(r)


def test_upload_without_file_field(client, service):
    with Nothing_stored(client, service):
        r = client.post("/v1/datasets", data={"name": "x"})
        assert ["body", "file"] in error_locs(r)


# --- limits: an API of its own with small FACEGRAD_MAX_* values --------------------------------

LIMIT_UPLOAD = 200_000


@pytest.fixture(scope="module")
def limited(tmp_path_factory, redis_server):
    svc = Service(tmp_path_factory.mktemp("limited"), redis_server.url,
                  FACEGRAD_MAX_UPLOAD_BYTES=LIMIT_UPLOAD, FACEGRAD_MAX_ARCHIVE_MEMBERS=20,
                  FACEGRAD_MAX_IDENTIFY_FILES=3)
    svc.start_api()
    with svc.client() as c:
        yield svc, c
    svc.stop()


def test_upload_just_over_the_limit(limited):
    svc, c = limited
    data = b"PK\x03\x04" + os.urandom(LIMIT_UPLOAD)  # over the file limit, under the body slack
    with Nothing_stored(c, svc):
        r = c.post("/v1/datasets", files={"file": ("big.zip", data)})
        refused(r, 413, "FACEGRAD_MAX_UPLOAD_BYTES", str(LIMIT_UPLOAD))


def test_upload_far_over_the_limit_by_content_length(limited):
    svc, c = limited
    data = b"PK\x03\x04" + bytes(3 * MiB)
    with Nothing_stored(c, svc):
        r = c.post("/v1/datasets", files={"file": ("big.zip", data)})
        refused(r, 413, "FACEGRAD_MAX_UPLOAD_BYTES", str(LIMIT_UPLOAD))


def test_chunked_upload_over_the_limit(limited):
    """No Content-Length: cut off while reading, still a 413 naming the setting (was a 400
    'There was an error parsing the body')."""
    svc, c = limited
    body = multipart_chunks("big.zip", b"PK\x03\x04" + bytes(3 * MiB))
    with Nothing_stored(c, svc):
        r = c.post("/v1/datasets", content=body,
                   headers={"content-type": "multipart/form-data; boundary=xyz"})
        refused(r, 413, "FACEGRAD_MAX_UPLOAD_BYTES", str(LIMIT_UPLOAD))


def test_too_many_archive_members(limited):
    svc, c = limited
    data = zip_bytes({f"s{i % 2}/{i}.png": b"x" for i in range(30)})
    assert len(data) < LIMIT_UPLOAD
    with Nothing_stored(c, svc):
        r = c.post("/v1/datasets", files={"file": ("many.zip", data)})
        refused(r, 413, "FACEGRAD_MAX_ARCHIVE_MEMBERS", "30", "20")


def test_too_many_identify_files(limited):
    svc, c = limited
    files = [("file", (f"{i}.png", b"x")) for i in range(4)]
    r = c.post("/v1/identify", files=files)
    refused(r, 413, "FACEGRAD_MAX_IDENTIFY_FILES", "4 files", "at most 3")
    assert_healthy(c)


# --- jobs -------------------------------------------------------------------------------------

BAD_JOBS = {
    "unknown field": ({"epochz": 3}, ["body", "epochz"]),
    "unknown nested field": ({"optimizer": {"name": "sgd", "mommentum": 0.9}},
                             ["body", "optimizer", "mommentum"]),
    "epochs -1": ({"epochs": -1}, ["body", "epochs"]),
    "epochs 0 from scratch": ({"architecture": "seed_cnn", "epochs": 0}, ["body"]),
    "dlib_resnet at 64 px": ({"image_size": 64}, ["body"]),
    "epochs absurd": ({"epochs": 10**9}, ["body", "epochs"]),
    "negative learning rate": ({"learning_rate": -1}, ["body", "learning_rate"]),
    "learning rate NaN": ({"learning_rate": "NaN"}, ["body", "learning_rate"]),
    "batch size absurd": ({"batch_size": 10**9}, ["body", "batch_size"]),
    "negative max_norm": ({"clip": {"mode": "norm", "max_norm": -5}},
                          ["body", "clip", "norm", "max_norm"]),
    "threshold alpha 2": ({"clip": {"mode": "threshold", "alpha": 2}},
                          ["body", "clip", "threshold", "alpha"]),
    "unknown clip mode": ({"clip": {"mode": "magic"}}, ["body", "clip"]),
    "unknown clip field": ({"clip": {"mode": "norm", "maxnorm": 5}},
                           ["body", "clip", "norm", "maxnorm"]),
    "norm_type 0.5": ({"clip": {"mode": "norm", "norm_type": 0.5}},
                      ["body", "clip", "norm", "norm_type"]),
    "nesterov with adam": ({"optimizer": {"name": "adam", "nesterov": True}},
                           ["body", "optimizer"]),
    "image_size too small": ({"image_size": 4}, ["body", "image_size"]),
    "val_fraction 1": ({"val_fraction": 1.0}, ["body", "val_fraction"]),
    "wrong type": ({"epochs": "many"}, ["body", "epochs"]),
    "unknown architecture": ({"architecture": "resnet9000"}, ["body", "architecture"]),
    "dataset_id not a uuid": ({"dataset_id": "../../etc/passwd"}, ["body", "dataset_id"]),
}


@pytest.mark.parametrize("case", list(BAD_JOBS), ids=list(BAD_JOBS))
def test_bad_job_refused_naming_the_field(client, service, case):
    body, loc = BAD_JOBS[case]
    with Nothing_stored(client, service):
        r = client.post("/v1/jobs", json={"dataset_id": ZERO_UUID, **body})
        assert loc in error_locs(r), r.text
        assert "Traceback" not in r.text


def test_job_messages_say_what_is_wrong(client):
    r = client.post("/v1/jobs", json={"dataset_id": ZERO_UUID, "clip": {"mode": "magic"}})
    assert "'magic'" in r.text and "'norm'" in r.text and "'threshold'" in r.text
    r = client.post("/v1/jobs", json={"dataset_id": ZERO_UUID,
                                      "optimizer": {"name": "adam", "nesterov": True}})
    assert "nesterov needs optimizer name 'sgd'" in r.text
    r = client.post("/v1/jobs", json={"dataset_id": ZERO_UUID, "epochs": -1})
    assert "greater than or equal to 0" in r.text
    r = client.post("/v1/jobs", json={"dataset_id": ZERO_UUID, "architecture": "facenet_s",
                                      "epochs": 0})
    assert "epochs must be >= 1" in r.text and "pretrained dlib_resnet" in r.text
    r = client.post("/v1/jobs", json={"dataset_id": ZERO_UUID, "image_size": 64})
    assert "image_size must be 150" in r.text


def test_job_for_missing_dataset_is_404(client, service):
    with Nothing_stored(client, service):
        r = client.post("/v1/jobs", json={"dataset_id": str(uuid.uuid4())})
        refused(r, 404, "no dataset", "POST /v1/datasets")


@pytest.mark.parametrize(("content", "ctype", "loc"), [
    (b"{not json", "application/json", "body"),
    (b"", "application/json", "body"),
    (b"[1, 2]", "application/json", "body"),
    (b'{"epochs": 3}', "application/json", "dataset_id"),
], ids=["invalid-json", "empty", "array", "no-dataset_id"])
def test_malformed_job_body(client, service, content, ctype, loc):
    with Nothing_stored(client, service):
        r = client.post("/v1/jobs", content=content, headers={"content-type": ctype})
        assert r.status_code == 422, r.text
        assert any(loc in map(str, e) for e in error_locs(r)), r.text


# --- ids in paths -----------------------------------------------------------------------------

ID_PATHS = [
    ("GET", "/v1/jobs/{}"), ("GET", "/v1/jobs/{}/metrics"), ("POST", "/v1/jobs/{}/cancel"),
    ("GET", "/v1/models/{}"), ("GET", "/v1/models/{}/weights"),
    ("GET", "/v1/models/{}/identities"), ("DELETE", "/v1/models/{}/identities/someone"),
    ("GET", "/v1/datasets/{}"), ("DELETE", "/v1/datasets/{}"),
]


@pytest.mark.parametrize(("method", "path"), ID_PATHS, ids=[f"{m} {p}" for m, p in ID_PATHS])
@pytest.mark.parametrize("bad", ["not-a-uuid", "1", "' OR 1=1 --", ZERO_UUID[:-1] + "g"])
def test_id_not_a_uuid_is_422(client, method, path, bad):
    r = client.request(method, path.format(bad))
    assert any(loc[0] == "path" for loc in error_locs(r))
    assert "Traceback" not in r.text


@pytest.mark.parametrize(("method", "path"), ID_PATHS, ids=[f"{m} {p}" for m, p in ID_PATHS])
def test_id_not_a_uuid_names_the_parameter(client, method, path):
    r = client.request(method, path.format("not-a-uuid"))
    locs = error_locs(r)
    assert locs and locs[0][0] == "path" and locs[0][1].endswith("_id")


@pytest.mark.parametrize(("method", "path"), ID_PATHS, ids=[f"{m} {p}" for m, p in ID_PATHS])
def test_unknown_id_is_404(client, service, method, path):
    unknown = str(uuid.uuid4())
    with Nothing_stored(client, service):
        r = client.request(method, path.format(unknown))
        refused(r, 404, unknown)


def test_list_query_bounds(client):
    for path in ("/v1/jobs", "/v1/models", "/v1/datasets"):
        for params, field in (({"limit": 0}, "limit"), ({"limit": 10**6}, "limit"),
                              ({"offset": -1}, "offset"), ({"offset": 10**30}, "offset")):
            r = client.get(path, params=params)
            assert ["query", field] in error_locs(r), (path, params, r.text)
    assert ["query", "status"] in error_locs(client.get("/v1/jobs", params={"status": "done"}))


# --- identify ---------------------------------------------------------------------------------

def identify(client, model_id, *files, **form):
    return client.post("/v1/identify", files=[("file", f) for f in files],
                       data={"model_id": model_id, **form})


def test_identify_bad_images(client, orl_model, orl):
    mid = orl_model["model_id"]
    good = orl[0]["s01"][0].read_bytes()  # an image the model was trained on
    cases = [
        (("notes.txt", b"hello, not an image"), 415, ["notes.txt", "not a recognised image",
                                                      "PNG"]),
        (("half.png", good[: len(good) // 2]), 422, ["half.png", "truncated"]),
        (("head.png", good[:40]), 422, ["head.png"]),
        (("empty.png", b""), 422, ["empty.png", "empty"]),
        (("bomb.png", png_header_bomb(20000, 20000)), 413, ["bomb.png",
                                                            "FACEGRAD_MAX_IMAGE_PIXELS"]),
        (("wide.png", png_header_bomb(40000, 1100)), 413, ["40000x1100",
                                                           "FACEGRAD_MAX_IMAGE_PIXELS"]),
    ]
    for f, status, words in cases:
        refused(identify(client, mid, f), status, *words)
        # one bad file among good ones: the call is refused and names the bad one
        refused(identify(client, mid, ("good.png", good), f), status, f[0])
    assert_healthy(client)
    r = identify(client, mid, ("good.png", good))
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["faces"][0]["identity"] == "s01"


def test_identify_too_many_files(client, orl_model):
    files = [(f"{i}.png", b"x") for i in range(33)]
    refused(identify(client, orl_model["model_id"], *files), 413, "FACEGRAD_MAX_IDENTIFY_FILES",
            "at most 32")


def test_identify_unknown_or_bad_model(client, orl_model):
    good = orl_image("s01", 0).read_bytes()
    unknown = str(uuid.uuid4())
    refused(identify(client, unknown, ("a.png", good)), 404, unknown)
    assert ["body", "model_id"] in error_locs(identify(client, "not-a-uuid", ("a.png", good)))


@pytest.mark.parametrize(("form", "field"), [
    ({"top_k": 0}, "top_k"), ({"top_k": 10**6}, "top_k"), ({"threshold": 2}, "threshold"),
    ({"threshold": "high"}, "threshold"), ({"detect": "magic"}, "detect"),
    ({"max_faces": 0}, "max_faces"),
])
def test_identify_bad_form_fields(client, orl_model, form, field):
    good = orl_image("s01", 0).read_bytes()
    r = identify(client, orl_model["model_id"], ("a.png", good), **form)
    assert ["body", field] in error_locs(r)


def test_identify_without_file(client, orl_model):
    r = client.post("/v1/identify", data={"model_id": orl_model["model_id"]})
    assert ["body", "file"] in error_locs(r)


def test_verify_bad_inputs(client, orl_model):
    mid = orl_model["model_id"]
    good = orl_image("s01", 0).read_bytes()
    r = client.post("/v1/verify", files=[("file", ("a.png", good))], data={"model_id": mid})
    refused(r, 422, "exactly two")
    r = client.post("/v1/verify", files=[("file", ("a.png", good)), ("file", ("b.txt", b"hi"))],
                    data={"model_id": mid})
    refused(r, 415, "b.txt")
    r = client.post("/v1/verify", files=[("file", ("a.png", good)), ("file", ("b.png", good))],
                    data={"model_id": mid, "compare": "identities"})
    assert ["body", "compare"] in error_locs(r)
    assert_healthy(client)


def test_enroll_bad_inputs(client, orl_model):
    mid = orl_model["model_id"]
    before = client.get(f"/v1/models/{mid}/identities").json()["identities"]
    r = client.post(f"/v1/models/{mid}/identities", data={"identity": "newcomer"},
                    files=[("file", ("a.txt", b"not an image"))])
    refused(r, 415, "a.txt")
    r = client.post(f"/v1/models/{mid}/identities", data={"identity": "a/b"},
                    files=[("file", ("a.png", orl_image().read_bytes()))])
    assert ["body", "identity"] in error_locs(r)
    assert client.get(f"/v1/models/{mid}/identities").json()["identities"] == before


# --- after all of the above -------------------------------------------------------------------

def test_service_healthy_and_a_good_upload_works_after_bad_input(client, service):
    assert client.get("/healthz").status_code == 200
    images = np.random.default_rng(0).integers(0, 255, (6, 32, 32), dtype=np.uint8)
    ds = post_dataset(client, "ok.npz", npz(images=images, labels=np.array(["a", "b", "c"] * 2)))
    # timestamps carry their UTC offset, read back from the database too (a naive one broke
    # the documented date-time format: found by tests/test_fuzz.py)
    listed = [d for d in client.get("/v1/datasets").json()["items"] if d["id"] == ds["id"]]
    assert ds["created_at"].endswith("Z")
    assert listed[0]["created_at"] == ds["created_at"]
    assert client.get(f"/v1/datasets/{ds['id']}").json()["created_at"] == ds["created_at"]
    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert leftovers(service) == []
    assert "unhandled error" not in service.tail("api.log", 2_000_000)
