"""Decoded face datasets, their stratified split, and batches assembled on the training device.

A stored dataset is ``images.npy`` (N, S, S, 3) uint8, ``labels.npy`` and ``names.json``. Training
takes its batches either from a copy of the split held on the device (:class:`DeviceBatches`,
resized once) or straight from the stored file (:class:`StreamBatches`: rows read with ``pread``
by a background thread, resized and augmented on the device), so that a worker's memory does not
grow with the dataset; :func:`make_batches` picks one (``TrainConfig.data_loading``).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facegrad.preprocess import resize_uint8, standardise


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


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int):
    """Seeded per-identity split → (train_idx, val_idx, too_few) as int arrays / label list.

    Each identity gives round(n * val_fraction) images to validation, at least one when
    val_fraction > 0 and it has 3 or more; identities with fewer than 3 images stay whole in
    training and are reported in ``too_few``.
    """
    rng = np.random.default_rng(seed)
    train, val, too_few = [], [], []
    for c in np.unique(labels[labels >= 0]):  # rows labelled -1 are left out (held out)
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = 0
        if val_fraction > 0:
            if len(idx) >= 3:
                n_val = min(len(idx) - 2, max(1, int(round(len(idx) * val_fraction))))
            else:
                too_few.append(int(c))
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64)), too_few


class DeviceBatches:
    """Holds a split's images as uint8 on the device, resized once, and yields float batches.

    Shuffling uses a seeded torch.Generator (its state goes into checkpoints); augmentation is
    a batched random affine (scale, shift, small rotation, flip) plus gamma/contrast jitter and
    occasional greyscale, all tensor ops on the same device.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int,
                 device: torch.device, pin: bool = False, index: np.ndarray | None = None,
                 chunk: int = 512, normalise=standardise):
        """``index`` picks rows of ``images``/``labels`` (an array, a memory-mapped stored
        dataset or its path) without copying them all first: rows are read, moved and resized
        ``chunk`` at a time, so the host holds one chunk, not a copy of the split
        (bench/worker_memory.py).
        ``normalise`` prepares each batch for the model (``preprocess.NORMALISERS``)."""
        reader = rows_source(images)  # a stored file is read with pread, not mapped
        rows = np.arange(len(reader)) if index is None else np.asarray(index)
        parts = []
        for start in range(0, max(1, len(rows)), chunk):  # one empty pass for an empty split
            x = torch.from_numpy(reader.read(rows[start:start + chunk]))
            if pin and device.type == "cuda":
                x = x.pin_memory()
            parts.append(resize_uint8(x.to(device, non_blocking=True), image_size))
        self.x = parts[0] if len(parts) == 1 else torch.cat(parts)
        self.y = torch.from_numpy(np.asarray(labels)[rows].astype(np.int64)).to(device)
        self.device = device
        self.normalise = normalise

    def __len__(self) -> int:
        return self.x.shape[0]

    def num_batches(self, batch_size: int, drop_last: bool) -> int:
        """Global batches per epoch (every rank of a sharded epoch steps this many times)."""
        return _num_batches(len(self), batch_size, drop_last)

    def epoch(self, batch_size: int, generator: torch.Generator | None, augment: bool,
              drop_last: bool = True, shard: tuple[int, int] = (0, 1)):
        """``(x, y)`` batches of one pass in a seeded order. ``shard=(rank, world)``: every
        rank walks the same global batches of ``batch_size`` rows (the same generator draws)
        and takes positions ``rank::world`` of each (see :func:`augment_batch`)."""
        rank, world = _check_shard(shard)
        order = _epoch_order(len(self), generator).to(self.device)
        for i in range(self.num_batches(batch_size, drop_last)):
            glob = order[i * batch_size:(i + 1) * batch_size]
            idx = glob[rank::world]
            xb = self.x.index_select(0, idx)
            if augment:
                xb = augment_batch(xb, generator, shard, len(glob))
            yield self.normalise(xb), self.y.index_select(0, idx)


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    rank, world = (int(v) for v in shard)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard {shard}: need 0 <= rank < world")
    return rank, world


def _epoch_order(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """The epoch's order of rows, on the CPU: the one draw from ``generator`` per epoch."""
    return torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)


_END = object()


