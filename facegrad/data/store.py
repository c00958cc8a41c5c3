"""Face datasets as stored: ``images.npy`` (N, S, S, 3) uint8, ``labels.npy`` and ``names.json``.

:class:`FaceArrays` is a dataset as stored; :class:`NpyRows` reads any rows of the stored images
with ``pread`` (the file is never mapped, so what was read does not stay in the process's memory);
:class:`NpyRowWriter` writes a stored file a face at a time, atomically.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class FaceArrays:
    """A dataset as stored: uint8 images (N, S, S, 3), int labels (N,), label names."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str]

    def save(self, folder: Path) -> None:
        """Write images.npy + labels.npy + names.json atomically (each to a temp, then rename).

        Images that are a whole stored ``.npy`` file (memory-mapped, as :meth:`load` and
        dataset building give them) are not read into memory: the file is hard-linked into
        place (stored files are never changed in place, only replaced), or copied by the
        kernel where a link cannot be made (another file system)."""
        folder.mkdir(parents=True, exist_ok=True)
        stored = stored_file(self.images)
        if stored is not None and not stored.is_file():
            stored = None  # mapped from a file since removed: written from the mapping
        if stored is not None:
            _place_file(stored, folder / "images.npy")
        for name, arr in (("images.npy", self.images), ("labels.npy", self.labels)):
            if name == "images.npy" and stored is not None:
                continue
            tmp = folder / (name + ".tmp")
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / name)
        tmp = folder / "names.json.tmp"
        tmp.write_text(json.dumps(self.names))
        os.replace(tmp, folder / "names.json")

    @classmethod
    def load(cls, folder: Path, mmap: bool = True) -> FaceArrays:
        images = np.load(folder / "images.npy", mmap_mode="r" if mmap else None,
                         allow_pickle=False)
        labels = np.load(folder / "labels.npy", allow_pickle=False)
        names = json.loads((folder / "names.json").read_text())
        return cls(images, labels, names)


_HEAP_FIXED = False


def keep_heap_flat(threshold: int = 1 << 20) -> None:
    """Fix glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD)``), once per process.

    glibc raises the threshold, up to 32 MB, each time a block above it is freed; after that,
    the batch-sized buffers of a pass over a dataset (a few MB each) come from the heap, whose
    fragmentation then grows with the number of batches: embedding 10k more stored images
    grew a worker by about 110 MB (bench/dataset_scale.py), with the threshold fixed at 1 MB
    by 4.5 MB (their embeddings). Blocks of 1 MB or more are then mapped and unmapped each
    time, which costs a page fault per page, small beside the work on a batch. A no-op on other
    C libraries."""
    global _HEAP_FIXED
    if _HEAP_FIXED:
        return
    _HEAP_FIXED = True
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            ctypes.CDLL(None).mallopt(-3, int(threshold))  # -3: M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass


