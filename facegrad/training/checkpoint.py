"""Resume checkpoints of a training run: the optimizer's state as flat tensors + JSON.

The file format (safetensors + JSON, atomic, checksummed) is :mod:`facegrad.data.checkpoint`;
its names are re-exported here for the training code and its tests.
"""

from __future__ import annotations

import torch

from facegrad.data.checkpoint import FORMAT, CheckpointError, load, save

__all__ = ["FORMAT", "CheckpointError", "load", "optimizer_from_flat", "optimizer_to_flat",
           "save", "training_state_from_flat", "training_state_to_flat"]


# --- optimizer state as flat tensors + JSON --------------------------------------------

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


# --- a training run's state: the network, its optimizer and its clipping rule ------------------

def training_state_to_flat(model: torch.nn.Module, opt: torch.optim.Optimizer, clipper
                           ) -> tuple[dict[str, torch.Tensor], dict]:
    """What a resume checkpoint holds of a run: tensors ``model.*``, ``optim.*`` and ``clip.*``,
    and the JSON-able rest under ``optimizer`` and ``clipper``."""
    opt_tensors, opt_meta = optimizer_to_flat(opt)
    clip_state = clipper.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= opt_tensors
    tensors |= {f"clip.{k}": v for k, v in clip_state.items() if torch.is_tensor(v)}
    return tensors, {"optimizer": opt_meta,
                     "clipper": {k: v for k, v in clip_state.items() if not torch.is_tensor(v)}}


def training_state_from_flat(model: torch.nn.Module, opt: torch.optim.Optimizer, clipper,
                             tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load what :func:`training_state_to_flat` wrote back into the run's parts."""
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer_from_flat(opt, tensors, meta["optimizer"])
    clipper.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("clip.")}
                            | meta.get("clipper", {}))
