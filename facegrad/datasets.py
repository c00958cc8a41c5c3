"""Turning an uploaded archive (.zip of identity folders, or .npz arrays) into stored FaceArrays.

Each image is decoded once, cropped to its face (when detection is on) and kept as a uint8 crop;
unreadable files are reported per file rather than failing the whole upload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facegrad.archive import (
    DatasetError,
    Limits,
    check_identities,
    iter_zip_images,
    read_npz_dataset,
)
from facegrad.data import FaceArrays
from facegrad.imageio import ImageError, decode_image
from facegrad.preprocess import STORE_SIZE, prepare_face

# (rgb) -> stored crop; the detection module provides one that finds and crops the face.
FaceCropper = Callable[[np.ndarray], np.ndarray]


@dataclass
class BuildReport:
    arrays: FaceArrays
    identities: dict[str, int]
    rejected: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def build_from_zip(path: Path, limits: Limits, crop: FaceCropper = prepare_face) -> BuildReport:
    images: list[np.ndarray] = []
    labels: list[str] = []
    rejected: dict[str, str] = {}
    for label, member, data in iter_zip_images(path, limits):
        try:  # a cropper may refuse an image too (ImageError: no face found)
            face = crop(decode_image(data, max_pixels=limits.max_pixels, filename=member))
        except ImageError as e:
            rejected[member] = e.reason
            continue
        images.append(face)
        labels.append(label)
    return _finish(images, labels, rejected, limits)


def build_from_npz(path: Path, limits: Limits, crop: FaceCropper = prepare_face) -> BuildReport:
    raw, labels = read_npz_dataset(path, limits)
    images = [crop(img) for img in raw]
    return _finish(images, [str(x) for x in labels], {}, limits)


def _finish(images, labels, rejected, limits: Limits) -> BuildReport:
    if not images:
        examples = "; ".join(why if m in why else f"'{m}': {why}"
                             for m, why in list(rejected.items())[:3])
        raise DatasetError("the upload holds no readable face images"
                           + (f" ({len(rejected)} files rejected, e.g. {examples})"
                              if rejected else "")
                           + ". Upload JPEG/PNG/PGM/BMP/WebP/GIF/TIFF face images.", 422)
    names = sorted(set(labels))
    counts = {n: 0 for n in names}
    for lab in labels:
        counts[lab] += 1
    check_identities(counts, limits.min_identities)
    index = {n: i for i, n in enumerate(names)}
    arrays = FaceArrays(np.stack(images).astype(np.uint8),
                        np.array([index[lab] for lab in labels], dtype=np.int64), names)
    small = sorted(n for n, c in counts.items() if c < 3)
    info = {"store_size": STORE_SIZE}
    if small:
        info["warnings"] = [f"{len(small)} identities have fewer than 3 images and cannot be "
                            f"split for validation; they train on all their images: "
                            + ", ".join(small[:20])]
    return BuildReport(arrays, counts, rejected, info)
