"""Checkpoint files: a safetensors file of tensors beside a JSON file of everything else.

Used for training's resume checkpoints, model artifacts and galleries alike (the layers above
import it from here).

Both are written atomically (temp file, fsync, rename; the JSON last, so a JSON file always names a
complete tensor file) and the JSON records the tensor file's sha256, so a truncated or altered
checkpoint is refused at load with a clear error. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "facegrad-checkpoint/1"


class CheckpointError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` into a temp file beside ``path``, fsync it, rename it onto ``path`` and
    fsync the folder: readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save(stem: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``stem.safetensors`` and ``stem.json``; returns the JSON path."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(".safetensors")
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(weights, lambda p: save_file(clean, str(p)))
    doc = dict(meta, format=FORMAT, weights=weights.name, sha256=sha256_file(weights))
    meta_path = stem.with_suffix(".json")
    atomic_write(meta_path, lambda p: p.write_text(json.dumps(doc, indent=1, default=float)))
    return meta_path


def load(meta_path: Path, device: str | torch.device = "cpu"):
    """(tensors, meta) of a checkpoint, after checking format and checksum."""
    meta_path = Path(meta_path)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata {meta_path.name} is unreadable: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path.name} is not a {FORMAT} checkpoint")
    weights = meta_path.with_name(meta["weights"])
    if weights.parent != meta_path.parent or not weights.is_file():
        raise CheckpointError(f"checkpoint weights {meta['weights']} are missing")
    if sha256_file(weights) != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint weights {weights.name} do not match their recorded sha256 "
            "(truncated or modified); refusing to load them"
        )
    try:
        tensors = load_file(str(weights), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint weights {weights.name} are corrupt: {e}") from e
    return tensors, meta


def remove(stem: Path) -> None:
    """Delete the checkpoint at ``stem``: its JSON first, so that no JSON is left naming a
    tensor file that is gone (the reverse of :func:`save`'s order)."""
    for suffix in (".json", ".safetensors"):
        stem.with_suffix(suffix).unlink(missing_ok=True)
