"""Safe reading of uploaded datasets: ZIP archives of identity folders, and .npz arrays.

Nothing is extracted to disk. ZIP members are read into memory one at a time with bounded reads,
after every member has passed the path / symlink / encryption checks and the header size limits.
Only :class:`DatasetError` is raised for bad input; its ``reason`` says what to fix (and names
the setting for a limit) and its ``status`` is 413 (over a limit) or 422 (anything else).
"""

from __future__ import annotations

import os
import re
import stat
import struct
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields

import numpy as np

from facegrad.data.imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS

__all__ = [
    "ENV_VARS",
    "MAX_LABEL_CHARS",
    "DatasetError",
    "Limits",
    "check_identities",
    "check_npz_dataset",
    "check_zip_archive",
    "iter_zip_images",
    "normalise_label",
    "read_npz_dataset",
    "summarise",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MAX_LABEL_CHARS = 128
NPZ_MIN_SIDE = 8
NPZ_MAX_SIDE = 4096
# The compression-ratio limit is only applied to members larger than this: a tiny file (a flat
# synthetic image, a 10 KB PGM of one colour) can compress 500x and still be harmless.
RATIO_CHECK_MIN_BYTES = 1 * MiB
# Memory guard before zipfile parses the central directory: each listed member may take this
# many bytes of central directory on average (real entries take 60-300 bytes).
_CD_BYTES_PER_MEMBER = 512

ENV_VARS = {
    "max_upload_bytes": "FACEGRAD_MAX_UPLOAD_BYTES",
    "max_members": "FACEGRAD_MAX_ARCHIVE_MEMBERS",
    "max_uncompressed_bytes": "FACEGRAD_MAX_UNCOMPRESSED_BYTES",
    "max_member_bytes": "FACEGRAD_MAX_MEMBER_BYTES",
    "max_compression_ratio": "FACEGRAD_MAX_COMPRESSION_RATIO",
    "max_pixels": "FACEGRAD_MAX_IMAGE_PIXELS",
}

_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
_DRIVE = re.compile(r"^[A-Za-z]:")
# Bidirectional overrides/isolates: invisible and used to spoof names.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class DatasetError(ValueError):
    """An uploaded dataset is unusable. ``status``: 413 over a limit, 422 otherwise."""

    def __init__(self, reason: str, status: int = 422):
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Upload limits. Each one is configurable through the environment variable in ENV_VARS."""

    max_upload_bytes: int = 512 * MiB  # FACEGRAD_MAX_UPLOAD_BYTES
    max_members: int = 50_000  # FACEGRAD_MAX_ARCHIVE_MEMBERS
    max_uncompressed_bytes: int = 2 * GiB  # FACEGRAD_MAX_UNCOMPRESSED_BYTES
    max_member_bytes: int = 64 * MiB  # FACEGRAD_MAX_MEMBER_BYTES
    max_compression_ratio: float = 200  # FACEGRAD_MAX_COMPRESSION_RATIO
    max_pixels: int = DEFAULT_MAX_PIXELS  # FACEGRAD_MAX_IMAGE_PIXELS (per decoded image)
    min_identities: int = 2

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                setting = ENV_VARS.get(f.name, f.name)
                raise ValueError(f"{setting} must be a positive number, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """Defaults overridden by the FACEGRAD_* variables in ENV_VARS that are set."""
        env = os.environ if environ is None else environ
        kwargs = {}
        for name, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                kwargs[name] = float(raw) if name == "max_compression_ratio" else int(raw)
            except ValueError:
                raise ValueError(f"{var} must be a number, got {raw!r}") from None
        return cls(**kwargs)


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({int(n):,} bytes)"
    return f"{int(n):,} bytes"


def _over(what: str, limit_field: str, limits: Limits, fix: str) -> DatasetError:
    limit = getattr(limits, limit_field)
    shown = _fmt_bytes(limit) if limit_field.endswith("bytes") else f"{limit:,}"
    return DatasetError(
        f"{what}; the limit is {shown} (setting {ENV_VARS[limit_field]}). {fix}", 413
    )


# ---------------------------------------------------------------------------------------------
# ZIP container handling shared by archives and .npz files


def _central_directory_size(path: str | os.PathLike, size: int) -> tuple[int, int] | None:
    """(member count, central-directory bytes) from the end record, or None if not found."""
    tail_len = min(size, 22 + 65535)
    with open(path, "rb") as f:
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        pos = tail.rfind(b"PK\x05\x06")
        if pos < 0 or len(tail) - pos < 22:
            return None
        _sig, _d, _cd, _nd, count, cd_size, cd_off, _cl = struct.unpack(
            "<4s4H2LH", tail[pos : pos + 22]
        )
        if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_off == 0xFFFFFFFF:  # zip64
            loc = size - tail_len + pos - 20
            if loc < 0:
                return None
            f.seek(loc)
            locator = f.read(20)
            if len(locator) != 20 or locator[:4] != b"PK\x06\x07":
                return None
            z64_off = struct.unpack("<4sLQL", locator)[2]
            if z64_off > size:
                return None
            f.seek(z64_off)
            rec = f.read(56)
            if len(rec) != 56 or rec[:4] != b"PK\x06\x06":
                return None
            count, cd_size = struct.unpack("<4sQ2H2L4Q", rec)[6:8]
    return count, cd_size


def _open_zip(path: str | os.PathLike, limits: Limits, kind: str) -> zipfile.ZipFile:
    size = os.stat(path).st_size
    if size > limits.max_upload_bytes:
        raise _over(
            f"the {kind} is {_fmt_bytes(size)}",
            "max_upload_bytes",
            limits,
            "Upload a smaller file or split the dataset.",
        )
    if size == 0:
        raise DatasetError(f"the {kind} is empty (0 bytes); upload the file itself.", 422)
    listed = _central_directory_size(path, size)
    if listed is not None:
        count, cd_size = listed
        if count > limits.max_members or cd_size > max(
            limits.max_members * _CD_BYTES_PER_MEMBER, MiB
        ):
            raise _over(
                f"the {kind} lists too many members ({count:,} in its directory, "
                f"{_fmt_bytes(cd_size)} of directory)",
                "max_members",
                limits,
                "Upload fewer files per archive.",
            )
    try:
        zf = zipfile.ZipFile(path)
    except Exception as exc:  # noqa: BLE001 - BadZipFile, EOFError, OSError, struct.error...
        raise DatasetError(
            f"the {kind} is not a valid ZIP file or is corrupt ({type(exc).__name__}: {exc}). "
            + (
                "Create it with np.savez or np.savez_compressed."
                if kind == ".npz file"
                else "Re-create it with a standard zip tool (one folder per identity)."
            ),
            422,
        ) from None
    n = len(zf.infolist())
    if n > limits.max_members:
        zf.close()
        raise _over(
            f"the {kind} has {n:,} members",
            "max_members",
            limits,
            "Upload fewer files per archive.",
        )
    return zf


def _check_member_flags(info: zipfile.ZipInfo) -> None:
    name = info.filename
    if info.flag_bits & 0x1 or info.flag_bits & 0x40:
        raise DatasetError(
            f"member {name!r} is encrypted; re-create the archive without a password.", 422
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DatasetError(
            f"member {name!r} is a symbolic link, which is refused; archive the image files "
            "themselves (e.g. zip without --symlinks).",
            422,
        )


def _safe_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """Path components of a member, refusing anything that could point outside the archive."""
    name = info.filename
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise DatasetError(
            f"member {name!r} has an absolute path; archive paths must be relative "
            "(e.g. s01/1.png).",
            422,
        )
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise DatasetError(
            f"member {name!r} contains a '..' path component; archive paths must stay inside "
            "the archive (e.g. s01/1.png).",
            422,
        )
    if "\x00" in norm:
        raise DatasetError(f"member {name!r} has a NUL character in its path.", 422)
    return parts


def _check_ratio(name: str, uncompressed: int, compressed: int, limits: Limits, kind: str):
    if uncompressed <= RATIO_CHECK_MIN_BYTES:
        return
    ratio = uncompressed / max(compressed, 1)
    if ratio > limits.max_compression_ratio:
        raise _over(
            f"{kind} member {name!r} expands {ratio:,.0f}x ({_fmt_bytes(compressed)} to "
            f"{_fmt_bytes(uncompressed)}), which looks like a zip bomb",
            "max_compression_ratio",
            limits,
            "Upload the real image files (already-compressed formats such as PNG/JPEG).",
        )


# ---------------------------------------------------------------------------------------------
# Labels


def normalise_label(raw: str, where: str = "") -> str:
    """Identity label as stored: NFC-normalised, surrounding whitespace stripped.

    Refuses (422) empty labels, labels over MAX_LABEL_CHARS characters and labels with control,
    line-separator or bidirectional-override characters. ``where`` names the source in messages.
    """
    src = f" ({where})" if where else ""
    label = unicodedata.normalize("NFC", str(raw)).strip()
    if not label:
        raise DatasetError(f"identity name {raw!r}{src} is empty; name it after the person.", 422)
    if len(label) > MAX_LABEL_CHARS:
        raise DatasetError(
            f"identity name {label[:40]!r}...{src} is {len(label)} characters long; "
            f"use at most {MAX_LABEL_CHARS}.",
            422,
        )
    for ch in label:
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI:
            raise DatasetError(
                f"identity name {label!r}{src} contains the control character "
                f"U+{ord(ch):04X}; rename it using printable characters only.",
                422,
            )
    return label


def summarise(labels: Iterable[str]) -> dict[str, int]:
    """Images per identity, as ``{label: count}`` sorted by label."""
    return dict(sorted(Counter(labels).items()))


def check_identities(counts: Mapping[str, int], min_identities: int = 2) -> None:
    """Raise DatasetError (422) unless ``counts`` has at least ``min_identities`` identities."""
    found = [label for label, n in counts.items() if n > 0]
    if len(found) >= min_identities:
        return
    shown = ", ".join(repr(label) for label in found[:5]) + (", ..." if len(found) > 5 else "")
    detail = f" ({shown})" if shown else ""
    raise DatasetError(
        f"the dataset needs at least {min_identities} identities, found {len(found)}{detail}. "
        "Put each person's images in a folder named after them (e.g. s01/1.png, s02/1.png).",
        422,
    )


# ---------------------------------------------------------------------------------------------
# ZIP archives of identity folders


def _is_junk(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or (
        parts[-1].lower() in _JUNK_NAMES
    )


def _common_prefix(dirs: list[tuple[str, ...]]) -> tuple[str, ...]:
    first = dirs[0]
    n = len(first)
    for d in dirs[1:]:
        n = min(n, len(d))
        for i in range(n):
            if d[i] != first[i]:
                n = i
                break
    return first[:n]


def iter_zip_images(
    path: str | os.PathLike,
    limits: Limits | None = None,
    *,
    skipped: list[str] | None = None,
) -> ZipImages:
    """Yield ``(label, member_name, data)`` for every image in a ZIP of identity folders.

    Layout: one folder per identity, the folder name is the label (``s01/1.png``). The identity
    folders may sit under common wrapper folders (``faces/s01/1.pgm``,
    ``dataset/att_faces/s01/01.png``); a ZIP holding a single folder of images gives that one
    identity. Images directly in the root (the archive root or the common wrapper) have no
    identity: they are not yielded but appended to ``skipped`` (if given) for the caller to
    report. ``__MACOSX/``, dotfiles, ``Thumbs.db``/``desktop.ini`` and files without an image
    extension (README, .txt, .tsv, ...) are ignored. The bytes are not decoded here: pass them to
    ``facegrad.data.imageio.decode_image(data, max_pixels=limits.max_pixels)``.

    The archive is opened and checked eagerly (DatasetError is raised by this call, before any
    member is read): upload size, member count, unsafe members anywhere in the archive ('..',
    absolute paths, symlinks, encryption), per-member size, compression ratio and total
    uncompressed size of the selected images per their headers, identity names. Members are then
    read one at a time with reads bounded by the remaining limits, so a header that lies about
    its size cannot get past (zipfile also stops at the declared size and checks the CRC).
    Members are yielded in name order; the ZIP is closed when the iterator is exhausted/closed.
    """
    limits = limits or Limits()
    zf = _open_zip(path, limits, "archive")
    try:
        selected = _select_members(zf, limits, skipped)
    except BaseException:
        zf.close()
        raise
    return ZipImages(_read_members(zf, selected, limits), len(selected))


class ZipImages(Iterator[tuple[str, str, bytes]]):
    """What :func:`iter_zip_images` returns: its members one at a time; ``len()`` is how many
    it yields in all (known from the directory before any member is read)."""

    def __init__(self, members: Iterator[tuple[str, str, bytes]], count: int):
        self._members, self._count = members, count

    def __next__(self) -> tuple[str, str, bytes]:
        return next(self._members)

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        self._members.close()


def _select_members(
    zf: zipfile.ZipFile, limits: Limits, skipped: list[str] | None
) -> list[tuple[str, str, zipfile.ZipInfo]]:
    candidates: list[tuple[tuple[str, ...], zipfile.ZipInfo]] = []
    n_ignored = 0
    for info in zf.infolist():
        _check_member_flags(info)
        parts = _safe_parts(info)
        if info.is_dir() or not parts:
            continue
        if _is_junk(parts) or os.path.splitext(parts[-1])[1].lower() not in IMAGE_EXTENSIONS:
            n_ignored += 1
            continue
        candidates.append((parts, info))
    if not candidates:
        raise DatasetError(
            f"the archive contains no images ({n_ignored} other files ignored); expected one "
            "folder per identity holding JPEG/PNG/PGM/BMP/WebP/GIF/TIFF files (e.g. s01/1.png).",
            422,
        )

    dirs = [parts[:-1] for parts, _ in candidates]
    common = _common_prefix(dirs)
    # All images in one folder: that folder is the (single) identity, not a wrapper.
    root = common[:-1] if common and all(len(d) == len(common) for d in dirs) else common

    selected: list[tuple[str, str, zipfile.ZipInfo]] = []
    at_root: list[str] = []
    labels: dict[str, str] = {}
    for parts, info in candidates:
        rest = parts[len(root) : -1]
        if not rest:
            at_root.append(info.filename)
            continue
        folder = rest[0]
        if folder not in labels:
            labels[folder] = normalise_label(folder, f"folder of {info.filename!r}")
        selected.append((labels[folder], info.filename, info))
    if skipped is not None:
        skipped.extend(sorted(at_root))
    if not selected:
        raise DatasetError(
            f"the archive has {len(at_root)} images but none inside an identity folder; put "
            "each person's images in a folder named after them (e.g. s01/1.png, s02/1.png).",
            422,
        )

    total = 0
    for _label, name, info in selected:
        if info.file_size > limits.max_member_bytes:
            raise _over(
                f"member {name!r} is {_fmt_bytes(info.file_size)} uncompressed",
                "max_member_bytes",
                limits,
                "Downscale or re-compress that image.",
            )
        _check_ratio(name, info.file_size, info.compress_size, limits, "archive")
        total += info.file_size
    if total > limits.max_uncompressed_bytes:
        raise _over(
            f"the archive's images total {_fmt_bytes(total)} uncompressed",
            "max_uncompressed_bytes",
            limits,
            "Upload a smaller dataset or split it.",
        )
    selected.sort(key=lambda item: item[1])
    return selected


def _read_members(
    zf: zipfile.ZipFile, selected: list[tuple[str, str, zipfile.ZipInfo]], limits: Limits
) -> Iterator[tuple[str, str, bytes]]:
    total = 0
    try:
        for label, name, info in selected:
            left = limits.max_uncompressed_bytes - total
            cap = min(limits.max_member_bytes, left)
            try:
                with zf.open(info) as f:
                    data = f.read(cap + 1)
            except Exception as exc:  # noqa: BLE001 - bad CRC, EOFError, zlib.error, ...
                raise DatasetError(
                    f"member {name!r} is corrupt ({type(exc).__name__}: {exc}); re-create the "
                    "archive with a standard zip tool.",
                    422,
                ) from None
            if len(data) > limits.max_member_bytes:
                raise _over(
                    f"member {name!r} is larger than its header says",
                    "max_member_bytes",
                    limits,
                    "Re-create the archive with a standard zip tool.",
                )
            if len(data) > left:
                raise _over(
                    "the archive's images are larger than their headers say",
                    "max_uncompressed_bytes",
                    limits,
                    "Upload a smaller dataset or split it.",
                )
            _check_ratio(name, len(data), info.compress_size, limits, "archive")
            total += len(data)
            yield label, name, data
    finally:
        zf.close()


# ---------------------------------------------------------------------------------------------
# .npz arrays


def _npy_header(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str
) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a member's .npy header, without reading (or unpickling) its data."""
    fmt = np.lib.format
    try:
        with zf.open(info) as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _fortran, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
    except Exception as exc:  # noqa: BLE001 - bad input must map to our error
        raise DatasetError(
            f"array {key!r} in the .npz file is corrupt or not a .npy array "
            f"({type(exc).__name__}: {exc}); save it with np.savez.",
            422,
        ) from None
    if dtype.hasobject:
        raise DatasetError(
            f"array {key!r} is an object array (stored with pickle), which is refused for "
            "safety; save numbers as uint8/int arrays and names as a unicode string array, "
            "e.g. np.array(labels, dtype=str).",
            422,
        )
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > info.file_size:
        raise DatasetError(
            f"array {key!r} is truncated: its header says {shape} {dtype} but the data is "
            "shorter; save the .npz file again.",
            422,
        )
    return tuple(int(s) for s in shape), dtype


def _load_npy(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> np.ndarray:
    try:
        with zf.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - bad input must map to our error
        raise DatasetError(
            f"array {key!r} in the .npz file is corrupt ({type(exc).__name__}: {exc}); "
            "save the .npz file again.",
            422,
        ) from None


def read_npz_dataset(
    path: str | os.PathLike, limits: Limits | None = None
) -> tuple[np.ndarray, list[str]]:
    """Read a .npz dataset into ``(images uint8 (N, H, W, 3), labels list[str])``.

    The file must hold ``images``: uint8, shape (N, H, W) or (N, H, W, C) with C in 1, 3, 4, and
    ``labels``: shape (N,), integers or unicode strings (dtype 'U'). Greyscale is replicated to 3
    channels and a 4th (alpha) channel is dropped. 8 <= H, W <= 4096, H*W <= max_pixels and
    N*H*W*3 <= max_uncompressed_bytes. Other keys are ignored.

    The file is opened as a ZIP first: its size, member count, compression ratio and declared
    uncompressed sizes are checked against ``limits`` and the .npy headers (shape, dtype) are
    validated before any array data is read. Object arrays are refused from their header, so
    nothing is ever unpickled. ``max_member_bytes`` does not apply (one array holds them all).
    """
    limits = limits or Limits()
    zf = _open_zip(path, limits, ".npz file")
    with zf:
        img_info, lab_info, shape, lshape = _npz_members(zf, limits)
        images = _load_npy(zf, img_info, "images")
        raw_labels = _load_npy(zf, lab_info, "labels")
    if images.shape != shape or raw_labels.shape != lshape:  # defensive: header re-read
        raise DatasetError("the .npz arrays changed shape while reading; save it again.", 422)

    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=3)
    elif images.shape[3] == 1:
        images = np.repeat(images, 3, axis=3)
    elif images.shape[3] == 4:
        images = images[..., :3]
    images = np.ascontiguousarray(images, dtype=np.uint8)
    return images, _npz_labels(raw_labels)


def check_npz_dataset(path: str | os.PathLike, limits: Limits | None = None) -> dict[str, int]:
    """Images per identity of a .npz dataset, checked as :func:`read_npz_dataset` checks it but
    without reading the images: the ZIP, both .npy headers, the labels (which are read) and the
    number of identities (``limits.min_identities``). Raises DatasetError."""
    limits = limits or Limits()
    zf = _open_zip(path, limits, ".npz file")
    with zf:
        _img_info, lab_info, _shape, lshape = _npz_members(zf, limits)
        raw_labels = _load_npy(zf, lab_info, "labels")
    if raw_labels.shape != lshape:
        raise DatasetError("the .npz arrays changed shape while reading; save it again.", 422)
    counts = summarise(_npz_labels(raw_labels))
    check_identities(counts, limits.min_identities)
    return counts


def check_zip_archive(path: str | os.PathLike, limits: Limits | None = None) -> dict[str, int]:
    """Images per identity of a ZIP of identity folders, by its directory: every check that
    :func:`iter_zip_images` makes before reading a member (size, member count, unsafe members,
    header sizes and ratios, identity names), and the number of identities. No member is read.
    Raises DatasetError."""
    limits = limits or Limits()
    zf = _open_zip(path, limits, "archive")
    with zf:
        selected = _select_members(zf, limits, None)
    counts = summarise(label for label, _name, _info in selected)
    check_identities(counts, limits.min_identities)
    return counts


def _npz_members(
    zf: zipfile.ZipFile, limits: Limits
) -> tuple[zipfile.ZipInfo, zipfile.ZipInfo, tuple[int, ...], tuple[int, ...]]:
    """The checked ``images`` and ``labels`` members of an open .npz and their shapes."""
    members = {info.filename: info for info in zf.infolist()}
    missing = [k for k in ("images", "labels") if f"{k}.npy" not in members]
    if missing:
        found = sorted(n.removesuffix(".npy") for n in members)
        raise DatasetError(
            f"the .npz file must contain arrays 'images' and 'labels'; missing "
            f"{', '.join(repr(k) for k in missing)} (found keys: {found}). Save it with "
            "np.savez(path, images=images, labels=labels).",
            422,
        )
    img_info, lab_info = members["images.npy"], members["labels.npy"]
    total = 0
    for key, info in (("images", img_info), ("labels", lab_info)):
        _check_member_flags(info)
        _check_ratio(key, info.file_size, info.compress_size, limits, ".npz")
        total += info.file_size
    if total > limits.max_uncompressed_bytes:
        raise _over(
            f"the .npz arrays total {_fmt_bytes(total)} uncompressed",
            "max_uncompressed_bytes",
            limits,
            "Upload a smaller dataset or split it.",
        )

    shape, dtype = _npy_header(zf, img_info, "images")
    lshape, ldtype = _npy_header(zf, lab_info, "labels")
    n = _check_images_header(shape, dtype, limits)
    _check_labels_header(lshape, ldtype, n)
    return img_info, lab_info, shape, lshape


def _npz_labels(raw_labels: np.ndarray) -> list[str]:
    cache: dict = {}
    labels: list[str] = []
    for i, value in enumerate(raw_labels.tolist()):
        if value not in cache:
            cache[value] = normalise_label(str(value), f"labels[{i}]")
        labels.append(cache[value])
    return labels


def _check_images_header(shape: tuple[int, ...], dtype: np.dtype, limits: Limits) -> int:
    if dtype != np.uint8:
        raise DatasetError(
            f"'images' must be uint8 (0-255), got {dtype}. Convert it, e.g. "
            "(x * 255).round().astype(np.uint8) for floats in [0, 1].",
            422,
        )
    ok_ndim = len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3, 4))
    if not ok_ndim:
        raise DatasetError(
            f"'images' must have shape (N, H, W) or (N, H, W, C) with C = 1, 3 or 4; got {shape}.",
            422,
        )
    n, h, w = shape[:3]
    if n == 0:
        raise DatasetError("'images' is empty (N = 0); the dataset needs images.", 422)
    if not (NPZ_MIN_SIDE <= h <= NPZ_MAX_SIDE and NPZ_MIN_SIDE <= w <= NPZ_MAX_SIDE):
        raise DatasetError(
            f"'images' are {h}x{w} (HxW); height and width must be between {NPZ_MIN_SIDE} and "
            f"{NPZ_MAX_SIDE} pixels. Check the axis order is (N, H, W[, C]).",
            422,
        )
    if h * w > limits.max_pixels:
        raise _over(
            f"'images' are {h}x{w} = {h * w:,} pixels each",
            "max_pixels",
            limits,
            "Downscale the images.",
        )
    out_bytes = n * h * w * 3
    if out_bytes > limits.max_uncompressed_bytes:
        raise _over(
            f"'images' need {_fmt_bytes(out_bytes)} as RGB ({n:,} x {h}x{w}x3)",
            "max_uncompressed_bytes",
            limits,
            "Upload fewer or smaller images.",
        )
    return n


def _check_labels_header(shape: tuple[int, ...], dtype: np.dtype, n: int) -> None:
    if dtype.kind not in "iuU":
        hint = (
            " Decode bytes to str: np.array([b.decode() for b in labels])."
            if dtype.kind == "S"
            else ""
        )
        raise DatasetError(
            f"'labels' must be integers or unicode strings (dtype 'U'), got {dtype}.{hint}", 422
        )
    if len(shape) != 1:
        raise DatasetError(f"'labels' must have shape (N,), got {shape}.", 422)
    if shape[0] != n:
        raise DatasetError(
            f"'images' has {n} entries but 'labels' has {shape[0]}; they must match.", 422
        )
