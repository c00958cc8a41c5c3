"""Identification with a trained model: embeddings matched against a gallery of enrolled images.

A model folder holds ``model.safetensors/.json`` (weights, fixed once trained) and
``gallery.safetensors/.json`` (the normalised embedding of every enrolled image and who it
belongs to), which enrollment rewrites atomically. A face scores each identity by its best
similarity to one of that identity's images (see :mod:`facegrad.gallery`). A loaded model is
cached by the caller and reloads its gallery when it changes.
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
from facegrad.gallery import cluster_tightness, decide, embed, identity_scores
from facegrad.models import build_model
from facegrad.within_class import WithinClassNorm

log = logging.getLogger("facegrad.inference")


@dataclass
class Gallery:
    labels: list[str]
    emb: torch.Tensor  # (N, D) normalised embeddings of the enrolled images
    owner: torch.Tensor  # (N,) index into labels of each image's identity
    counts: torch.Tensor  # (C,) images enrolled per identity
    version: int = 0
    adjustment: dict | None = None  # the model's open_set.score_adjustment, None for none
    _tightness: tuple[int, torch.Tensor] | None = None  # (version, per-identity tightness)

    def tightness(self) -> torch.Tensor | None:
        """Per-identity cluster tightness for the score adjustment, cached per gallery version."""
        if not self.adjustment:
            return None
        cached = self._tightness
        if cached is None or cached[0] != self.version:
            t = cluster_tightness(self.emb, self.owner, len(self.labels),
                                  self.adjustment["reference"])
            cached = self._tightness = (self.version, t)
        return cached[1]

    def scores(self, emb: torch.Tensor) -> torch.Tensor:
        """(M, C) per probe and identity: the best cosine similarity to one of its images,
        adjusted for the identity's cluster tightness where the model calibrated with it."""
        adj = self.adjustment or {}
        return identity_scores(emb, self.emb, self.owner, len(self.labels), self.tightness(),
                               adj.get("reference", 0.0), adj.get("weight"))

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


class _TracedDescriptor(torch.nn.Module):
    """The model's ``descriptor_map`` as one TorchScript graph, for :func:`describe`.

    An eager forward pass is a few dozen Python module calls, each taking Python's global
    interpreter lock back between kernels; in the API, with the event loop and request threads
    wanting the lock too, every hand-over can wait a switch interval (5 ms), and a batch of 16
    faces took 190 ms instead of 110. A frozen traced graph runs in C++ with the lock released
    from start to end (and folds batch norm into the convolutions).
    """

    def __init__(self, traced: torch.jit.ScriptModule):
        super().__init__()
        self.traced = traced

    def descriptor_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.traced(x)


class _DescriptorMap(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.descriptor_map(x)


def _compiled_descriptor(net: torch.nn.Module, image_size: int,
                         device: torch.device) -> torch.nn.Module:
    """A traced, frozen ``descriptor_map`` (checked against the eager one), else ``net``."""
    example = torch.randn(2, 3, image_size, image_size, device=device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.freeze(torch.jit.trace(_DescriptorMap(net).eval(), example))
            ok = torch.allclose(traced(example), net.descriptor_map(example), atol=1e-3,
                                rtol=1e-3)
    except Exception as e:  # tracing is an optimisation: never fail a model load on it
        log.warning("descriptor not traced (%s: %s); using the eager model", type(e).__name__, e)
        return net
    if not ok:
        log.warning("traced descriptor differs from the eager one; using the eager model")
        return net
    return _TracedDescriptor(traced)


class LoadedModel:
    """A model ready to embed and match; thread-safe for concurrent identify calls."""

    def __init__(self, folder: Path, device: str = "cpu"):
        tensors, meta = ckpt.load(folder / "model.json", device)
        self.folder, self.meta, self.device = folder, meta, torch.device(device)
        self.image_size = meta["preprocessing"]["image_size"]
        self.threshold = float(meta["open_set"]["threshold"])
        self.verify_threshold = float(meta["open_set"].get("verify_threshold", self.threshold))
        self.flip_tta = bool(meta["preprocessing"].get("flip_tta", False))
        # models from before scale test-time augmentation describe the crop as it is
        self.scales = tuple(float(s) for s in meta["preprocessing"].get("scale_tta", [1.0]))
        self.normalisation = meta["preprocessing"].get("normalisation", "per_image_standardise")
        # models from before descriptors compare their training embedding
        self.descriptor = meta["preprocessing"].get("descriptor", "embedding")
        self.lbp_share = float(meta["preprocessing"].get("lbp_share", 0.0))
        self.adjustment = meta["open_set"].get("score_adjustment")
        # models from before within-class normalisation have none
        self.within_class = WithinClassNorm.from_tensors(
            tensors, meta["preprocessing"].get("within_class") or {})
        # models from before the mid-stage descriptor describe faces by the last stage alone
        self.net = build_model(meta["architecture"], meta["num_classes"], self.image_size,
                               float(meta["preprocessing"].get("mid_stage_share", 0.0)))
        self.net.load_state_dict({k[6:]: v for k, v in tensors.items()
                                  if k.startswith("model.")})
        self.net.to(self.device).eval()
        self._describer = self.net
        if self.descriptor != "embedding":
            self._describer = _compiled_descriptor(self.net, self.image_size, self.device)
        self._lock = threading.Lock()
        self.gallery = self._load_gallery()

    def _load_gallery(self) -> Gallery:
        if (self.folder / "gallery.json").exists():
            g = Gallery.load(self.folder)
        else:
            g = gallery_from_training(self.folder / "model.json")
        g.adjustment = self.adjustment
        return g

    def refresh_gallery(self) -> None:
        self.gallery = self._load_gallery()

    def embed(self, crops: np.ndarray) -> torch.Tensor:
        """(N, S, S, 3) uint8 stored-format crops → (N, D) normalised embeddings."""
        with self._lock, torch.inference_mode():
            return embed(self._describer, crops, self.image_size, self.device,
                         flip_tta=self.flip_tta, descriptor=self.descriptor,
                         lbp_share=self.lbp_share, within_class=self.within_class,
                         scales=self.scales, normalisation=self.normalisation)

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

        A candidate's confidence is its identity score; the face's is the decision score
        (:func:`facegrad.gallery.decide`: the best identity's score, lowered where the
        runner-up fits nearly as well), which the threshold applies to. Both are clamped to
        0-1.
        """
        thr = self.threshold if threshold is None else threshold
        if not labels:
            return [(None, 0.0, []) for _ in range(sims.shape[0])]
        k = min(top_k, sims.shape[1])  # identities without images score -2
        vals, idx = sims.topk(k, dim=1)
        _, decision = decide(sims, self.adjustment)
        out = []
        for v, i, d in zip(vals.tolist(), idx.tolist(), decision.tolist()):
            cands = [(labels[j], _clamp(s)) for s, j in zip(v, i) if s > -1.5]
            if not cands:
                out.append((None, 0.0, []))
                continue
            out.append((cands[0][0] if d >= thr else None, _clamp(d), cands))
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
