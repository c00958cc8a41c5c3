"""Training batches from a stored dataset: its seeded split, and batches assembled on the
training device with the same augmentation either way.

Training takes its batches either from a copy of the split held on the device
(:class:`DeviceBatches`, resized once) or straight from the stored file (:class:`StreamBatches`:
rows read by a background thread, resized and augmented on the device), so that a worker's memory
does not grow with the dataset; :func:`make_batches` picks one (``TrainConfig.data_loading``).
Both shard each global batch between the ranks of a multi-device job.
"""

from __future__ import annotations

import math
import os
import queue
import tempfile
import threading

import numpy as np
import torch
import torch.nn.functional as F

from facegrad.data.preprocess import resize_uint8, standardise
from facegrad.data.store import NpyRows, keep_heap_flat, rows_source


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

    def take(self, positions: torch.Tensor, generator: torch.Generator | None,
             augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of the split's rows at ``positions``, in that order (a sampler's batch,
        e.g. DP-SGD's Poisson sample)."""
        idx = positions.to(self.device)
        xb = self.x.index_select(0, idx)
        if augment:
            xb = augment_batch(xb, generator, (0, 1), len(idx))
        return self.normalise(xb), self.y.index_select(0, idx)



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

    def take(self, positions: torch.Tensor, generator: torch.Generator | None,
             augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`DeviceBatches.take`, read from the stored dataset."""
        xb = self._load(positions.cpu())
        if augment:
            xb = augment_batch(xb, generator, (0, 1), len(positions))
        return self.normalise(xb), self.y.index_select(0, positions.to(self.y.device))

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
