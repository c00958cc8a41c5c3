"""The vector index over a gallery's embeddings, for identification at any gallery size.

A face scores each identity by its highest cosine similarity to one of that identity's images
(nearest image). Scoring every image of the gallery costs time linear in its size, and a dense
(faces x identities) matrix cannot be held at a million identities; the index instead returns a
face's nearest images, and the best ``k`` distinct identities are read off them in order (the
j-th new identity met in the ranked images is the j-th best identity: every image ranked above
an identity's best image belongs to an identity that scores higher).

Two kinds, FAISS (Johnson, Douze & Jégou 2019, "Billion-scale similarity search with GPUs")
inner product over unit vectors:

- ``exact`` (``IndexFlatIP`` behind an id map) below :data:`EXACT_BELOW` images: every image is
  scored, and the answer is the dense scoring's;
- ``ivf`` (``IndexIVFFlat``; Jégou, Douze & Schmid 2011, "Product quantization for nearest
  neighbor search", the inverted file over a coarse k-means quantizer) from there on: the
  images are filed under their nearest of ``nlist`` centroids and a face scans the lists of its
  ``nprobe`` nearest centroids only. It adds and removes vectors without being rebuilt, which a
  graph index such as HNSW (Malkov & Yashunin 2018) cannot do (it has no removal).

Each vector's id in the index is its identity's *key*, a number the gallery keeps for the
identity as long as it is enrolled, so removing a person is one ``remove_ids`` call and a search
answers identities directly. The sizes were chosen by ``bench/gallery_scale.py`` on synthetic
galleries built like face descriptors (docs/benchmarks.md, gallery_scale), one face per search
on this project's 2-core machine: an exact scan costs about 0.025 us per image (0.3 ms at 10k,
2.6 ms at 100k, 25 ms at 1M), so below 50k it stays near 1 ms and recalls everything; IVF with
``nlist`` ~ sqrt(N) and ``nprobe`` = max(32, nlist/16) answered in 0.5 ms at 100k and 2.4 ms at
1M, with the exact scan's best identity for 999 and 1000 of 1000 faces (nprobe 16 gave 0.993 and
0.980); ``nlist`` = 4 sqrt(N) searched as fast but took 7x as long to build (k-means and filing
1M images: 73 s against 10 s), a cost paid again at every rebuild.

The index is persisted beside the gallery in one file (a JSON header, then
``faiss.serialize_index``'s bytes; nothing is unpickled), written atomically and tagged with the
gallery's version and the sha256 of the gallery file it indexes: a loader that finds it missing,
corrupt or tagged for another gallery rebuilds it from the gallery's embeddings, which stay the
source of truth.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import faiss
import numpy as np

from facegrad.data.checkpoint import atomic_write

EXACT_BELOW = 50_000  # images; below this every image is scored (about 1.3 ms for one face)
TRAIN_POINTS_PER_LIST = 64  # k-means sample per IVF list (FAISS warns below 39)
REBUILD_GROWTH = 4  # an IVF index is rebuilt when the gallery grows past 4x what it was built on
FORMAT = "facegrad-gallery-index/1"
_MAGIC = b"FGINDEX1"


def ivf_params(n: int) -> tuple[int, int]:
    """(nlist, nprobe) for an IVF index over ``n`` images: nlist ~ sqrt(n), and the lists of
    1/16 of the centroids (at least 32) scanned per face."""
    nlist = int(min(65536, max(16, round(math.sqrt(n)))))
    return nlist, min(nlist, max(32, nlist // 16))


def _f32(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _i64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.int64)


class GalleryIndex:
    """A gallery's images in a FAISS index whose ids are identity keys.

    Searches may run from several threads at once; :meth:`add` and :meth:`remove` must not run
    while another thread searches (a served gallery is edited on a copy, :meth:`copy`).
    """

    def __init__(self, index: faiss.Index, kind: str, dim: int, trained_on: int = 0,
                 nprobe: int = 0):
        self.index, self.kind, self.dim = index, kind, dim
        self.trained_on, self.nprobe = trained_on, nprobe
        if kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = nprobe

    @classmethod
    def build(cls, emb, keys, exact_below: int = EXACT_BELOW, seed: int = 1234,
              nlist: int | None = None) -> GalleryIndex:
        """An index over ``emb`` (N, D) unit vectors whose ids are ``keys`` (N,): exact below
        ``exact_below`` images, IVF from there on (k-means on a seeded sample; ``nlist``
        overrides :func:`ivf_params`'s, for measuring)."""
        x, ids = _f32(emb), _i64(keys)
        n, dim = x.shape
        if n < exact_below:
            index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
            if n:
                index.add_with_ids(x, ids)
            return cls(index, "exact", dim)
        if nlist is None:
            nlist, nprobe = ivf_params(n)
        else:
            nprobe = min(nlist, max(32, nlist // 16))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST  # FAISS samples, seeded
        ivf.cp.seed = seed
        ivf.train(x)
        ivf.add_with_ids(x, ids)
        return cls(ivf, "ivf", dim, trained_on=n, nprobe=nprobe)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, emb, keys) -> None:
        x, ids = _f32(emb), _i64(keys)
        if len(x):
            self.index.add_with_ids(x, ids)

    def remove(self, keys) -> int:
        """Remove every image of these identity keys; returns how many were removed."""
        return int(self.index.remove_ids(_i64(keys)))

    def fits(self, exact_below: int = EXACT_BELOW) -> bool:
        """Whether this kind still suits its size: an exact index below ``exact_below`` images;
        an IVF one above half of it (hysteresis: a gallery hovering at the threshold is not
        rebuilt at every change) and below 4x the size its centroids were trained on."""
        n = self.ntotal
        if self.kind == "exact":
            return n < exact_below
        return exact_below // 2 <= n <= REBUILD_GROWTH * max(self.trained_on, 1)

    def copy(self) -> GalleryIndex:
        return GalleryIndex(faiss.clone_index(self.index), self.kind, self.dim, self.trained_on,
                            self.nprobe)

    def search(self, emb, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, keys), each (M, k), of each face's ``k`` nearest images, best first; key -1
        past the images found.

        On one OpenMP thread: identify searches for one face or a small batch, and a parallel
        region waits at its end for every thread it started; with other processes on the
        cores that wait dominated (one face, exact index of 10k images, on 2 cores at load 8:
        52 ms on 2 threads, 0.1 ms on one). The thread count is the calling thread's own
        (OpenMP's per-thread setting), restored after.
        """
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self.index.search(_f32(emb), k)
        finally:
            faiss.omp_set_num_threads(before)

    def memory_bytes(self) -> int:
        """The index's size as serialised (its vectors, ids and centroids)."""
        return int(faiss.serialize_index(self.index).nbytes)

    # --- persistence -------------------------------------------------------------------------

    def save(self, path: Path, tag: dict) -> None:
        """Write the index to ``path`` atomically: a header (format, kind, sizes, the payload's
        sha256 and ``tag``), then FAISS's own serialisation of the index."""
        payload = faiss.serialize_index(self.index)
        header = json.dumps(dict(tag, format=FORMAT, kind=self.kind, dim=self.dim,
                                 entries=self.ntotal, trained_on=self.trained_on,
                                 nprobe=self.nprobe,
                                 sha256=hashlib.sha256(payload.data).hexdigest())).encode()

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                f.write(_MAGIC + struct.pack("<Q", len(header)) + header)
                f.write(payload.data)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path, expect: dict) -> GalleryIndex | None:
        """The index saved at ``path`` when it is intact and its header matches every item of
        ``expect`` (the gallery's sha256, size, dimension); else None (missing, corrupt, or
        written for another state of the gallery)."""
        try:
            data = Path(path).read_bytes()
        except OSError:
            return None
        if data[:len(_MAGIC)] != _MAGIC or len(data) < len(_MAGIC) + 8:
            return None
        (size,) = struct.unpack("<Q", data[len(_MAGIC):len(_MAGIC) + 8])
        start = len(_MAGIC) + 8 + size
        try:
            header = json.loads(data[len(_MAGIC) + 8:start])
        except ValueError:
            return None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            return None
        if any(header.get(k) != v for k, v in expect.items()):
            return None
        payload = memoryview(data)[start:]
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            return None
        index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        if index.ntotal != header["entries"] or header["kind"] not in ("exact", "ivf"):
            return None
        return cls(index, header["kind"], header["dim"], header["trained_on"], header["nprobe"])


def top_identities(index: GalleryIndex, emb, k: int,
                   max_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Per face, its ``k`` best identities: (keys, scores), each (M, k), best first, padded with
    key -1 and score -2 where the gallery holds fewer identities.

    An identity's score is its nearest image's. Each face fetches its nearest images, first
    enough for ``k`` identities when its own person's images come first (``k - 1 +
    max_images``), then, for a face whose images named fewer than ``k`` identities, 4x as many
    again, up to ``(k - 1) * max_images + 1`` images, which must hold ``k`` identities when no
    identity has more than ``max_images`` images. With the exact index the result is therefore
    the dense scoring's top ``k``.
    """
    x = _f32(emb)
    m = len(x)
    keys = np.full((m, k), -1, dtype=np.int64)
    scores = np.full((m, k), -2.0, dtype=np.float32)
    n = index.ntotal
    if not (m and n and k):
        return keys, scores
    bound = min(n, (k - 1) * max(max_images, 1) + 1)
    fetch = min(bound, k - 1 + max(max_images, 1))
    todo = np.arange(m)
    while len(todo):
        d, ids = index.search(x[todo], fetch)
        again = []
        for row, dr, ir in zip(todo, d, ids):
            valid = ir >= 0
            found, first = np.unique(ir[valid], return_index=True)
            order = np.argsort(first, kind="stable")[:k]
            if len(order) < k and fetch < bound and valid.all():
                again.append(row)  # more images may name more identities
                continue
            keys[row, :len(order)] = found[order]
            scores[row, :len(order)] = dr[valid][first[order]]
        todo = np.asarray(again, dtype=np.int64)
        fetch = min(bound, fetch * 4)
    return keys, scores
