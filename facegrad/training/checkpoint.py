"""Checkpoints: a safetensors file of tensors beside a JSON file of everything else.

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
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
    _atomic_write(weights, lambda p: save_file(clean, str(p)))
    doc = dict(meta, format=FORMAT, weights=weights.name, sha256=_sha256(weights))
    meta_path = stem.with_suffix(".json")
    _atomic_write(meta_path, lambda p: p.write_text(json.dumps(doc, indent=1, default=float)))
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
    if _sha256(weights) != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint weights {weights.name} do not match their recorded sha256 "
            "(truncated or modified); refusing to load them"
        )
    try:
        tensors = load_file(str(weights), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint weights {weights.name} are corrupt: {e}") from e
    return tensors, meta


# --- optimizer and RNG state as flat tensors + JSON --------------------------------------------

def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able scalars."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
