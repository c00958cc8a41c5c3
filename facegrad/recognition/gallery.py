"""Embeddings of stored face crops, nearest-image identity scores, and the identities held out
of training for calibration.

A face's embedding is its model's normalised embedding (``model(x)[0]``). A face scores each
identity of a gallery by its highest cosine similarity to one of that identity's images
(nearest image); the thresholds are calibrated by :mod:`facegrad.recognition.open_set`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from facegrad.data.preprocess import normaliser, resize_uint8
from facegrad.data.store import keep_heap_flat, rows_source

DESCRIPTORS = ("embedding", "flip_mean")
MIN_IDENTITIES_TO_HOLD_OUT = 10  # below this, holding people out costs too much training data


@torch.no_grad()
def embed(model: torch.nn.Module, images, image_size: int,
          device: torch.device | str = "cpu", batch_size: int = 256,
          index: np.ndarray | None = None,
          normalisation: str = "per_image_standardise",
          descriptor: str = "embedding") -> torch.Tensor:
    """uint8 (N, S, S, 3) stored crops → (N, D) normalised descriptors on the CPU.

    ``model`` is a face model, or any module whose output (or its first element) is the
    normalised embedding; ``index`` picks rows, read one batch at a time. ``descriptor``:
    ``"embedding"``, the embedding of the crop; ``"flip_mean"``, the normalised mean of the
    embeddings of the crop and its mirror image (a face turned left then describes like the
    same face turned right: the mirror trick of DeepFace and ArcFace's evaluation, which
    narrows the gap between frontal and profile views). A stored dataset (its
    ``images.npy`` path, or the array memory-mapped from it) is read with ``pread`` into one
    reused buffer (:class:`facegrad.data.store.NpyRows`), not through the mapping, whose touched
    pages would count in this process's memory: embedding every image of a large gallery then
    costs a batch of memory, not the dataset.
    """
    if descriptor not in DESCRIPTORS:
        raise ValueError(f"descriptor must be one of {DESCRIPTORS}, got {descriptor!r}")
    model.eval()
    normalise = normaliser(normalisation)
    if not torch.is_tensor(images):
        images = rows_source(images)
        keep_heap_flat()  # batch buffers do not pile up in the heap over a large gallery
    rows = np.arange(len(images)) if index is None else np.asarray(index)
    out = None  # filled a batch at a time: a large gallery is not copied by a final cat
    buf = None
    for i in range(0, len(rows), batch_size):
        if torch.is_tensor(images):
            chunk = images[torch.as_tensor(rows[i:i + batch_size])]
        else:
            part = rows[i:i + batch_size]
            if buf is None or buf.shape[0] != len(part):
                buf = np.empty((len(part), *images.row_shape), images.dtype)
            chunk = torch.from_numpy(images.read(part, out=buf))
        d = _describe(model, normalise(resize_uint8(chunk.to(device), image_size)), descriptor)
        if out is None:
            out = torch.empty(len(rows), d.shape[1])
        out[i:i + len(d)] = d
    if out is None:
        probe = torch.zeros(1, 3, image_size, image_size, device=device)
        return torch.zeros(0, _embedding(model, probe).shape[1])
    return out


def _embedding(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return (out[0] if isinstance(out, tuple) else out).float().cpu()


def _describe(model: torch.nn.Module, x: torch.Tensor, descriptor: str) -> torch.Tensor:
    if descriptor == "embedding":
        return _embedding(model, x)
    both = _embedding(model, torch.cat([x, x.flip(3)]))  # one forward for crops and mirrors
    return F.normalize(both[:len(x)] + both[len(x):], dim=1)


def identity_scores(emb: torch.Tensor, gallery: torch.Tensor, owner: torch.Tensor,
                    num_identities: int) -> torch.Tensor:
    """(M, C): per probe and identity, the highest cosine similarity to one of its images;
    identities without images score -2."""
    out = torch.full((emb.shape[0], num_identities), -2.0)
    if gallery.shape[0]:
        idx = owner.long().view(1, -1).expand(emb.shape[0], -1)
        out = out.scatter_reduce(1, idx, emb @ gallery.t(), reduce="amax", include_self=True)
    return out


def holdout_identities(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The identities (label values) held out of training for calibration; seeded.

    ``round(fraction * C)`` of the C identities that have at least 2 images, when C is at least
    ``MIN_IDENTITIES_TO_HOLD_OUT``, and always at least 2 then (a held-out person is a stranger
    to a gallery that includes the others); none otherwise.
    """
    ids, counts = np.unique(labels, return_counts=True)
    eligible = ids[counts >= 2]
    n = int(round(fraction * len(ids)))
    if fraction <= 0 or len(ids) < MIN_IDENTITIES_TO_HOLD_OUT or len(eligible) < 2:
        return np.zeros(0, dtype=np.int64)
    n = min(max(2, n), len(eligible), len(ids) - 2)
    rng = np.random.default_rng([seed, 5])
    return np.sort(rng.choice(eligible, size=n, replace=False)).astype(np.int64)
