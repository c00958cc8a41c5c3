"""Decoded face datasets, their stratified split, and batches assembled on the training device."""

from __future__ import annotations

import json
import math
import os
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
        """Write images.npy + labels.npy + names.json atomically (each to a temp, then rename)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, arr in (("images.npy", self.images), ("labels.npy", self.labels)):
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
        """``index`` picks rows of ``images``/``labels`` (e.g. of a memory-mapped dataset)
        without copying them all first: rows are read, moved and resized ``chunk`` at a time,
        so the host holds one chunk, not a copy of the split (bench/worker_memory.py).
        ``normalise`` prepares each batch for the model (``preprocess.NORMALISERS``)."""
        rows = np.arange(len(images)) if index is None else np.asarray(index)
        parts = []
        for start in range(0, max(1, len(rows)), chunk):  # one empty pass for an empty split
            x = torch.from_numpy(np.ascontiguousarray(images[rows[start:start + chunk]]))
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
        n = len(self)
        return n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)

    def epoch(self, batch_size: int, generator: torch.Generator | None, augment: bool,
              drop_last: bool = True):
        n = len(self)
        if generator is not None:
            order = torch.randperm(n, generator=generator).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(self.num_batches(batch_size, drop_last)):
            idx = order[i * batch_size:(i + 1) * batch_size]
            xb = self.x.index_select(0, idx)
            if augment:
                xb = augment_batch(xb, generator)
            yield self.normalise(xb), self.y.index_select(0, idx)


# the random affine's range: scale log-uniform in AUG_SCALE (the face's size in the frame), shift
# up to AUG_SHIFT of the side, rotation up to AUG_ANGLE degrees: people are photographed near
# and far, and the landmarks that align a face are found to within a few pixels
AUG_SCALE = (0.8, 1.25)
AUG_SHIFT = 0.1
AUG_ANGLE = 12.0


def _rand(n: int, generator, device, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=generator).to(device) * (hi - lo) + lo


def augment_batch(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """uint8 (N, 3, H, W) → augmented float (N, 3, H, W) in [0, 255]."""
    n, dev = x.shape[0], x.device
    xf = x.float()
    scale = torch.exp(_rand(n, generator, dev, math.log(AUG_SCALE[0]), math.log(AUG_SCALE[1])))
    angle = _rand(n, generator, dev, -AUG_ANGLE, AUG_ANGLE) * math.pi / 180
    tx, ty = (_rand(n, generator, dev, -AUG_SHIFT, AUG_SHIFT) for _ in range(2))
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev).float() * -2 + 1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1),
                         torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(xf.shape), align_corners=False)
    xf = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gamma = torch.exp(_rand(n, generator, dev, -0.4, 0.4)).view(n, 1, 1, 1)
    xf = 255.0 * (xf / 255.0).clamp_(0, 1).pow(gamma)
    contrast = _rand(n, generator, dev, 0.7, 1.3).view(n, 1, 1, 1)
    mean = xf.mean(dim=(1, 2, 3), keepdim=True)
    xf = (xf - mean) * contrast + mean
    grey = (torch.rand(n, generator=generator) < 0.2).to(dev).view(n, 1, 1, 1)
    xf = torch.where(grey, xf.mean(dim=1, keepdim=True).expand_as(xf), xf)
    return xf.clamp_(0, 255)
