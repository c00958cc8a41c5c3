"""Sweeps: one job per combination of a grid of settings, and a leaderboard comparing them.

Plain functions over dicts (no HTTP, no Celery, no database), used by ``app/routes/sweeps.py``.

- :func:`expand` turns a base job body and a grid into one job body per combination;
- :func:`setting_of` is the grid values of one job (without its seed: the runs of one setting
  differ by seed only);
- :func:`leaderboard` aggregates the runs of each setting (mean, sample sd) and ranks them by a
  metric from :data:`METRICS`;
- :func:`to_csv` writes a leaderboard as CSV;
- :func:`sweep_status` derives a sweep's status from its jobs' statuses.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from facegrad.clipping.modes import CLIP_MODES
from facegrad.training.config import OptimizerConfig, TrainConfig

TERMINAL = ("succeeded", "failed", "cancelled")
DEFAULT_METRIC = "val_acc"

# name -> (description, direction: "max" = higher is better, "min" = lower is better)
METRICS: dict[str, tuple[str, str]] = {
    "val_acc": ("final validation accuracy (closed set, the last epoch's)", "max"),
    "best_val_loss": ("lowest validation loss over the epochs", "min"),
    "final_val_loss": ("the last epoch's validation loss", "min"),
    "epochs_to_90pct": ("first epoch whose validation accuracy reaches 90 % of the run's best "
                        "(speed of convergence)", "min"),
    "known_named": ("open set: share of held-out images of known people named correctly",
                    "max"),
    "strangers_rejected": ("open set: share of strangers' images rejected as unknown", "max"),
    "tpir_at_fpir_0.05": ("open set: known people named correctly when 5 % of strangers are "
                          "accepted", "max"),
    "skipped_steps": ("optimizer steps skipped for a non-finite gradient", "min"),
    "clip_fraction": ("share of steps whose gradient was clipped", "min"),
    "grad_norm_pre": ("mean gradient norm before clipping, over the run", "min"),
    "grad_norm_post": ("mean gradient norm after clipping, over the run", "min"),
    "wall_seconds": ("the job's run time, finished_at - started_at", "min"),
    "epsilon": ("privacy: the epsilon the run spent (jobs with privacy; lower protects more)",
                "min"),
}



class SweepError(ValueError):
    """A sweep that cannot be created; ``status`` is the HTTP status to answer with."""

    status = 422


# --- expanding a grid ------------------------------------------------------------------------

def _reason(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def expand(base: dict, grid: dict[str, list], max_jobs: int,
           schema: type[BaseModel] | None = None) -> list[dict]:
    """One job body per combination of ``grid`` (itertools.product over its keys in the order
    given): ``base`` with that combination's values set. An empty grid gives one job, the base.

    Every combination is validated with ``schema`` (default :class:`TrainConfig`, checked on the
    body without ``dataset_id``; the API passes its ``JobCreate``, which checks the whole body).
    Raises :class:`SweepError` for a grid that is not a dict of non-empty lists, a grid key
    ``dataset_id``, more than ``max_jobs`` combinations (checked before any validation), or the
    first invalid combination (its values and pydantic's reason).
    """
    if not isinstance(base, dict):
        raise SweepError("base must be a JSON object: a job body")
    if not isinstance(grid, dict):
        raise SweepError("grid must be a JSON object: job field -> list of values")
    for key, values in grid.items():
        if key == "dataset_id":
            raise SweepError("dataset_id cannot be a grid key: a sweep trains on one dataset, "
                             "set it in base")
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid key '{key}' must be a non-empty list of values")
    keys = list(grid)
    count = math.prod(len(grid[k]) for k in keys)
    if count > max_jobs:
        raise SweepError(f"the grid expands to {count} jobs; at most {max_jobs} per sweep "
                         "(FACEGRAD_MAX_SWEEP_JOBS)")
    schema = schema or TrainConfig
    bodies = []
    for values in itertools.product(*(grid[k] for k in keys)):
        combo = dict(zip(keys, values))
        body = {**base, **combo}
        check = body
        if schema is TrainConfig:
            check = {k: v for k, v in body.items() if k != "dataset_id"}
        try:
            schema.model_validate(check)
        except ValidationError as e:
            what = f"grid combination {combo}" if combo else "base"
            raise SweepError(f"{what}: {_reason(e)}") from None
        bodies.append(body)
    return bodies


def setting_of(config: dict, grid_keys: Iterable[str]) -> dict:
    """The grid values of a job's config, without ``seed``."""
    return {k: config.get(k) for k in grid_keys if k != "seed"}


# --- compact text for a setting --------------------------------------------------------------

def _num(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if v is None:
        return "null"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _fields(value: dict, model: type[BaseModel] | None, skip: tuple[str, ...] = (),
            keep: tuple[str, ...] = ()) -> list[str]:
    out = []
    for k, v in value.items():
        if k in skip:
            continue
        field = model.model_fields.get(k) if model else None
        if (k not in keep and field is not None and not field.is_required()
                and field.default == v):
            continue  # left at its default
        out.append(f"{k}={_num(v)}")
    return out


def format_value(key: str, value: Any) -> str:
    """A setting's value as compact text, for CSV cells and labels.

    ``clip``: ``mode`` then ``:``, the mode's main knob (max_norm, alpha, clip_value,
    clip_factor, percentile) and its other fields that differ from their defaults, e.g.
    ``norm:max_norm=5,scope=per_tensor``, ``threshold:alpha=0.9``, ``none``. ``optimizer``: the
    fields that differ from their defaults, e.g. ``name=sgd,momentum=0``. Other objects:
    ``k=v,...``; numbers as ``%g``; anything else as compact JSON.
    """
    if key == "clip" and isinstance(value, dict) and "mode" in value:
        mode = value["mode"]
        # the mode's main knob is always written, even at its default (registry: CLIP_MODES)
        entry = CLIP_MODES.get(mode)
        keep = (entry.knob,) if entry and entry.knob else ()
        rest = _fields(value, entry.config if entry else None, skip=("mode",), keep=keep)
        return str(value["mode"]) + (":" + ",".join(rest) if rest else "")
    if key == "optimizer" and isinstance(value, dict):
        return ",".join(_fields(value, OptimizerConfig)) or "default"
    if isinstance(value, dict):
        return ",".join(f"{k}={_num(v)}" for k, v in value.items())
    return _num(value)


def label_of(setting: dict) -> str:
    """``key=value`` pairs of a setting, ``; `` between them ("base" for an empty setting)."""
    return "; ".join(f"{k}={format_value(k, v)}" for k, v in setting.items()) or "base"


# --- per-run metrics -------------------------------------------------------------------------

def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _time(v: Any) -> datetime | None:
    if isinstance(v, datetime):
        return v
    if isinstance(v, str):
        try:
            return datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def run_metrics(job: dict) -> dict[str, float | None]:
    """Every metric of :data:`METRICS` for one job (None where the job lacks it)."""
    metrics = job.get("metrics") or {}
    open_set = metrics.get("open_set") or {}
    clipping = job.get("clipping") or {}
    history = job.get("history") or []
    val_losses = [x for x in (_finite(h.get("val_loss")) for h in history) if x is not None]
    accs = [(h.get("epoch"), _finite(h.get("val_acc"))) for h in history]
    accs = [(e, a) for e, a in accs if a is not None and e is not None]
    to_90 = None
    if accs:
        best = max(a for _, a in accs)
        if best > 0:
            to_90 = float(min(e for e, a in accs if a >= 0.9 * best))
    final_loss = _finite(metrics.get("val_loss"))
    start, end = _time(job.get("started_at")), _time(job.get("finished_at"))
    wall = None
    if start and end:
        if (start.tzinfo is None) != (end.tzinfo is None):
            start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
        wall = (end - start).total_seconds()
    return {
        "val_acc": _finite(metrics.get("val_acc")),
        "best_val_loss": min(val_losses) if val_losses else final_loss,
        "final_val_loss": final_loss,
        "epochs_to_90pct": to_90,
        "known_named": _finite(open_set.get("known_named")),
        "strangers_rejected": _finite(open_set.get("strangers_rejected")),
        "tpir_at_fpir_0.05": _finite(open_set.get("tpir_at_fpir_0.05")),
        "skipped_steps": _finite(clipping.get("skipped_steps")),
        "clip_fraction": _finite(clipping.get("clip_fraction")),
        "grad_norm_pre": _finite((clipping.get("grad_norm_pre") or {}).get("mean")),
        "grad_norm_post": _finite((clipping.get("grad_norm_post") or {}).get("mean")),
        "wall_seconds": wall,
        "epsilon": _finite(metrics.get("epsilon")),
    }


def _stat(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


# --- the leaderboard -------------------------------------------------------------------------

def leaderboard(jobs: list[dict], grid_keys: Sequence[str], metric: str = DEFAULT_METRIC) -> dict:
    """Rows aggregated per setting over its runs, best first by ``metric``'s mean.

    Each job dict holds a job's row (status, config, metrics, clipping, started_at, finished_at)
    and its per-epoch ``history``. Only succeeded jobs contribute metrics; failed ones (a run
    that diverged fails) count in ``failed``; queued, running and cancelled ones only in
    ``runs``. Rows whose metric has no value come last; ties keep the grid's order.
    """
    if metric not in METRICS:
        raise SweepError(f"unknown metric '{metric}'; known metrics: {', '.join(METRICS)}")
    direction = METRICS[metric][1]
    rows: dict[str, dict] = {}
    values: dict[str, dict[str, list[float]]] = {}
    for job in jobs:
        setting = setting_of(job.get("config") or {}, grid_keys)
        key = json.dumps(setting, sort_keys=True, default=str)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {"setting": setting, "label": label_of(setting), "runs": 0,
                               "succeeded": 0, "failed": 0, "job_ids": []}
            values[key] = {m: [] for m in METRICS}
        row["runs"] += 1
        if job.get("id") is not None:
            row["job_ids"].append(job["id"])
        status = job.get("status")
        if status == "failed":
            row["failed"] += 1
        elif status == "succeeded":
            row["succeeded"] += 1
            for m, v in run_metrics(job).items():
                if v is not None:
                    values[key][m].append(v)
    out = []
    for key, row in rows.items():
        row["metrics"] = {m: _stat(values[key][m]) for m in METRICS}
        out.append(row)
    sign = -1.0 if direction == "max" else 1.0

    def rank(row: dict) -> tuple:
        mean = row["metrics"][metric]["mean"]
        return (1, 0.0) if mean is None else (0, sign * mean)

    out.sort(key=rank)  # stable: equal rows keep the grid's order
    return {"metric": metric, "direction": direction, "rows": out}


def to_csv(board: dict) -> str:
    """Header, then one line per leaderboard row: a column per setting key (values as
    :func:`format_value` writes them), runs, succeeded, failed, then ``<metric>_mean`` and
    ``<metric>_sd`` for every metric of :data:`METRICS` (empty where there is no value)."""
    keys: list[str] = []
    for row in board["rows"]:
        keys += [k for k in row["setting"] if k not in keys]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*keys, "runs", "succeeded", "failed",
                *(f"{m}_{s}" for m in METRICS for s in ("mean", "sd"))])
    for row in board["rows"]:
        stats = row["metrics"]
        cells = [format_value(k, row["setting"][k]) if k in row["setting"] else ""
                 for k in keys]
        cells += [row["runs"], row["succeeded"], row["failed"]]
        for m in METRICS:
            for s in ("mean", "sd"):
                v = stats.get(m, {}).get(s)
                cells.append("" if v is None else f"{v:.6g}")
        w.writerow(cells)
    return buf.getvalue()


def sweep_status(job_statuses: Iterable[str], cancel_requested: bool) -> str:
    """queued (every job queued), running (any job not ended yet), then once all have ended:
    succeeded (all succeeded), cancelled (a cancel was requested), failed (none succeeded),
    partial (some succeeded)."""
    statuses = list(job_statuses)
    if any(s not in TERMINAL for s in statuses):
        return "queued" if all(s == "queued" for s in statuses) else "running"
    if all(s == "succeeded" for s in statuses):
        return "succeeded"
    if cancel_requested:
        return "cancelled"
    if not any(s == "succeeded" for s in statuses):
        return "failed"
    return "partial"
