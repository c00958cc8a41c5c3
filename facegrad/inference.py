"""Identification with a trained model: embeddings matched against a gallery of prototypes.

A model folder holds ``model.safetensors/.json`` (weights, fixed once trained) and
``gallery.safetensors/.json`` (per-identity embedding sums and counts), which enrollment rewrites
atomically. A loaded model is cached by the caller and reloads its gallery when it changes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facegrad import checkpoint as ckpt
from facegrad.gallery import embed
from facegrad.models import build_model


@dataclass
class Gallery:
    labels: list[str]
    sums: torch.Tensor  # (C, D) sums of normalised embeddings
    counts: torch.Tensor  # (C,)
    version: int = 0

    @property
    def prototypes(self) -> torch.Tensor:
        return F.normalize(self.sums, dim=1)

    def save(self, folder: Path) -> None:
        ckpt.save(folder / "gallery", {"sums": self.sums, "counts": self.counts},
                  {"kind": "gallery", "labels": self.labels, "version": self.version})

    @classmethod
    def load(cls, folder: Path) -> Gallery:
        tensors, meta = ckpt.load(folder / "gallery.json")
        return cls(meta["labels"], tensors["sums"].float(), tensors["counts"], meta["version"])

    def enroll(self, identity: str, emb: torch.Tensor) -> None:
        """Add embeddings (N, D) to ``identity``, creating it if new."""
        if identity in self.labels:
            i = self.labels.index(identity)
            self.sums[i] += emb.sum(0)
            self.counts[i] += emb.shape[0]
        else:
            self.labels.append(identity)
            self.sums = torch.cat([self.sums, emb.sum(0, keepdim=True)])
            self.counts = torch.cat([self.counts, torch.tensor([emb.shape[0]])])
        self.version += 1

    def remove(self, identity: str) -> None:
        i = self.labels.index(identity)
        keep = [j for j in range(len(self.labels)) if j != i]
        self.labels.pop(i)
        self.sums, self.counts = self.sums[keep], self.counts[keep]
        self.version += 1


def gallery_from_training(model_meta_path: Path) -> Gallery:
    tensors, meta = ckpt.load(model_meta_path)
    return Gallery(list(meta["labels"]), tensors["gallery.sums"].float(),
                   tensors["gallery.counts"].long())


class LoadedModel:
    """A model ready to embed and match; thread-safe for concurrent identify calls."""

    def __init__(self, folder: Path, device: str = "cpu"):
        tensors, meta = ckpt.load(folder / "model.json", device)
        self.folder, self.meta, self.device = folder, meta, torch.device(device)
        self.image_size = meta["preprocessing"]["image_size"]
        self.threshold = float(meta["open_set"]["threshold"])
        self.net = build_model(meta["architecture"], meta["num_classes"], self.image_size)
        self.net.load_state_dict({k[6:]: v for k, v in tensors.items()
                                  if k.startswith("model.")})
        self.net.to(self.device).eval()
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
            return embed(self.net, crops, self.image_size, self.device)

    def match(self, emb: torch.Tensor, top_k: int = 5, threshold: float | None = None):
        """Per embedding: (identity or None, confidence, [(identity, confidence)...])."""
        g = self.gallery
        thr = self.threshold if threshold is None else threshold
        if not g.labels:
            return [(None, 0.0, []) for _ in range(emb.shape[0])]
        sims = (emb @ g.prototypes.t()).clamp(-1, 1)
        k = min(top_k, sims.shape[1])
        vals, idx = sims.topk(k, dim=1)
        out = []
        for v, i in zip(vals.tolist(), idx.tolist()):
            cands = [(g.labels[j], round(max(0.0, s), 4)) for s, j in zip(v, i)]
            best = cands[0] if cands else (None, 0.0)
            out.append((best[0] if v[0] >= thr else None, best[1], cands))
        return out
