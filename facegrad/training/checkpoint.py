"""Resume checkpoints of a training run: the optimizer's state as flat tensors + JSON.

The file format (safetensors + JSON, atomic, checksummed) is :mod:`facegrad.data.checkpoint`;
its names are re-exported here for the training code and its tests.
"""

from __future__ import annotations

import torch

from facegrad.data.checkpoint import FORMAT, CheckpointError, load, save

__all__ = ["FORMAT", "CheckpointError", "load", "optimizer_from_flat", "optimizer_to_flat",
           "save"]


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
