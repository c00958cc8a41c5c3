"""A child rank of a multi-device job, started by :func:`facegrad.training.distributed.group`
as ``python -m facegrad.training.distributed_rank SPEC RANK``: it joins the group, trains its
share through :func:`facegrad.training.loop.train_rank` and exits.

Apart from :mod:`facegrad.training.distributed` because it runs the loop, which itself uses the
group helpers there: one module importing the other, not each other.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

from facegrad.data.store import FaceArrays
from facegrad.training import distributed
from facegrad.training.config import TrainConfig
from facegrad.training.loop import Cancelled, TrainingError, train_rank


def main(argv: list[str]) -> int:
    """A child rank: ``python -m facegrad.training.distributed_rank SPEC RANK``."""
    spec = json.loads(Path(argv[0]).read_text())
    r = int(argv[1])
    cfg = TrainConfig.model_validate(spec["config"])
    device = torch.device(spec["device"])
    distributed.join_group(r, spec["world"], device, spec["port"])
    rank = distributed.Rank(r, spec["world"], distributed.rank_device(device, r))
    try:
        data = FaceArrays.load(Path(spec["dataset_dir"]))
        resume = Path(spec["resume"]) if spec.get("resume") else None
        pretrained = Path(spec["pretrained_dir"]) if spec.get("pretrained_dir") else None
        train_rank(cfg, data, Path(spec["run_dir"]), None, resume, pretrained, rank)
    except (Cancelled, TrainingError):
        pass  # rank 0 saw the same and reports it
    except BaseException:
        # the group broke (a peer died): say why, then leave without tearing it down, which
        # can hang (see distributed._LIVE)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    distributed.leave_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
