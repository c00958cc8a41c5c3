"""Turning an uploaded archive (.zip of identity folders, or .npz arrays) into stored FaceArrays.

Each image is decoded once, cropped to its face (when detection is on) and appended as a uint8
crop to the images.npy being written, so the API process holds one face at a time, not the
dataset; unreadable files are reported per file rather than failing the whole upload.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facegrad.data.archive import (
    DatasetError,
    Limits,
    check_identities,
    iter_zip_images,
    read_npz_dataset,
)
from facegrad.data.imageio import ImageError, decode_image
from facegrad.data.preprocess import STORE_SIZE, prepare_face
from facegrad.data.store import FaceArrays, NpyRowWriter

# (rgb) -> stored crop; the detection module provides one that finds and crops the face.
FaceCropper = Callable[[np.ndarray], np.ndarray]
# (files done, files in all, rejected so far): called after each file; it may raise to stop.
Progress = Callable[[int, int, dict[str, str]], None]


@dataclass
class BuildReport:
    arrays: FaceArrays
    identities: dict[str, int]
    rejected: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def build_from_zip(path: Path, limits: Limits, crop: FaceCropper = prepare_face,
                   progress: Progress | None = None) -> BuildReport:
    """The faces of a .zip of identity folders; images.npy is written beside ``path`` face by
    face as they are decoded (:class:`ImagesFile`), never held together in memory."""
    labels: list[str] = []
    rejected: dict[str, str] = {}
    members = iter_zip_images(path, limits)
    total = len(members)
    with ImagesFile(path) as out:
        for done, (label, member, data) in enumerate(members, 1):
            try:  # a cropper may refuse an image too (ImageError: no face found)
                face = crop(decode_image(data, max_pixels=limits.max_pixels, filename=member))
            except ImageError as e:
                rejected[member] = e.reason
            else:
                out.append(face)
                labels.append(label)
            if progress:
                progress(done, total, rejected)
        return _finish(out, labels, rejected, limits)


def build_from_npz(path: Path, limits: Limits, crop: FaceCropper = prepare_face,
                   progress: Progress | None = None) -> BuildReport:
    raw, labels = read_npz_dataset(path, limits)
    with ImagesFile(path) as out:
        for done, img in enumerate(raw, 1):
            out.append(crop(img))
            if progress:
                progress(done, len(raw), {})
        return _finish(out, [str(x) for x in labels], {}, limits)


class ImagesFile:
    """An upload's stored crops, written to ``<upload>.images.npy`` one face at a time
    (:class:`facegrad.data.store.NpyRowWriter`: header fixed up at the end, then an atomic rename).

    A build that fails leaves no file. A finished one is handed on memory-mapped; the file is
    removed when the last reference to that array goes, by which time ``FaceArrays.save`` has
    linked (or copied) it into the dataset's folder.
    """

    def __init__(self, upload: Path):
        self.path = Path(upload).with_name(Path(upload).name + ".images.npy")
        self.writer: NpyRowWriter | None = None
        self.count = 0

    def append(self, face: np.ndarray) -> None:
        face = np.asarray(face, dtype=np.uint8)
        if self.writer is None:
            self.writer = NpyRowWriter(self.path, face.shape, np.uint8)
        self.writer.append(face)
        self.count += 1

    def finish(self) -> np.ndarray:
        if self.writer is None:
            raise ValueError("no faces were written")
        path = self.writer.finish()
        images = np.load(path, mmap_mode="r", allow_pickle=False)
        weakref.finalize(images, path.unlink, True)  # missing_ok: gone once it is moved
        return images

    def __enter__(self) -> ImagesFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.writer is not None:
            self.writer.__exit__(exc_type, exc, tb)  # not finished: the part file goes


def _finish(out: ImagesFile, labels, rejected, limits: Limits) -> BuildReport:
    if not out.count:
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
    arrays = FaceArrays(out.finish(),
                        np.array([index[lab] for lab in labels], dtype=np.int64), names)
    small = sorted(n for n, c in counts.items() if c < 3)
    info = {"store_size": STORE_SIZE}
    if small:
        info["warnings"] = [f"{len(small)} identities have fewer than 3 images and cannot be "
                            f"split for validation; they train on all their images: "
                            + ", ".join(small[:20])]
    return BuildReport(arrays, counts, rejected, info)
