"""Identification with a trained model: embeddings matched against a gallery of enrolled images.

A model folder holds ``model.safetensors/.json`` (weights, fixed once trained) and
``gallery.safetensors/.json`` (the normalised embedding of every enrolled image and who it
belongs to) with ``gallery.faiss`` (the index over those embeddings,
:mod:`facegrad.recognition.index`), which enrollment rewrites atomically under an exclusive lock
on ``gallery.lock``, so that API processes editing one gallery apply their changes one after
another, each to the gallery the previous one wrote. A face scores each identity by its highest
cosine similarity to one of that identity's images, found through the index as the face's best
few identities, and is named when the best identity's score clears the model's calibrated
threshold. A loaded model is cached by the caller and reloads its gallery when it changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from facegrad.data import checkpoint as ckpt
from facegrad.data.preprocess import PREPROCESSING_VERSION
from facegrad.recognition.architectures import build_model
from facegrad.recognition.gallery import (
    DESCRIPTORS,
    Candidates,
    Fusion,
    Gallery,
    embed,
    gallery_from_training,
)

log = logging.getLogger("facegrad.recognition.inference")


class UnsupportedModel(ValueError):
    """A stored model this version cannot answer with: the message says why and what to do."""


LOCK_FILE = "gallery.lock"


@contextlib.contextmanager
def gallery_file_lock(folder: Path, exclusive: bool) -> Iterator[None]:
    """An advisory lock on the model folder's gallery files (``flock`` on ``gallery.lock``),
    shared by readers and exclusive for an edit, across processes and threads (each call opens
    its own file description). Without a writable folder nothing can edit the gallery there,
    and reading goes unlocked."""
    try:
        f = open(folder / LOCK_FILE, "a+b")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _Embedding(torch.nn.Module):
    """A face model's normalised embedding alone (its first output), for tracing."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def _compiled_embedding(net: torch.nn.Module, image_size: int,
                        device: torch.device) -> torch.nn.Module:
    """The model's embedding as one frozen TorchScript graph (checked against the eager model),
    else the eager model.

    An eager forward pass is a few dozen Python module calls, each taking Python's global
    interpreter lock back between kernels; in the API, with the event loop and request threads
    wanting the lock too, every hand-over can wait a switch interval (5 ms). A frozen traced
    graph runs in C++ with the lock released from start to end (and folds batch norm into the
    convolutions).
    """
    example = torch.rand(2, 3, image_size, image_size, device=device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.freeze(torch.jit.trace(_Embedding(net).eval(), example))
            ok = torch.allclose(traced(example), net(example)[0], atol=1e-4, rtol=1e-3)
    except Exception as e:  # tracing is an optimisation: never fail a model load on it
        log.warning("embedding not traced (%s: %s); using the eager model", type(e).__name__, e)
        return net
    if not ok:
        log.warning("traced embedding differs from the eager one; using the eager model")
        return net
    return traced


def check_supported(meta: dict) -> None:
    """Raise :class:`UnsupportedModel` for a model that describes faces otherwise than by its
    normalised embedding of aligned chips (models written by earlier versions)."""
    pre = meta.get("preprocessing") or {}
    old = [k for k in ("within_class", "lbp_share", "mid_stage_share") if pre.get(k)]
    if "score_adjustment" in (meta.get("open_set") or {}):
        old.append("score_adjustment")
    if pre.get("flip_tta") or list(pre.get("scale_tta") or [1.0]) != [1.0]:
        old.append("test-time augmentation")
    reasons = []
    if int(pre.get("version") or 1) < PREPROCESSING_VERSION:
        reasons.append(f"preprocessing version {pre.get('version') or 1}")
    if pre.get("descriptor") not in DESCRIPTORS:
        reasons.append(f"descriptor {pre.get('descriptor')!r}")
    if old:
        reasons.append(", ".join(old))
    if reasons:
        raise UnsupportedModel(
            "this model was trained by an earlier facegrad and describes faces with a "
            f"descriptor this version no longer computes ({'; '.join(reasons)}); retrain it "
            "on its dataset (POST /v1/jobs)")


class LoadedModel:
    """A model ready to embed and match; thread-safe for concurrent identify calls.

    Raises :class:`UnsupportedModel` for a model written by an earlier version that this one
    cannot answer with.
    """

    def __init__(self, folder: Path, device: str = "cpu"):
        tensors, meta = ckpt.load(folder / "model.json", device)
        check_supported(meta)
        self.folder, self.meta, self.device = folder, meta, torch.device(device)
        self.image_size = meta["preprocessing"]["image_size"]
        self.normalisation = meta["preprocessing"]["normalisation"]
        self.descriptor = meta["preprocessing"]["descriptor"]
        weights = meta["preprocessing"].get("fusion_weights")  # absent: the defaults (earlier)
        self.fusion = Fusion(tuple(float(w) for w in weights), tensors.get("fusion.centre"),
                             self._sface(tensors)) if weights else None
        self.threshold = float(meta["open_set"]["threshold"])
        self.verify_threshold = float(meta["open_set"].get("verify_threshold", self.threshold))
        self.net = build_model(meta["architecture"], meta["num_classes"], self.image_size)
        self.net.load_state_dict({k[6:]: v for k, v in tensors.items()
                                  if k.startswith("model.")})
        self.net.to(self.device).eval()
        self._embedder = _compiled_embedding(self.net, self.image_size, self.device)
        self._lock = threading.Lock()
        self.gallery = self._load_gallery()

    def _sface(self, tensors: dict[str, torch.Tensor]) -> torch.nn.Module | None:
        """The model's fine-tuned SFace (tensors ``sface.*``); None: the file's, as it is."""
        state = {k[6:]: v for k, v in tensors.items() if k.startswith("sface.")}
        if not state:
            return None
        from facegrad.recognition import sface  # reads SFace's file: only for fused models

        return sface.from_state(state, self.device)

    def _load_gallery(self) -> Gallery:
        with gallery_file_lock(self.folder, exclusive=False):
            if (self.folder / "gallery.json").exists():
                return Gallery.load(self.folder)
        g = gallery_from_training(self.folder / "model.json")
        g.index  # noqa: B018 (built now rather than by the first identify call)
        return g

    def refresh_gallery(self) -> None:
        """Serve the gallery as saved now (kept when it is the one served already)."""
        with gallery_file_lock(self.folder, exclusive=False):
            saved = Gallery.saved_sha256(self.folder)
        if saved is None or saved != self.gallery.sha256:
            self.gallery = self._load_gallery()

    @contextlib.contextmanager
    def edit_gallery(self) -> Iterator[Gallery]:
        """Edit the gallery: yields a private copy of it as saved now, under an exclusive lock
        on the gallery files; the caller changes it, saves it and records its version before
        the block ends, and the edited gallery is served from then on.

        Reloaded from the files when another process saved a gallery since this one was
        loaded, so that no process's change is lost; the served gallery is never changed in
        place, so identify calls in flight finish on the one they started with.
        """
        with gallery_file_lock(self.folder, exclusive=True):
            current = self.gallery
            if current.sha256 == Gallery.saved_sha256(self.folder):
                g = current.copy()
            else:
                g = Gallery.load(self.folder)
            yield g
            self.gallery = g

    def embed(self, crops: np.ndarray) -> torch.Tensor:
        """(N, S, S, 3) uint8 stored-format crops → (N, D) normalised embeddings."""
        with self._lock, torch.inference_mode():
            return embed(self._embedder, crops, self.image_size, self.device,
                         normalisation=self.normalisation, descriptor=self.descriptor,
                         fusion=self.fusion)

    def embed_and_score(self, crops: np.ndarray,
                        top_k: int = 5) -> tuple[torch.Tensor, Candidates, list[str]]:
        """(embeddings, each face's ``top_k`` best identities in the gallery, the gallery's
        identities then). The labels are the served gallery's own list, which edits never
        change (:meth:`edit_gallery` works on a copy)."""
        emb = self.embed(crops)
        g = self.gallery
        return emb, g.search(emb, top_k), g.labels

    def match(self, emb: torch.Tensor, top_k: int = 5, threshold: float | None = None):
        """Per embedding: (identity or None, confidence, [(identity, confidence)...])."""
        g = self.gallery
        return self.match_scores(g.search(emb, top_k), g.labels, top_k, threshold)

    def match_scores(self, sims: Candidates | torch.Tensor, labels: list[str], top_k: int = 5,
                     threshold: float | None = None):
        """:meth:`match` from each face's best identities (:class:`Candidates`) or from
        identity scores (M, C), already computed against ``labels``.

        A candidate's confidence is its identity score; the face's is the best identity's, which
        the threshold applies to. Both are clamped to 0-1.
        """
        thr = self.threshold if threshold is None else threshold
        if not isinstance(sims, Candidates):
            sims = Candidates.from_dense(sims, top_k)
        if not labels:
            return [(None, 0.0, []) for _ in range(len(sims))]
        k = min(top_k, sims.scores.shape[1])  # -1 / -2 past the identities with images
        vals, idx = sims.scores[:, :k], sims.index[:, :k]
        out = []
        for v, i in zip(vals.tolist(), idx.tolist()):
            cands = [(labels[j], _clamp(s)) for s, j in zip(v, i) if s > -1.5]
            if not cands:
                out.append((None, 0.0, []))
                continue
            out.append((cands[0][0] if v[0] >= thr else None, cands[0][1], cands))
        return out

    def verify_scores(self, emb: torch.Tensor, sims: Candidates | torch.Tensor, labels: list[str],
                      threshold: float | None = None, compare: str = "auto") -> dict:
        """Do two faces show the same person? ``emb`` (2, D) and their best identities ``sims``
        against ``labels``, as :meth:`LoadedModel.embed_and_score` gives them.

        With ``compare`` "auto", when both faces are identified (each clears the model's
        identify threshold) the answer follows the two identities: the gallery holds several
        views of each enrolled person, and two photos of one person that resemble each other
        less than two look-alikes do are still both closest to that person. Otherwise, and with
        "similarity", the two faces' cosine similarity is compared with ``threshold`` (default:
        the verification threshold the model calibrated on people held out of training).
        """
        similarity = float(emb[0] @ emb[1])
        thr = self.verify_threshold if threshold is None else float(threshold)
        identities = [m[0] for m in self.match_scores(sims, labels, 1)]
        if compare == "auto" and None not in identities:
            same, basis = identities[0] == identities[1], "identity"
        else:
            same, basis = similarity >= thr, "similarity"
        return {"same_person": same, "similarity": round(similarity, 4), "threshold": thr,
                "basis": basis, "identities": identities}


def _clamp(score: float) -> float:
    return round(min(1.0, max(0.0, score)), 4)