class StreamBatches:
    """A split's batches read from the stored dataset as training goes: the same interface and,
    for the same generator state, exactly the same batches as :class:`DeviceBatches`.

    A background thread reads each batch's rows (:class:`NpyRows`: ``pread``, no mapping),
    moves them to the device (through pinned memory on CUDA) and resizes them there, one or
    two batches ahead of training (a bounded queue: memory holds ``prefetch`` batches, not the
    split). On the CPU the split is instead resized once, as :class:`DeviceBatches` does, into
    an unlinked temporary file beside the dataset (3 x size^2 bytes a row, 12 KB at 64 px;
    gone when the batches are), and batches are read from it: resizing every batch again
    cost a CPU worker about a tenth of a seed_cnn step (bench/dataset_scale.py).
    Augmentation and normalisation run in the consuming thread, so every draw from the epoch's
    generator happens in the order :class:`DeviceBatches` makes it. The thread stops when the
    epoch's generator ends, is closed or is garbage-collected.
    """

    def __init__(self, images, labels: np.ndarray, image_size: int, device: torch.device,
                 pin: bool = False, index: np.ndarray | None = None, normalise=standardise,
                 prefetch: int = 2, resize_once: bool | None = None):
        """``resize_once``: resize the split once into a temporary file (default: on the CPU)
        rather than every batch on the device."""
        keep_heap_flat()
        self.reader = rows_source(images)
        self.rows = (np.arange(len(self.reader)) if index is None
                     else np.asarray(index, dtype=np.int64))
        self.y = torch.from_numpy(np.asarray(labels)[self.rows].astype(np.int64)).to(device)
        self.image_size, self.device = image_size, torch.device(device)
        self.pin = pin and self.device.type == "cuda"
        self.normalise = normalise
        self.prefetch = max(1, prefetch)
        self.resized = None
        if resize_once is None:
            resize_once = self.device.type == "cpu"
        if resize_once and self.reader.row_shape[:2] != (image_size, image_size):
            self.resized = _resized_rows(self.reader, self.rows, image_size)

    def __len__(self) -> int:
        return len(self.rows)

    def num_batches(self, batch_size: int, drop_last: bool) -> int:
        """Global batches per epoch (every rank of a sharded epoch steps this many times)."""
        return _num_batches(len(self), batch_size, drop_last)

    def _load(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows at ``positions`` of the split → uint8 (n, 3, size, size) on the device."""
        if self.resized is not None:  # resized once (CPU): rows of the split, in its order
            host = torch.empty((len(positions), *self.resized.row_shape), dtype=torch.uint8)
            return torch.from_numpy(self.resized.read(positions.numpy(), out=host.numpy()))
        rows = self.rows[positions.numpy()]
        shape = (len(rows), *self.reader.row_shape)
        host = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin)
        self.reader.read(rows, out=host.numpy())
        x = resize_uint8(host.to(self.device, non_blocking=self.pin), self.image_size)
        # in the layout DeviceBatches' index_select gives (resizing keeps channels-last
        # strides), so that normalising reduces in the same order: the same floats
        return x.contiguous()

    def epoch(self, batch_size: int, generator: torch.Generator | None, augment: bool,
              drop_last: bool = True, shard: tuple[int, int] = (0, 1)):
        """As :meth:`DeviceBatches.epoch` (``shard`` included)."""
        rank, world = _check_shard(shard)
        order = _epoch_order(len(self), generator)
        parts = [order[i * batch_size:(i + 1) * batch_size]
                 for i in range(self.num_batches(batch_size, drop_last))]
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, name="facegrad-stream-batches",
                                  args=([p[rank::world] for p in parts], q, stop), daemon=True)
        thread.start()
        try:
            for glob in parts:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                xb = item
                if augment:
                    xb = augment_batch(xb, generator, shard, len(glob))
                yield self.normalise(xb), self.y.index_select(0, glob[rank::world].to(
                    self.y.device))
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)

    def _produce(self, jobs: list[torch.Tensor], q: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            with torch.no_grad():
                for positions in jobs:
                    if stop.is_set() or not put(self._load(positions)):
                        return
        except BaseException as e:  # handed to the consumer, raised in its thread
            put(e)


def _resized_rows(reader, rows: np.ndarray, image_size: int, chunk: int = 512) -> NpyRows:
    """``rows`` of ``reader`` resized (uint8 (n, 3, size, size), as ``DeviceBatches`` holds
    them) into a temporary file, unlinked at once so that it goes with its reader; beside the
    stored dataset (a data volume), else in the system's temp folder. One chunk in memory."""
    where = [reader.path.parent] if isinstance(reader, NpyRows) else []
    for folder in where + [None]:
        try:
            fd, name = tempfile.mkstemp(prefix=".resized-", suffix=".u8", dir=folder)
            break
        except OSError:
            continue
    os.unlink(name)
    try:
        for start in range(0, len(rows), chunk):
            x = torch.from_numpy(reader.read(rows[start:start + chunk]))
            view = memoryview(resize_uint8(x, image_size).contiguous().numpy().reshape(-1))
            while len(view):
                view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return NpyRows.over_fd(fd, (len(rows), 3, image_size, image_size), np.uint8, name)


def loading_mode(mode: str, n_rows: int, image_size: int) -> str:
    """``'memory'`` or ``'stream'`` for ``TrainConfig.data_loading``: 'auto' holds the split on
    the device when its resized uint8 copy fits in ``MEMORY_LOADING_BYTES``."""
    if mode == "auto":
        return "memory" if n_rows * 3 * image_size ** 2 <= MEMORY_LOADING_BYTES else "stream"
    if mode not in ("memory", "stream"):
        raise ValueError(f"data_loading {mode!r}: 'auto', 'memory' or 'stream'")
    return mode


MEMORY_LOADING_BYTES = 1 << 30


def make_batches(images, labels: np.ndarray, index: np.ndarray | None, image_size: int,
                 device: torch.device, normalise=standardise, mode: str = "auto",
                 pin: bool = False) -> DeviceBatches | StreamBatches:
    """A split's batches: :class:`DeviceBatches` or :class:`StreamBatches` by ``mode``
    (:func:`loading_mode`). ``images``: an array, a memory-mapped stored dataset or the path
    of its ``images.npy`` (streaming reads the file; an array in memory is indexed)."""
    n = len(np.asarray(labels)) if index is None else len(index)
    cls = DeviceBatches if loading_mode(mode, n, image_size) == "memory" else StreamBatches
    return cls(images, labels, image_size, device, pin=pin, index=index, normalise=normalise)


# the random affine's range: scale log-uniform in AUG_SCALE (the face's size in the frame), shift
# up to AUG_SHIFT of the side, rotation up to AUG_ANGLE degrees: people are photographed near
# and far, and the landmarks that align a face are found to within a few pixels
AUG_SCALE = (0.8, 1.25)
AUG_SHIFT = 0.1
AUG_ANGLE = 12.0


def _rand(n: int, generator, device, lo: float, hi: float, pick=slice(None)) -> torch.Tensor:
    return torch.rand(n, generator=generator)[pick].to(device) * (hi - lo) + lo


def augment_batch(x: torch.Tensor, generator: torch.Generator | None,
                  shard: tuple[int, int] = (0, 1), batch_size: int | None = None
                  ) -> torch.Tensor:
    """uint8 (N, 3, H, W) → augmented float (N, 3, H, W) in [0, 255].

    ``shard=(rank, world)``: ``x`` holds positions ``rank::world`` of a global batch of
    ``batch_size`` rows; the random parameters are drawn for the whole global batch (the
    draws one process makes) and those at the rank's positions applied, so the ranks'
    outputs together are the one-process batch, and every rank's generator stays in step.
    """
    rank, world = shard
    n_all = x.shape[0] if batch_size is None else batch_size
    pick = slice(rank, None, world)
    n, dev = x.shape[0], x.device
    if len(range(n_all)[pick]) != n:
        raise ValueError(f"{n} rows are not positions {rank}::{world} of a batch of {n_all}")
    scale = torch.exp(_rand(n_all, generator, dev, math.log(AUG_SCALE[0]),
                            math.log(AUG_SCALE[1]), pick))
    angle = _rand(n_all, generator, dev, -AUG_ANGLE, AUG_ANGLE, pick) * math.pi / 180
    tx, ty = (_rand(n_all, generator, dev, -AUG_SHIFT, AUG_SHIFT, pick) for _ in range(2))
    flip = (torch.rand(n_all, generator=generator)[pick] < 0.5).to(dev).float() * -2 + 1
    gamma = torch.exp(_rand(n_all, generator, dev, -0.4, 0.4, pick)).view(n, 1, 1, 1)
    contrast = _rand(n_all, generator, dev, 0.7, 1.3, pick).view(n, 1, 1, 1)
    grey = (torch.rand(n_all, generator=generator)[pick] < 0.2).to(dev).view(n, 1, 1, 1)
    xf = x.float()
    if n == 0:  # a rank with no rows of a short last batch: the draws above keep it in step
        return xf
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1),
                         torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(xf.shape), align_corners=False)
    xf = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)
    xf = 255.0 * (xf / 255.0).clamp_(0, 1).pow(gamma)
    mean = xf.mean(dim=(1, 2, 3), keepdim=True)
    xf = (xf - mean) * contrast + mean
    xf = torch.where(grey, xf.mean(dim=1, keepdim=True).expand_as(xf), xf)
    return xf.clamp_(0, 255)
