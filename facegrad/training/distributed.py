"""One training job over several devices: DistributedDataParallel (Li et al. 2020, "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training"), one process per device.

The process that runs the job (the Celery worker) is rank 0: it starts ranks 1..W-1 as child
processes (``python -m facegrad.training.distributed_rank SPEC RANK``), joins them in a process
group (NCCL on GPUs, gloo on the CPU) and alone reports progress, writes checkpoints and goes on
to the model.
The other ranks train their share of every batch and exit. Every rank walks the same global batches
(same seed, same augmentation draws) and takes its slice; DDP averages the gradients in backward, so
the clipping that follows sees the whole batch's gradient of the whole model, as on one device. A
rank that dies breaks the group's next collective on the others (gloo: at once; NCCL: within the
group's timeout); rank 0 then raises :class:`RankFailed` and the job is retried.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("facegrad.training.distributed")

# how long a rank waits for the others at start-up and in any one collective
TIMEOUT = timedelta(seconds=float(os.environ.get("FACEGRAD_DISTRIBUTED_TIMEOUT_S", 300)))


class DevicesError(ValueError):
    """The job asked for more devices than this worker has."""


class RankFailed(RuntimeError):
    """Another rank of the job's process group died or failed: this attempt cannot go on."""


@dataclass(frozen=True)
class Rank:
    """Which share of the job this process trains: ``rank`` of ``world`` on ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    @property
    def lead(self) -> bool:
        """Rank 0: the one that reports, checkpoints and writes the model."""
        return self.rank == 0


def world_size(devices: int | None, device: torch.device) -> int:
    """Processes for one job: ``devices``, or every GPU of the worker on CUDA, else 1."""
    if device.type == "cuda":
        have = torch.cuda.device_count()
        if devices is not None and devices > have:
            raise DevicesError(f"the job asks for devices={devices} but this worker has {have} "
                               "GPU(s); ask for fewer or leave devices unset (all of them)")
        return devices or have
    return devices or 1


def rank_device(device: torch.device, rank: int) -> torch.device:
    """GPU ``rank`` of this machine on CUDA (one process per GPU), else the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return device


def all_reduce(t: torch.Tensor, rank: Rank, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce ``t`` in place over the group (nothing on one process); returns it."""
    if rank.world > 1:
        try:
            dist.all_reduce(t, op=op)
        except RuntimeError as e:
            raise RankFailed(f"a collective failed ({e}); another rank probably died") from e
    return t


def any_rank(flag: bool, rank: Rank) -> bool:
    """True on every rank when ``flag`` is true on any (a stop asked of rank 0, say)."""
    if rank.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=rank.device)
    return bool(all_reduce(t, rank, dist.ReduceOp.MAX).item() > 0)


# The DistributedDataParallel wrappers of the group this process leads now, and of groups that
# failed. Dropping the last reference to a wrapper destroys its reducer and so the process group
# (gloo), whose destructor joins its worker threads while holding the GIL; after a peer died, a
# worker thread may still be finishing a work item whose teardown needs the GIL, and the two
# wait for each other for ever (seen: a worker hung in ~ProcessGroupGloo after a killed rank).
# So a failed group's wrappers are kept for the life of the process: a few idle threads and the
# model's gradient buckets, instead of a hung worker.
_LIVE: list[torch.nn.Module] = []
_ABANDONED: list[torch.nn.Module] = []


def wrap(module: torch.nn.Module, rank: Rank) -> torch.nn.Module:
    """``module`` in DistributedDataParallel (its parameters broadcast from rank 0 now, its
    gradients averaged over the group in every backward); as it is on one process."""
    if rank.world == 1:
        return module
    ids = [rank.device.index] if rank.device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    _LIVE.append(ddp)
    return ddp


def leave_group() -> None:
    """A child rank that trained to the end: drop its wrappers and destroy the group."""
    _LIVE.clear()
    dist.destroy_process_group()


def _release(failed: bool) -> None:
    """Let the group's wrappers go (it ended) or keep them for good (it failed: see _LIVE)."""
    if failed:
        _ABANDONED.extend(_LIVE)
    _LIVE.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, device: torch.device, port: int) -> None:
    """Join the job's process group on 127.0.0.1:``port`` as ``rank`` of ``world``."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    if device.type == "cpu":  # the ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


@contextmanager
def group(world: int, device: torch.device, spec: dict, run_dir: Path) -> Iterator[Rank]:
    """Start ranks 1..world-1 for ``spec`` (what :mod:`facegrad.training.distributed_rank` needs
    to train: config, dataset folder, run folder, resume checkpoint, pretrained folder) and join
    them as rank 0.

    On leaving, the group is destroyed and the children are waited for (killed if they linger);
    a failure of this rank while a child had failed is raised as :class:`RankFailed`, naming the
    child and the end of its error output.
    """
    port = _free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "distributed.json"
    spec_path.write_text(json.dumps(spec | {"world": world, "port": port}))
    children: list[tuple[subprocess.Popen, Path]] = []
    threads = torch.get_num_threads()
    failed = True
    try:
        for r in range(1, world):
            err = Path(tempfile.mkstemp(prefix=f"rank{r}-", suffix=".log", dir=run_dir)[1])
            with open(err, "wb") as f:
                children.append((subprocess.Popen(
                    [sys.executable, "-m", "facegrad.training.distributed_rank", str(spec_path),
                     str(r)],
                    stdout=subprocess.DEVNULL, stderr=f, preexec_fn=_die_with_parent), err))
        try:
            join_group(0, world, device, port)
        except Exception as e:
            raise RankFailed(f"the job's {world} processes did not meet: {e}"
                             + _children_report(children)) from e
        log.info("training on %d processes (%s)", world, dist.get_backend())
        yield Rank(0, world, rank_device(device, 0))
        failed = False
    except (RankFailed, RuntimeError) as e:
        report = _children_report(children, wait=5.0)
        if isinstance(e, RankFailed):
            if report and report not in str(e):
                raise RankFailed(f"{e}{report}") from e
            raise
        if report:
            raise RankFailed(f"another rank of the job failed: {e}{report}") from e
        raise
    finally:
        _release(failed)
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
        for proc, _ in children:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for _, err in children:
            err.unlink(missing_ok=True)
        spec_path.unlink(missing_ok=True)


def _children_report(children, wait: float = 0.0) -> str:
    """'; rank 1 exited with 3: <its last error line>' for each child that failed."""
    out = []
    for r, (proc, err) in enumerate(children, start=1):
        try:
            code = proc.wait(timeout=wait) if wait else proc.poll()
        except subprocess.TimeoutExpired:
            code = None
        if code not in (None, 0):
            lines = [ln for ln in err.read_text(errors="replace").splitlines() if ln.strip()]
            why = (": " + lines[-1][-300:]) if lines else ""
            name = signal.Signals(-code).name if code < 0 else f"code {code}"
            out.append(f"rank {r} exited ({name}){why}")
    return ("; " + "; ".join(out)) if out else ""


def _die_with_parent() -> None:
    """A child rank is killed when the worker that started it dies (Linux PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
