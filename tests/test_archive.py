"""Tests for facegrad.data.archive: ZIP identity-folder archives and .npz datasets.

Every malicious or malformed input is built here in tmp_path with zipfile / numpy / Pillow.
"""

from __future__ import annotations

import io
import stat
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facegrad.data.archive import (
    DatasetError,
    Limits,
    check_identities,
    iter_zip_images,
    normalise_label,
    read_npz_dataset,
    summarise,
)
from facegrad.data.imageio import decode_image

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ORL = DATA / "att_faces"
ORL_PGM = DATA / "att_faces_pgm"

needs_data = pytest.mark.skipif(not ORL.exists(), reason="shared ORL data not present")
MiB = 1024 * 1024


def tiny_pgm(value: int = 100) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (12, 10), value).save(buf, "PPM")
    return buf.getvalue()


def make_zip(path: Path, entries, compression=zipfile.ZIP_DEFLATED) -> Path:
    """entries: iterable of (name or ZipInfo, bytes)."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def collect(path: Path, limits: Limits | None = None, skipped: list | None = None):
    return list(iter_zip_images(path, limits, skipped=skipped))


def raises(status: int, *fragments: str):
    """Context manager: DatasetError with this status whose reason contains every fragment."""

    class _Check:
        def __enter__(self):
            self.cm = pytest.raises(DatasetError)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self.cm.__exit__(*exc)
            err = self.info.value
            assert err.status == status, err.reason
            for fragment in fragments:
                assert fragment in err.reason, err.reason
            return suppressed

    return _Check()


def patch_member_header(
    path: Path, name: str, *, lfh: tuple[int, str], cd: tuple[int, str], value: int
) -> None:
    """Overwrite one field of a member's local header (offset from it) and central entry."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    struct.pack_into(lfh[1], raw, info.header_offset + lfh[0], value)
    encoded = name.encode()
    pos = raw.find(b"PK\x01\x02")
    while pos >= 0:
        n_len = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46 : pos + 46 + n_len] == encoded:
            struct.pack_into(cd[1], raw, pos + cd[0], value)
            break
        pos = raw.find(b"PK\x01\x02", pos + 1)
    else:
        raise AssertionError("central directory entry not found")
    path.write_bytes(bytes(raw))


# --- path safety ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "evil, fragment",
    [
        ("../evil.png", "'..'"),
        ("s01/../../evil.png", "'..'"),
        ("..\\..\\evil.png", "'..'"),
        ("/etc/evil.png", "absolute"),
        ("C:/evil.png", "absolute"),
        ("C:\\Windows\\evil.png", "absolute"),
        ("\\\\server\\share\\evil.png", "absolute"),
    ],
)
def test_unsafe_paths_rejected(tmp_path, evil, fragment):
    path = make_zip(
        tmp_path / "a.zip",
        [("s01/1.pgm", tiny_pgm()), ("s02/1.pgm", tiny_pgm()), (evil, tiny_pgm())],
    )
    with zipfile.ZipFile(path) as zf:
        assert evil in zf.namelist()  # zipfile kept the hostile name as written
    with raises(422, fragment):
        iter_zip_images(path)  # raised eagerly, before any iteration


def test_unsafe_path_rejected_even_for_junk_member(tmp_path):
    path = make_zip(
        tmp_path / "a.zip",
        [("s01/1.pgm", tiny_pgm()), ("s02/1.pgm", tiny_pgm()), ("../README.txt", b"hi")],
    )
    with raises(422, "'..'"):
        collect(path)


def test_symlink_member_rejected(tmp_path):
    link = zipfile.ZipInfo("s01/2.pgm")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    path = make_zip(
        tmp_path / "a.zip",
        [("s01/1.pgm", tiny_pgm()), ("s02/1.pgm", tiny_pgm()), (link, b"/etc/passwd")],
    )
    with raises(422, "symbolic link", "s01/2.pgm"):
        collect(path)


def test_encrypted_member_rejected(tmp_path):
    path = make_zip(tmp_path / "a.zip", [("s01/1.pgm", tiny_pgm()), ("s02/1.pgm", tiny_pgm())])
    # set the "encrypted" general-purpose flag bit in both headers
    patch_member_header(path, "s02/1.pgm", lfh=(6, "<H"), cd=(8, "<H"), value=0x1)
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("s02/1.pgm").flag_bits & 0x1
    with raises(422, "encrypted", "without a password"):
        collect(path)


