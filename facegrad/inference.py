"""Identification with a trained model: embeddings matched against a gallery of enrolled images.

A model folder holds ``model.safetensors/.json`` (weights, fixed once trained) and
``gallery.safetensors/.json`` (the normalised embedding of every enrolled image and who it
belongs to), which enrollment rewrites atomically. A face scores each identity by its highest
cosine similarity to one of that identity's images, and is named when the best identity's score
clears the model's calibrated threshold. A loaded model is cached by the caller and reloads its
gallery when it changes.
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facegrad import checkpoint as ckpt
from facegrad.gallery import embed, identity_scores
from facegrad.models import build_model
from facegrad.preprocess import PREPROCESSING_VERSION

log = logging.getLogger("facegrad.inference")


class UnsupportedModel(ValueError):
    """A stored model this version cannot answer with: the message says why and what to do."""


@dataclass
class Gallery:
    labels: list[str]
    emb: torch.Tensor  # (N, D) normalised embeddings of the enrolled images
    owner: torch.Tensor  # (N,) index into labels of each image's identity
    counts: torch.Tensor  # (C,) images enrolled per identity
    version: int = 0

    def scores(self, emb: torch.Tensor) -> torch.Tensor:
        """(M, C) per probe and identity: the highest cosine similarity to one of its images
        (-2 for identities without images)."""
        return identity_scores(emb, self.emb, self.owner, len(self.labels))

    def save(self, folder: Path) -> None:
        ckpt.save(folder / "gallery", {"emb": self.emb, "owner": self.owner,
                                       "counts": self.counts},
                  {"kind": "gallery", "labels": self.labels, "version": self.version,
                   "scoring": "nearest_image"})

    @classmethod
    def load(cls, folder: Path) -> Gallery:
        tensors, meta = ckpt.load(folder / "gallery.json")
        return cls.from_tensors(meta["labels"], tensors, "", meta["version"])

    @classmethod
    def from_tensors(cls, labels: list[str], tensors: dict, prefix: str,
                     version: int = 0) -> Gallery:
        return cls(list(labels), tensors[prefix + "emb"].float(),
                   tensors[prefix + "owner"].long(), tensors[prefix + "counts"].long(), version)

    def enroll(self, identity: str, emb: torch.Tensor) -> None:
        """Add embeddings (N, D) to ``identity``, creating it if new."""
        if identity not in self.labels:
            self.labels.append(identity)
            self.counts = torch.cat([self.counts, torch.zeros(1, dtype=torch.long)])
        i = self.labels.index(identity)
        self.emb = torch.cat([self.emb, emb.float()])
        self.owner = torch.cat([self.owner, torch.full((emb.shape[0],), i, dtype=torch.long)])
        self.counts[i] += emb.shape[0]
        self.version += 1

    def remove(self, identity: str) -> None:
        i = self.labels.index(identity)
        keep = self.owner != i
        self.labels.pop(i)
        self.emb, self.owner = self.emb[keep], self.owner[keep]
        self.owner = self.owner - (self.owner > i).long()
        self.counts = torch.cat([self.counts[:i], self.counts[i + 1:]])
        self.version += 1


def gallery_from_training(model_meta_path: Path) -> Gallery:
    tensors, meta = ckpt.load(model_meta_path)
    return Gallery.from_tensors(meta["labels"], tensors, "gallery.")


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
    if pre.get("descriptor") != "embedding":
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
        self.threshold = float(meta["open_set"]["threshold"])
        self.verify_threshold = float(meta["open_set"].get("verify_threshold", self.threshold))
        self.net = build_model(meta["architecture"], meta["num_classes"], self.image_size)
        self.net.load_state_dict({k[6:]: v for k, v in tensors.items()
                                  if k.startswith("model.")})
        self.net.to(self.device).eval()
        self._embedder = _compiled_embedding(self.net, self.image_size, self.device)
        self._lock = threading.Lock()
        self.gallery = self._load_gallery()

    def _load_gallery(self) -> Gallery:
        if (self.folder / "gallery.json").exists():
            return Gallery.load(self.folder)
        return gallery_from_training(self.folder / "model.json")

    def refresh_gallery(self) -> None:
        self.gallery = self._load_gallery()

    def embed(self, crops: np.ndarray) -> torch.Tensor:
        """(N, S, S, 3) uint8 stored-format crops → (N, D) normalised embeddings."""
        with self._lock, torch.inference_mode():
            return embed(self._embedder, crops, self.image_size, self.device,
                         normalisation=self.normalisation)

    def embed_and_score(self, crops: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(embeddings, identity scores against the gallery, the gallery's identities then)."""
        emb = self.embed(crops)
        g = self.gallery
        return emb, g.scores(emb), list(g.labels)

    def match(self, emb: torch.Tensor, top_k: int = 5, threshold: float | None = None):
        """Per embedding: (identity or None, confidence, [(identity, confidence)...])."""
        g = self.gallery
        return self.match_scores(g.scores(emb), list(g.labels), top_k, threshold)

    def match_scores(self, sims: torch.Tensor, labels: list[str], top_k: int = 5,
                     threshold: float | None = None):
        """:meth:`match` from identity scores (M, C) already computed against ``labels``.

        A candidate's confidence is its identity score; the face's is the best identity's, which
        the threshold applies to. Both are clamped to 0-1.
        """
        thr = self.threshold if threshold is None else threshold
        if not labels:
            return [(None, 0.0, []) for _ in range(sims.shape[0])]
        k = min(top_k, sims.shape[1])  # identities without images score -2
        vals, idx = sims.topk(k, dim=1)
        out = []
        for v, i in zip(vals.tolist(), idx.tolist()):
            cands = [(labels[j], _clamp(s)) for s, j in zip(v, i) if s > -1.5]
            if not cands:
                out.append((None, 0.0, []))
                continue
            out.append((cands[0][0] if v[0] >= thr else None, cands[0][1], cands))
        return out

    def verify_scores(self, emb: torch.Tensor, sims: torch.Tensor, labels: list[str],
                      threshold: float | None = None, compare: str = "auto") -> dict:
        """Do two faces show the same person? ``emb`` (2, D) and their identity scores ``sims``
        (2, C) against ``labels``, as :meth:`LoadedModel.embed_and_score` gives them.

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
