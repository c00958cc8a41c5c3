"""Embeddings of stored face crops, nearest-image identity scores, the identities held out of
training for calibration, and a model's gallery (:class:`Gallery`: its enrolled images'
embeddings, their identities and the index over them, :mod:`facegrad.recognition.index`) with
each face's best identities in it (:class:`Candidates`).

A face's embedding is its model's normalised embedding (``model(x)[0]``). A face scores each
identity of a gallery by its highest cosine similarity to one of that identity's images
(nearest image); the thresholds are calibrated by :mod:`facegrad.recognition.open_set`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facegrad.data import checkpoint as ckpt
from facegrad.data.preprocess import normaliser, resize_uint8
from facegrad.data.store import keep_heap_flat, rows_source
from facegrad.recognition.index import EXACT_BELOW, GalleryIndex, top_identities
from facegrad.recognition.open_set import pair_scores

log = logging.getLogger(__name__)

DESCRIPTORS = ("embedding", "flip_mean", "fused")
DLIB_WIDTH = 128  # dlib's embedding: the first part of a fused descriptor
# fused: the weights of dlib's and SFace's unit descriptors side by side (their squares sum to 1,
# so the row is unit length); a job sets its own (:func:`fit_fusion`), equal ones before that
FUSED_WEIGHTS = (0.5 ** 0.5, 0.5 ** 0.5)
MIN_IDENTITIES_TO_HOLD_OUT = 10  # below this, holding people out costs too much training data
INDEX_FILE = "gallery.faiss"  # the gallery's index, beside gallery.safetensors/.json


@torch.no_grad()
def embed(model: torch.nn.Module, images, image_size: int,
          device: torch.device | str = "cpu", batch_size: int = 256,
          index: np.ndarray | None = None,
          normalisation: str = "per_image_standardise",
          descriptor: str = "embedding",
          fusion: Fusion | None = None) -> torch.Tensor:
    """uint8 (N, S, S, 3) stored crops → (N, D) normalised descriptors on the CPU.

    ``model`` is a face model, or any module whose output (or its first element) is the
    normalised embedding; ``index`` picks rows, read one batch at a time. ``descriptor``:
    ``"embedding"``, the embedding of the crop; ``"flip_mean"``, the normalised mean of the
    embeddings of the crop and its mirror image (a face turned left then describes like the
    same face turned right: the mirror trick of DeepFace and ArcFace's evaluation, which
    narrows the gap between frontal and profile views); ``"fused"`` (dlib_resnet's chips),
    flip_mean beside SFace's descriptor of the same face (:mod:`facegrad.recognition.sface`),
    256-d, the two put together by ``fusion`` (:class:`Fusion`; default: equal weights, not
    centred). A stored dataset (its
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
        x = normalise(resize_uint8(chunk.to(device), image_size))
        faces = max(1, forward_images(model, image_size, x.device) // (
            1 if descriptor == "embedding" else 2))  # flip_mean: crops and mirrors, one pass
        d = torch.cat([_describe(model, x[j:j + faces], descriptor, fusion)
                       for j in range(0, len(x), faces)])
        if out is None:
            out = torch.empty(len(rows), d.shape[1])
        out[i:i + len(d)] = d
    if out is None:
        probe = torch.zeros(1, 3, image_size, image_size, device=device)
        return torch.zeros(0, _describe(model, probe, descriptor, fusion).shape[1])
    return out


# images per forward pass tried on a CPU; what was chosen, per network and (size, threads)
FORWARD_SIZES = (2, 4, 8, 16, 32)
_forward_images: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_forward_lock = threading.Lock()


def forward_images(model: torch.nn.Module, image_size: int, device: torch.device) -> int:
    """How many images one forward pass of ``model`` takes when describing faces.

    On an accelerator, a whole batch (:func:`embed`'s ``batch_size``): it gains with the batch.
    On a CPU the time per image is not flat in the batch: once a layer's activations outgrow
    the caches it rises (dlib_resnet at 150 px, 2 threads, AMD EPYC: 4.9 ms per image in passes
    of 4, 8.5 ms in passes of 64), and where that happens depends on the CPU, the network and the
    threads. So the size is measured, once per network (the object) and input size and thread
    count, on the network itself with the fastest time per image chosen among ``FORWARD_SIZES`` (as
    cuDNN's benchmark mode and FFTW's planner choose by timing; Frigo & Johnson 2005)."""
    if device.type != "cpu":
        return 1 << 30
    if getattr(model, "images_per_pass", None):  # a module that splits its passes itself
        return model.images_per_pass
    key = (image_size, torch.get_num_threads())
    with _forward_lock:
        chosen = _forward_images.setdefault(model, {})
        if key not in chosen:
            chosen[key] = _fastest_forward(model, image_size)
        return chosen[key]


def _fastest_forward(model: torch.nn.Module, image_size: int) -> int:
    best, best_t = FORWARD_SIZES[-1], float("inf")
    with torch.inference_mode():
        for n in FORWARD_SIZES:
            x = torch.zeros(n, 3, image_size, image_size)
            model(x)  # warm-up: first calls allocate and (traced graphs) optimise
            runs = []
            for _ in range(2):  # the faster of two: a timing is only ever slowed by noise
                t0 = time.perf_counter()
                model(x)
                runs.append(time.perf_counter() - t0)
            per_image = min(runs) / n
            if per_image < best_t:
                best, best_t = n, per_image
    log.debug("forward passes of %d images (%.2f ms per image)", best, best_t * 1e3)
    return best


def _embedding(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return (out[0] if isinstance(out, tuple) else out).float().cpu()


def _describe(model: torch.nn.Module, x: torch.Tensor, descriptor: str,
              fusion: Fusion | None = None) -> torch.Tensor:
    if descriptor == "embedding":
        return _embedding(model, x)
    both = _embedding(model, torch.cat([x, x.flip(3)]))  # one forward for crops and mirrors
    mean = F.normalize(both[:len(x)] + both[len(x):], dim=1)
    if descriptor == "flip_mean":
        return mean
    # fused: beside it SFace's, each unit length and weighted, so that a pair's cosine is the
    # weighted sum of the two networks' cosines (score-level fusion by the sum rule; Kittler et
    # al. 1998)
    from facegrad.recognition import sface

    return fuse(mean, sface.describe(x, fusion.network if fusion else None), fusion)


@dataclass(frozen=True)
class Fusion:
    """How a fused descriptor puts its two networks' unit descriptors side by side: SFace's less
    ``centre`` (the mean of its descriptors over the job's dataset, None: not centred) and
    normalised again, then each scaled by its weight (w1² + w2² = 1), so that a pair's cosine is
    w1² × dlib's cosine + w2² × SFace's. ``network``: SFace fine-tuned on the job's dataset
    (None: the file's network as it is)."""

    weights: tuple[float, float] = FUSED_WEIGHTS
    centre: torch.Tensor | None = None
    network: torch.nn.Module | None = field(default=None, compare=False)


def fuse(first: torch.Tensor, second: torch.Tensor, fusion: Fusion | None = None
         ) -> torch.Tensor:
    """dlib's (``first``) and SFace's (``second``) unit descriptors of the same faces as one
    fused descriptor (:class:`Fusion`)."""
    fusion = fusion or Fusion()
    if fusion.centre is not None:
        second = F.normalize(second - fusion.centre.to(second), dim=1)
    w1, w2 = fusion.weights
    return torch.cat([first * w1, second * w2], 1)


def fused_parts(emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused descriptor's two parts, each normalised (dlib's 128, then SFace's)."""
    first, second = emb[:, :DLIB_WIDTH], emb[:, DLIB_WIDTH:]
    return F.normalize(first, dim=1), F.normalize(second, dim=1)


def fit_fusion(emb: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, Fusion]:
    """The :class:`Fusion` of a job's dataset, from its images' fused descriptors as
    :func:`embed` gives them by default (``owner``: their identities), and the descriptors
    under it.

    - SFace's descriptors are centred on the dataset's mean. A network's descriptors of one
      kind of photo share a common part that tells no one apart; taking the data's mean out is
      the usual first step of cosine scoring (as before LDA/PLDA in speaker verification:
      Garcia-Romero & Espy-Wilson 2011) and a first-order alignment of a network to a new
      domain (CORAL aligns the second order too; Sun et al. 2016). Measured per network
      on CFP (cfp_dev, each fold's pairs with the other four folds as the dataset): SFace's
      frontal-profile accuracy rose on every fold (mean 0.878 → 0.887, frontal-frontal
      0.990 → 0.996), dlib's fell on every fold (0.873 → 0.858), so dlib's is left as it is.
    - Each network's cosine is weighed by 1 / (its standard deviation over different people's
      pairs): summing matchers' scores each standardised by its impostor scores (z-score
      normalisation, then the sum rule: Jain, Nandakumar & Ross 2005, "Score normalization in
      multimodal biometric systems") is, up to a constant that moves every pair alike, this
      weighted sum. With equal weights the network whose cosines spread more over strangers
      would drown the other's differences (pretrained on CFP: SFace's spread 0.10, dlib's
      0.04; fine-tuning widens dlib's to about 0.14).
    """
    first, second = fused_parts(emb)
    centre = second.mean(0)
    inverse = []
    for part in (first, F.normalize(second - centre, dim=1)):
        sims, same = pair_scores(part, owner)
        different = sims[~same]
        inverse.append(1.0 / max(float(different.std()), 1e-6) if len(different) > 1 else 1.0)
    total = sum(inverse)
    fusion = Fusion((float((inverse[0] / total) ** 0.5), float((inverse[1] / total) ** 0.5)),
                    centre)
    return fuse(first, second, fusion), fusion  # the served model's own path (fuse)


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


@dataclass
class Candidates:
    """Per face, its best identities in a gallery, best first: ``index`` (M, K) positions in
    the gallery's labels (-1 past the identities found) and ``scores`` (M, K) their
    nearest-image cosine similarities (-2 there)."""

    index: torch.Tensor
    scores: torch.Tensor

    def __getitem__(self, rows: slice) -> Candidates:
        return Candidates(self.index[rows], self.scores[rows])

    def __len__(self) -> int:
        return self.index.shape[0]

    @classmethod
    def from_dense(cls, sims: torch.Tensor, k: int) -> Candidates:
        """From identity scores (M, C) (identities without images at -2)."""
        vals, idx = sims.topk(min(k, sims.shape[1]), dim=1)
        return cls(torch.where(vals > -1.5, idx, -1), vals)


@dataclass
class Gallery:
    labels: list[str]
    emb: torch.Tensor  # (N, D) normalised embeddings of the enrolled images
    owner: torch.Tensor  # (N,) index into labels of each image's identity
    counts: torch.Tensor  # (C,) images enrolled per identity
    version: int = 0
    # (C,) each identity's key in the index, ascending; kept while the identity is enrolled
    keys: torch.Tensor | None = None
    sha256: str | None = None  # of the gallery file this content was loaded from or saved to
    exact_below: int = EXACT_BELOW  # images; from this size on the index is approximate (IVF)
    _index: GalleryIndex | None = field(default=None, repr=False, compare=False)
    _index_lock: threading.Lock = field(default_factory=threading.Lock, repr=False,
                                        compare=False)
    _max_images: int | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.keys is None:
            self.keys = torch.arange(len(self.labels), dtype=torch.long)

    def scores(self, emb: torch.Tensor) -> torch.Tensor:
        """(M, C) per probe and identity: the highest cosine similarity to one of its images
        (-2 for identities without images), every image scored (dense; for small galleries and
        checks: :meth:`search` is what identification runs)."""
        return identity_scores(emb, self.emb, self.owner, len(self.labels))

    @property
    def index(self) -> GalleryIndex:
        """The index over the embeddings, built on first use and again when the gallery has
        outgrown its kind (:meth:`GalleryIndex.fits`)."""
        with self._index_lock:
            if self._index is None or not self._index.fits(self.exact_below):
                self._index = GalleryIndex.build(self.emb, self.keys[self.owner],
                                                 self.exact_below)
            return self._index

    def search(self, emb: torch.Tensor, k: int) -> Candidates:
        """Each face's ``k`` best identities through the index (nearest image per identity)."""
        if self._max_images is None:
            # numpy's max, not torch's: at 200k identities torch splits it over its threads,
            # and on loaded cores waiting for both cost ~8 ms per call
            self._max_images = int(self.counts.numpy().max()) if len(self.counts) else 0
        keys, scores = top_identities(self.index, emb, k, self._max_images)
        pos = np.searchsorted(self.keys.numpy(), keys).clip(0, max(len(self.labels) - 1, 0))
        return Candidates(torch.from_numpy(np.where(keys >= 0, pos, -1)),
                          torch.from_numpy(scores))

    def copy(self) -> Gallery:
        """An independent copy to edit while this one is being served (tensors that edits
        replace rather than change are shared; the index is cloned)."""
        g = Gallery(list(self.labels), self.emb, self.owner, self.counts.clone(), self.version,
                    self.keys, self.sha256, self.exact_below)
        with self._index_lock:
            g._index = self._index.copy() if self._index is not None else None
        return g

    def save(self, folder: Path) -> None:
        """Write the gallery, then its index tagged with the gallery file's sha256 and version
        (each atomically: an index left from an interrupted save is seen as stale)."""
        meta_path = ckpt.save(folder / "gallery",
                              {"emb": self.emb, "owner": self.owner, "counts": self.counts,
                               "keys": self.keys},
                              {"kind": "gallery", "labels": self.labels,
                               "version": self.version, "scoring": "nearest_image",
                               "index": INDEX_FILE})
        self.sha256 = json.loads(meta_path.read_text())["sha256"]
        self.index.save(folder / INDEX_FILE, self._index_tag())

    def _index_tag(self) -> dict:
        return {"gallery_sha256": self.sha256, "gallery_version": self.version,
                "entries": int(self.emb.shape[0]), "dim": int(self.emb.shape[1])}

    @classmethod
    def load(cls, folder: Path) -> Gallery:
        """The gallery saved in ``folder`` with its index; an index that is missing or was
        written for another state of the gallery is rebuilt from the embeddings and saved."""
        tensors, meta = ckpt.load(folder / "gallery.json")
        g = cls.from_tensors(meta["labels"], tensors, "", meta["version"])
        g.sha256 = meta["sha256"]
        g._index = GalleryIndex.load(folder / INDEX_FILE, g._index_tag())
        if g._index is None or not g._index.fits(g.exact_below):
            log.info("gallery index of %s missing or stale: rebuilding it", folder)
            try:
                g.index.save(folder / INDEX_FILE, g._index_tag())
            except OSError as e:  # a read-only folder: serve the rebuilt index from memory
                log.warning("gallery index not saved (%s)", e)
        return g

    @staticmethod
    def saved_sha256(folder: Path) -> str | None:
        """The sha256 recorded by the gallery file in ``folder`` (None: no gallery file)."""
        try:
            return json.loads((folder / "gallery.json").read_text()).get("sha256")
        except FileNotFoundError:
            return None

    @classmethod
    def from_tensors(cls, labels: list[str], tensors: dict, prefix: str,
                     version: int = 0) -> Gallery:
        keys = tensors.get(prefix + "keys")
        return cls(list(labels), tensors[prefix + "emb"].float(),
                   tensors[prefix + "owner"].long(), tensors[prefix + "counts"].long(), version,
                   None if keys is None else keys.long())

    def enroll(self, identity: str, emb: torch.Tensor) -> None:
        """Add embeddings (N, D) to ``identity``, creating it if new."""
        if identity not in self.labels:
            self.labels.append(identity)
            self.counts = torch.cat([self.counts, torch.zeros(1, dtype=torch.long)])
            key = int(self.keys[-1]) + 1 if len(self.keys) else 0
            self.keys = torch.cat([self.keys, torch.tensor([key], dtype=torch.long)])
        i = self.labels.index(identity)
        self.emb = torch.cat([self.emb, emb.float()])
        self.owner = torch.cat([self.owner, torch.full((emb.shape[0],), i, dtype=torch.long)])
        self.counts[i] += emb.shape[0]
        self._max_images = None
        if self._index is not None:
            self._index.add(emb.float(), torch.full((emb.shape[0],), int(self.keys[i])))
        self.version += 1
        self.sha256 = None

    def remove(self, identity: str) -> None:
        i = self.labels.index(identity)
        keep = self.owner != i
        self.labels.pop(i)
        self.emb, self.owner = self.emb[keep], self.owner[keep]
        self.owner = self.owner - (self.owner > i).long()
        self.counts = torch.cat([self.counts[:i], self.counts[i + 1:]])
        if self._index is not None:
            self._index.remove([int(self.keys[i])])
        self.keys = torch.cat([self.keys[:i], self.keys[i + 1:]])
        self._max_images = None
        self.version += 1
        self.sha256 = None


def gallery_from_training(model_meta_path: Path) -> Gallery:
    tensors, meta = ckpt.load(model_meta_path)
    return Gallery.from_tensors(meta["labels"], tensors, "gallery.")