# --- size limits and zip bombs --------------------------------------------------------------


@pytest.fixture(scope="module")
def bomb_zip(tmp_path_factory) -> Path:
    """s01/bomb.pgm: 64 MiB of zeros deflated to ~64 KiB, next to two ordinary identities."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    chunk = bytes(MiB)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("s01/1.pgm", tiny_pgm())
        zf.writestr("s02/1.pgm", tiny_pgm())
        with zf.open("s01/bomb.pgm", "w") as f:
            for _ in range(64):
                f.write(chunk)
    assert path.stat().st_size < 1 * MiB
    return path


def test_zip_bomb_refused_by_compression_ratio(bomb_zip):
    with raises(413, "FACEGRAD_MAX_COMPRESSION_RATIO", "s01/bomb.pgm"):
        iter_zip_images(bomb_zip)


def test_zip_bomb_refused_by_total_uncompressed(bomb_zip):
    limits = Limits(max_uncompressed_bytes=1 * MiB, max_compression_ratio=1e9)
    with raises(413, "FACEGRAD_MAX_UNCOMPRESSED_BYTES"):
        iter_zip_images(bomb_zip, limits)


def test_zip_bomb_refused_by_member_size(bomb_zip):
    limits = Limits(max_member_bytes=1 * MiB, max_compression_ratio=1e9)
    with raises(413, "FACEGRAD_MAX_MEMBER_BYTES", "s01/bomb.pgm"):
        iter_zip_images(bomb_zip, limits)


def test_header_lying_about_size_does_not_get_past(tmp_path):
    """The headers claim 1000 bytes; the deflate stream really holds 8 MiB of zeros."""
    path = make_zip(
        tmp_path / "liar.zip",
        [("s01/1.pgm", tiny_pgm()), ("s02/1.pgm", tiny_pgm()), ("s02/2.pgm", bytes(8 * MiB))],
    )
    patch_member_header(path, "s02/2.pgm", lfh=(22, "<L"), cd=(24, "<L"), value=1000)
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("s02/2.pgm").file_size == 1000
    limits = Limits(max_member_bytes=4096)  # the header passes this; the real data would not
    got = []
    with raises(422, "s02/2.pgm", "corrupt"):
        for _label, name, data in iter_zip_images(path, limits):
            got.append((name, len(data)))
    assert got == [("s01/1.pgm", len(tiny_pgm())), ("s02/1.pgm", len(tiny_pgm()))]


def test_header_claiming_huge_size_refused(tmp_path):
    path = make_zip(tmp_path / "a.zip", [("s01/1.pgm", tiny_pgm()), ("s02/1.pgm", tiny_pgm())])
    patch_member_header(path, "s02/1.pgm", lfh=(22, "<L"), cd=(24, "<L"), value=100 * MiB)
    with raises(413, "FACEGRAD_MAX_MEMBER_BYTES"):
        iter_zip_images(path)


def test_too_many_members(tmp_path):
    entries = [(f"s{i % 3:02d}/{i}.pgm", tiny_pgm()) for i in range(30)]
    path = make_zip(tmp_path / "many.zip", entries)
    with raises(413, "FACEGRAD_MAX_ARCHIVE_MEMBERS", "30"):
        iter_zip_images(path, Limits(max_members=10))
    assert len(collect(path, Limits(max_members=30))) == 30


def test_too_many_members_even_if_end_record_lies(tmp_path):
    entries = [(f"s{i % 3:02d}/{i}.pgm", tiny_pgm()) for i in range(30)]
    path = make_zip(tmp_path / "many.zip", entries)
    raw = bytearray(path.read_bytes())
    eocd = raw.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", raw, eocd + 8, 2, 2)  # claim 2 entries
    path.write_bytes(bytes(raw))
    with raises(413, "FACEGRAD_MAX_ARCHIVE_MEMBERS", "30"):
        iter_zip_images(path, Limits(max_members=10))


def test_upload_size_limit(tmp_path):
    path = make_zip(tmp_path / "a.zip", [("s01/1.pgm", tiny_pgm()), ("s02/1.pgm", tiny_pgm())])
    with raises(413, "FACEGRAD_MAX_UPLOAD_BYTES"):
        iter_zip_images(path, Limits(max_upload_bytes=100))


def test_read_is_bounded_by_remaining_total(tmp_path):
    # each member fits the per-member limit, together they exceed the total
    entries = [(f"s0{i}/1.pgm", tiny_pgm()) for i in range(1, 5)]
    path = make_zip(tmp_path / "a.zip", entries)
    limit = 3 * len(tiny_pgm())
    with raises(413, "FACEGRAD_MAX_UNCOMPRESSED_BYTES"):
        iter_zip_images(path, Limits(max_uncompressed_bytes=limit))


# --- not a zip / corrupt --------------------------------------------------------------------


def test_not_a_zip(tmp_path):
    path = tmp_path / "faces.zip"
    path.write_text("this is not a zip file\n" * 10)
    with raises(422, "not a valid ZIP"):
        iter_zip_images(path)


def test_empty_file(tmp_path):
    path = tmp_path / "faces.zip"
    path.write_bytes(b"")
    with raises(422, "empty"):
        iter_zip_images(path)


def test_truncated_zip(tmp_path):
    path = make_zip(tmp_path / "a.zip", [(f"s0{i}/1.pgm", tiny_pgm(i)) for i in range(1, 4)])
    path.write_bytes(path.read_bytes()[:-30])  # cut into the central directory
    with raises(422, "not a valid ZIP"):
        iter_zip_images(path)


def test_corrupt_member_data(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8).tobytes()
    path = make_zip(tmp_path / "a.zip", [("s01/1.pgm", tiny_pgm()), ("s02/1.pgm", data)])
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("s02/1.pgm")
    start = info.header_offset + 30 + len(info.filename) + 100
    raw[start : start + 50] = b"\x00" * 50
    path.write_bytes(bytes(raw))
    with raises(422, "s02/1.pgm", "corrupt"):
        collect(path)


# --- layouts and labels ---------------------------------------------------------------------


def test_flat_identity_folders(tmp_path):
    path = make_zip(
        tmp_path / "a.zip",
        [("s02/1.pgm", tiny_pgm(2)), ("s01/1.pgm", tiny_pgm(1)), ("s01/2.pgm", tiny_pgm(3))],
    )
    got = collect(path)
    assert [(label, name) for label, name, _ in got] == [
        ("s01", "s01/1.pgm"),
        ("s01", "s01/2.pgm"),
        ("s02", "s02/1.pgm"),
    ]
    assert got[0][2] == tiny_pgm(1)


@pytest.mark.parametrize("root", ["faces/", "dataset/att_faces/"])
def test_nested_common_root(tmp_path, root):
    path = make_zip(
        tmp_path / "a.zip",
        [
            (f"{root}s01/1.pgm", tiny_pgm()),
            (f"{root}s01/2.pgm", tiny_pgm()),
            (f"{root}s02/1.pgm", tiny_pgm()),
        ],
    )
    assert summarise(label for label, _, _ in collect(path)) == {"s01": 2, "s02": 1}


def test_subfolders_inside_identity_belong_to_it(tmp_path):
    path = make_zip(
        tmp_path / "a.zip",
        [
            ("faces/alice/day1/1.png", tiny_pgm()),
            ("faces/alice/day2/1.png", tiny_pgm()),
            ("faces/bob/1.png", tiny_pgm()),
        ],
    )
    assert summarise(label for label, _, _ in collect(path)) == {"alice": 2, "bob": 1}


def test_junk_ignored_and_root_images_skipped(tmp_path):
    path = make_zip(
        tmp_path / "a.zip",
        [
            ("faces/", b""),
            ("faces/s01/", b""),
            ("faces/s01/1.pgm", tiny_pgm()),
            ("faces/s02/1.pgm", tiny_pgm()),
            ("faces/s02/notes.txt", b"glasses"),
            ("faces/README", b"readme"),
            ("faces/labels.tsv", b"a\tb\n"),
            ("faces/.DS_Store", b"\x00\x01"),
            ("faces/s01/.hidden.png", b"x"),
            ("faces/s01/Thumbs.db", b"x"),
            ("faces/.git/objects/x.png", b"x"),
            ("__MACOSX/faces/s01/._1.pgm", b"\x00\x05\x16\x07"),
            ("__MACOSX/faces/s03/1.png", b"x"),
            ("faces/cover.png", tiny_pgm()),
        ],
    )
    skipped: list[str] = []
    got = collect(path, skipped=skipped)
    assert [name for _, name, _ in got] == ["faces/s01/1.pgm", "faces/s02/1.pgm"]
    assert skipped == ["faces/cover.png"]


def test_only_root_images_is_an_error(tmp_path):
    path = make_zip(tmp_path / "a.zip", [("1.png", tiny_pgm()), ("2.png", tiny_pgm())])
    with raises(422, "none inside an identity folder"):
        iter_zip_images(path)


def test_no_images_at_all(tmp_path):
    path = make_zip(tmp_path / "a.zip", [("README.txt", b"hello"), ("s01/notes.txt", b"x")])
    with raises(422, "no images"):
        iter_zip_images(path)


def test_single_identity(tmp_path):
    path = make_zip(tmp_path / "a.zip", [("s01/1.pgm", tiny_pgm()), ("s01/2.pgm", tiny_pgm())])
    counts = summarise(label for label, _, _ in collect(path))
    assert counts == {"s01": 2}
    with raises(422, "needs at least 2 identities, found 1 ('s01')"):
        check_identities(counts, 2)
    check_identities(counts, 1)


def test_check_identities_zero_and_enough():
    with raises(422, "needs at least 2 identities, found 0."):
        check_identities({}, 2)
    check_identities({"a": 1, "b": 3}, 2)
    with raises(422, "needs at least 3 identities, found 2 ('a', 'b')"):
        check_identities({"a": 1, "b": 3}, 3)


def test_label_whitespace_stripped(tmp_path):
    path = make_zip(tmp_path / "a.zip", [(" s01 /1.pgm", tiny_pgm()), ("s02/1.pgm", tiny_pgm())])
    assert [label for label, _, _ in collect(path)] == ["s01", "s02"]


@pytest.mark.parametrize(
    "folder, fragment",
    [
        ("s\x0701", "U+0007"),
        ("a\u202eb", "U+202E"),
        ("x" * 129, "129 characters"),
        ("   ", "empty"),
    ],
)
def test_bad_labels(tmp_path, folder, fragment):
    path = make_zip(
        tmp_path / "a.zip", [(f"{folder}/1.pgm", tiny_pgm()), ("s02/1.pgm", tiny_pgm())]
    )
    with raises(422, fragment):
        iter_zip_images(path)


def test_normalise_label():
    assert normalise_label("  Zoë \t") == "Zoë"
    assert normalise_label("Zoe\u0308") == "Zoë"  # NFD (macOS) -> NFC
    assert normalise_label("x" * 128) == "x" * 128


@needs_data
def test_real_orl_zip_three_identities(tmp_path):
    entries = [
        (f"att_faces/{p.parent.name}/{p.name}", p.read_bytes())
        for ident in ("s01", "s02", "s03")
        for p in sorted((ORL / ident).glob("*.png"))
    ]
    entries.append(("att_faces/README.md", b"# ORL"))
    path = make_zip(tmp_path / "orl.zip", entries)
    limits = Limits()
    labels, arrays = [], []
    for label, name, data in iter_zip_images(path, limits):
        arrays.append(decode_image(data, max_pixels=limits.max_pixels, filename=name))
        labels.append(label)
    assert summarise(labels) == {"s01": 10, "s02": 10, "s03": 10}
    assert all(a.shape == (112, 92, 3) and a.dtype == np.uint8 for a in arrays)
    check_identities(summarise(labels), limits.min_identities)


@needs_data
def test_real_orl_pgm_single_wrapper(tmp_path):
    entries = [
        (f"faces/{ident}/{n}.pgm", (ORL_PGM / ident / f"{n}.pgm").read_bytes())
        for ident in ("s1", "s2")
        for n in (1, 2)
    ]
    got = collect(make_zip(tmp_path / "a.zip", entries, zipfile.ZIP_STORED))
    assert [(label, decode_image(data).shape) for label, _, data in got] == [
        ("s1", (112, 92, 3)),
        ("s1", (112, 92, 3)),
        ("s2", (112, 92, 3)),
        ("s2", (112, 92, 3)),
    ]


def test_limits_from_env():
    limits = Limits.from_env(
        {"FACEGRAD_MAX_ARCHIVE_MEMBERS": "10", "FACEGRAD_MAX_COMPRESSION_RATIO": "50.5"}
    )
    assert limits.max_members == 10 and limits.max_compression_ratio == 50.5
    assert limits.max_upload_bytes == 512 * MiB
    with pytest.raises(ValueError, match="FACEGRAD_MAX_MEMBER_BYTES"):
        Limits.from_env({"FACEGRAD_MAX_MEMBER_BYTES": "lots"})
    with pytest.raises(ValueError, match="FACEGRAD_MAX_UPLOAD_BYTES"):
        Limits(max_upload_bytes=0)


# --- .npz datasets --------------------------------------------------------------------------

UNPICKLED: list[str] = []


def _explode():
    UNPICKLED.append("unpickled!")
    return "boom"


class Boom:
    def __reduce__(self):
        return (_explode, ())


def save_npz(path: Path, compressed: bool = False, **arrays) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def faces(n: int = 6, h: int = 16, w: int = 12, *extra: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    return rng.integers(0, 256, (n, h, w, *extra), dtype=np.uint8)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_grayscale_int_labels(tmp_path, compressed):
    imgs = faces(6)
    path = save_npz(
        tmp_path / "d.npz", compressed, images=imgs, labels=np.array([0, 0, 1, 1, 2, 2])
    )
    images, labels = read_npz_dataset(path, Limits())
    assert images.shape == (6, 16, 12, 3) and images.dtype == np.uint8
    assert images.flags["C_CONTIGUOUS"]
    assert all((images[..., c] == imgs).all() for c in range(3))
    assert labels == ["0", "0", "1", "1", "2", "2"]


def test_npz_rgba_string_labels(tmp_path):
    imgs = faces(4, 10, 9, 4)
    path = save_npz(tmp_path / "d.npz", images=imgs, labels=np.array(["ann", "ann", " bo ", "cy"]))
    images, labels = read_npz_dataset(path, Limits())
    assert images.shape == (4, 10, 9, 3)
    assert (images == imgs[..., :3]).all()
    assert labels == ["ann", "ann", "bo", "cy"]


@pytest.mark.parametrize("extra", [(1,), (3,)])
def test_npz_channel_variants(tmp_path, extra):
    imgs = faces(2, 8, 8, *extra)
    path = save_npz(tmp_path / "d.npz", images=imgs, labels=np.array([1, 2]))
    images, _ = read_npz_dataset(path)
    assert images.shape == (2, 8, 8, 3)
    assert (images[..., 2] == imgs[..., -1]).all()


def test_npz_missing_key_lists_found_keys(tmp_path):
    path = save_npz(tmp_path / "d.npz", x=faces(), y=np.arange(6))
    with raises(422, "'images'", "'labels'", "found keys: ['x', 'y']"):
        read_npz_dataset(path)
    path = save_npz(tmp_path / "e.npz", images=faces(), y=np.arange(6))
    with raises(422, "missing 'labels'", "found keys: ['images', 'y']"):
        read_npz_dataset(path)


def test_npz_object_array_refused_without_unpickling(tmp_path):
    labels = np.empty(6, dtype=object)
    labels[:] = [Boom()] * 6
    path = save_npz(tmp_path / "d.npz", images=faces(), labels=labels)
    UNPICKLED.clear()
    with raises(422, "object array", "pickle"):
        read_npz_dataset(path)
    assert UNPICKLED == []
    # control: the payload really runs code when unpickled
    with np.load(path, allow_pickle=True) as npz:
        npz["labels"]
    assert UNPICKLED


def test_npz_object_images_refused(tmp_path):
    imgs = np.empty(2, dtype=object)
    imgs[:] = [Boom(), Boom()]
    path = save_npz(tmp_path / "d.npz", images=imgs, labels=np.array([0, 1]))
    UNPICKLED.clear()
    with raises(422, "object array"):
        read_npz_dataset(path)
    assert UNPICKLED == []


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int64])
def test_npz_wrong_dtype(tmp_path, dtype):
    path = save_npz(tmp_path / "d.npz", images=faces().astype(dtype), labels=np.arange(6))
    with raises(422, "must be uint8", np.dtype(dtype).name):
        read_npz_dataset(path)


def test_npz_mismatched_n(tmp_path):
    path = save_npz(tmp_path / "d.npz", images=faces(6), labels=np.arange(5))
    with raises(422, "'images' has 6 entries but 'labels' has 5"):
        read_npz_dataset(path)


@pytest.mark.parametrize(
    "images, fragment",
    [
        (np.zeros(6 * 16 * 12, dtype=np.uint8), "shape (N, H, W)"),
        (np.zeros((6, 16, 12, 2), dtype=np.uint8), "C = 1, 3 or 4"),
        (np.zeros((6, 1, 16, 12, 3), dtype=np.uint8), "C = 1, 3 or 4"),
        (np.zeros((6, 4, 12), dtype=np.uint8), "between 8 and 4096"),
        (np.zeros((6, 16, 5000), dtype=np.uint8), "between 8 and 4096"),
    ],
)
def test_npz_bad_image_shapes(tmp_path, images, fragment):
    path = save_npz(tmp_path / "d.npz", images=images, labels=np.arange(6))
    with raises(422, fragment):
        read_npz_dataset(path)


def test_npz_empty(tmp_path):
    path = save_npz(
        tmp_path / "d.npz", images=np.zeros((0, 16, 16), np.uint8), labels=np.zeros(0, np.int64)
    )
    with raises(422, "N = 0"):
        read_npz_dataset(path)


@pytest.mark.parametrize(
    "labels, fragment",
    [
        (np.arange(12).reshape(6, 2), "shape (N,)"),
        (np.linspace(0, 1, 6), "integers or unicode strings"),
        (np.array([b"a", b"b", b"c", b"d", b"e", b"f"]), "Decode bytes"),
        (np.array(["a", "b", "c", "d\x00x", "e", "f\n"]), "control character"),
    ],
)
def test_npz_bad_labels(tmp_path, labels, fragment):
    path = save_npz(tmp_path / "d.npz", images=faces(6), labels=labels)
    with raises(422, fragment):
        read_npz_dataset(path)


def test_npz_bomb_refused_from_zip_headers(tmp_path):
    imgs = np.zeros((64, 256, 256), dtype=np.uint8)  # 4 MiB of zeros, compresses ~1000x
    path = save_npz(tmp_path / "d.npz", True, images=imgs, labels=np.arange(64))
    assert path.stat().st_size < 64 * 1024
    with raises(413, "FACEGRAD_MAX_COMPRESSION_RATIO", "images"):
        read_npz_dataset(path)
    with raises(413, "FACEGRAD_MAX_UNCOMPRESSED_BYTES"):
        read_npz_dataset(path, Limits(max_uncompressed_bytes=MiB, max_compression_ratio=1e9))
    images, _ = read_npz_dataset(path, Limits(max_compression_ratio=1e9))
    assert images.shape == (64, 256, 256, 3)


def test_npz_rgb_output_bounded_by_uncompressed_limit(tmp_path):
    path = save_npz(tmp_path / "d.npz", images=faces(10, 64, 64), labels=np.arange(10))
    limit = 100_000  # raw grey data is 40 960 bytes; as RGB it needs 122 880
    with raises(413, "FACEGRAD_MAX_UNCOMPRESSED_BYTES", "as RGB"):
        read_npz_dataset(path, Limits(max_uncompressed_bytes=limit))


def test_npz_pixel_limit(tmp_path):
    path = save_npz(tmp_path / "d.npz", images=faces(2, 64, 64), labels=np.arange(2))
    with raises(413, "FACEGRAD_MAX_IMAGE_PIXELS"):
        read_npz_dataset(path, Limits(max_pixels=4000))


def test_npy_header_lying_about_shape_refused_before_allocation(tmp_path):
    buf = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": (100_000, 4096, 4096)}
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(bytes(1000))  # 1.6 TB claimed, 1000 bytes present
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images.npy", buf.getvalue())
        lab = io.BytesIO()
        np.save(lab, np.arange(100_000))
        zf.writestr("labels.npy", lab.getvalue())
    with raises(422, "truncated"):
        read_npz_dataset(path)


def test_npz_not_a_zip(tmp_path):
    path = tmp_path / "d.npz"
    np.save(path.with_suffix(".npy"), faces())
    path.write_bytes(path.with_suffix(".npy").read_bytes())  # a bare .npy renamed
    with raises(422, "not a valid ZIP", "np.savez"):
        read_npz_dataset(path)


def test_npz_corrupt_member(tmp_path):
    path = save_npz(tmp_path / "d.npz", True, images=faces(20, 32, 32), labels=np.arange(20))
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("images.npy")
    start = info.header_offset + 30 + len(info.filename) + 400
    raw[start : start + 64] = b"\xaa" * 64
    path.write_bytes(bytes(raw))
    with raises(422, "'images'", "corrupt"):
        read_npz_dataset(path)


def test_npz_too_large_upload(tmp_path):
    path = save_npz(tmp_path / "d.npz", images=faces(), labels=np.arange(6))
    with raises(413, "FACEGRAD_MAX_UPLOAD_BYTES"):
        read_npz_dataset(path, Limits(max_upload_bytes=1000))