def _place_file(src: Path, dst: Path) -> None:
    """``src``'s bytes at ``dst``, atomically (a temp beside ``dst``, then rename)."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    if src.resolve() == dst.resolve():
        return
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)  # os.sendfile on Linux: the bytes never enter this process
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)


class NpyRows:
    """Rows of a stored ``.npy`` array read with ``os.pread``, never mapped into the process.

    Pages of a memory-mapped file that a process has touched count in its resident set (RSS),
    so reading a whole dataset through ``np.load(mmap_mode='r')`` grows a worker by the
    dataset's size; rows read with ``pread`` pass through the page cache (which the kernel
    reclaims, and which is not the process's RSS) into a buffer the reader reuses. Rows are
    read in sorted runs of consecutive rows, one ``pread`` per run; the same file descriptor
    serves any thread (``pread`` has no shared file position).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{path}: .npy format version {version} is not read here")
            self.offset = f.tell()
        if fortran or dtype.hasobject or not shape:
            raise ValueError(f"{self.path}: not a C-ordered array of rows")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize
        size = os.stat(self.path).st_size
        if size < self.offset + self.shape[0] * self.row_bytes:
            raise ValueError(f"{self.path}: truncated ({size} bytes for {self.shape})")
        self._fd = os.open(self.path, os.O_RDONLY)
        self._local = threading.local()  # a staging buffer per reading thread

    @classmethod
    def over_fd(cls, fd: int, shape: tuple[int, ...], dtype, name: str) -> NpyRows:
        """Rows of a headerless file of C-ordered rows open as ``fd`` (the reader owns it)."""
        self = cls.__new__(cls)
        self.path, self.offset = Path(name), 0
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._fd, self._local = fd, threading.local()
        return self

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self):
        self.close()

    def _staging(self, n: int) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.shape[0] < n:
            buf = self._local.buf = np.empty((n, *self.row_shape), self.dtype)
        return buf[:n]

    def _read_sorted(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Unique ascending ``rows`` into ``out``: one pread per run of consecutive rows."""
        flat = out.reshape(len(rows), -1).view(np.uint8)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run in np.split(np.arange(len(rows)), breaks):
            first, count = int(run[0]), len(run)
            want = count * self.row_bytes
            view = memoryview(flat[first:first + count].reshape(-1))
            got = 0
            while got < want:  # pread may return less than asked (signals, large reads)
                n = os.preadv(self._fd, [view[got:]],
                              self.offset + int(rows[first]) * self.row_bytes + got)
                if n <= 0:
                    raise OSError(f"{self.path}: short read at row {int(rows[first])}")
                got += n

    def read(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        """The rows ``rows`` (any order, repeats allowed) as an array (len(rows), *row_shape),
        into ``out`` when given (C-contiguous, of that shape and dtype)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((len(rows), *self.row_shape), self.dtype)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise IndexError(f"rows out of range [0, {self.shape[0]})")
        if len(rows) == 1 or bool((np.diff(rows) > 0).all()):
            self._read_sorted(rows, out)  # already unique and ascending: straight into out
            return out
        uniq, inverse = np.unique(rows, return_inverse=True)
        staged = self._staging(len(uniq))
        self._read_sorted(uniq, staged)
        np.take(staged, inverse.reshape(-1), axis=0, out=out)
        return out


class ArrayRows:
    """The :class:`NpyRows` interface over an array already in memory (tests, small uploads)."""

    def __init__(self, images: np.ndarray):
        self.images = images
        self.shape, self.dtype = images.shape, images.dtype
        self.row_shape = images.shape[1:]

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if out is None:
            return np.ascontiguousarray(self.images[rows])
        np.take(self.images, rows, axis=0, out=out)
        return out


def stored_file(images) -> Path | None:
    """The ``.npy`` file ``images`` is the whole array of (a memory map made by ``np.load``,
    or a view of all of one, as ``np.asarray`` gives), else None."""
    m = images
    while m is not None and not isinstance(m, np.memmap):
        m = getattr(m, "base", None)
    if not isinstance(images, np.ndarray) or m is None or getattr(m, "filename", None) is None:
        return None
    same = (images.shape == m.shape and images.dtype == m.dtype
            and images.flags.c_contiguous and m.flags.c_contiguous
            and images.__array_interface__["data"][0] == m.__array_interface__["data"][0])
    return Path(m.filename) if same and str(m.filename).endswith(".npy") else None


def rows_source(images) -> NpyRows | ArrayRows:
    """A reader of rows of ``images``: a path or memory-mapped stored dataset is read with
    ``pread`` (:class:`NpyRows`), an array in memory is indexed (:class:`ArrayRows`)."""
    if isinstance(images, (NpyRows, ArrayRows)):
        return images
    if isinstance(images, (str, os.PathLike)):
        return NpyRows(images)
    path = stored_file(images)
    if path is not None:
        reader = NpyRows(path)
        if reader.shape == tuple(images.shape) and reader.dtype == images.dtype:
            return reader
        reader.close()
    return ArrayRows(np.asarray(images))


class NpyRowWriter:
    """Writes a ``.npy`` file a row (or block of rows) at a time, without knowing the count.

    The header is written first with room for any row count (it is padded to
    ``HEADER_BYTES``, as the format allows), rows are appended as they come, and
    :meth:`finish` writes the true shape into the header, syncs the file and renames it from
    ``<path>.part`` to ``path``: a build that fails leaves no file at ``path`` (the part file
    is removed; use it as a context manager, or call :meth:`abort`).
    """

    HEADER_BYTES = 128  # magic, version, length and the dict with a 20-digit count, 64-aligned

    def __init__(self, path: str | os.PathLike, row_shape: tuple[int, ...], dtype=np.uint8):
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.row_shape, self.dtype = tuple(int(s) for s in row_shape), np.dtype(dtype)
        self.count = 0
        self._f = open(self.part, "wb")
        self._f.write(self._header(0))

    def _header(self, n: int) -> bytes:
        d = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
             "shape": (n, *self.row_shape)}
        text = repr(d).encode("latin1")
        room = self.HEADER_BYTES - 10 - len(text) - 1  # magic + version 6 + 2, length 2, '\n'
        if room < 0:
            raise ValueError(f"shape {d['shape']} does not fit a {self.HEADER_BYTES}-byte header")
        return (np.lib.format.magic(1, 0) + (len(text) + room + 1).to_bytes(2, "little")
                + text + b" " * room + b"\n")

    def append(self, rows: np.ndarray) -> None:
        """One row (shape ``row_shape``) or a block of rows (k, *row_shape)."""
        rows = np.asarray(rows)
        if rows.shape == self.row_shape:
            rows = rows[None]
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {rows.shape[1:]}, expected {self.row_shape}")
        self._f.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.count += rows.shape[0]

    def finish(self) -> Path:
        self._f.seek(0)
        self._f.write(self._header(self.count))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.part, self.path)
        return self.path

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.part.unlink(missing_ok=True)

    def __enter__(self) -> NpyRowWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._f.closed:
            self.abort()
