"""Clip telemetry accumulated on the device; one host sync per summary."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .base import ClipResult

_COUNTS = ("clipped_steps", "skipped_steps", "finite_steps", "zeroed")
_NORMS = ("pre", "post")
# per_example clipping's own figures: examples (or people) clipped one by one, how many were
# above the threshold, their pre-clip norms' sum (and, apart, max)
_EXAMPLES = ("examples", "examples_clipped", "example_norm_sum")


def _empty() -> dict:
    raw: dict = {"steps": 0, **{k: 0 for k in _COUNTS}, "threshold": None,
                 **{k: 0 for k in _EXAMPLES}, "example_norm_max": None}
    for n in _NORMS:
        raw.update({f"{n}_sum": 0.0, f"{n}_max": None, f"{n}_last": None})
    return raw


def _merge(a: dict, b: dict) -> dict:
    """Run record ``a`` followed by ``b``."""
    out = {k: a.get(k, 0) + b.get(k, 0)
           for k in ("steps", *_COUNTS, "pre_sum", "post_sum", *_EXAMPLES)}
    maxes = [v for v in (a.get("example_norm_max"), b.get("example_norm_max")) if v is not None]
    out["example_norm_max"] = max(maxes) if maxes else None
    for n in _NORMS:
        maxes = [v for v in (a[f"{n}_max"], b[f"{n}_max"]) if v is not None]
        out[f"{n}_max"] = max(maxes) if maxes else None
        out[f"{n}_last"] = b[f"{n}_last"] if b[f"{n}_last"] is not None else a[f"{n}_last"]
    out["threshold"] = b["threshold"] if b["threshold"] is not None else a["threshold"]
    return out


def _summary(raw: dict) -> dict:
    steps, fin = raw["steps"], raw["finite_steps"]
    out = {
        "steps": steps,
        "clipped_steps": raw["clipped_steps"],
        "clip_fraction": raw["clipped_steps"] / steps if steps else 0.0,
        "skipped_steps": raw["skipped_steps"],
        "zeroed": raw["zeroed"],
    }
    for n in _NORMS:
        out[f"grad_norm_{n}"] = {
            "last": raw[f"{n}_last"],
            "mean": raw[f"{n}_sum"] / fin if fin else None,
            "max": raw[f"{n}_max"],
        }
    out["threshold"] = raw["threshold"]
    n = raw.get("examples", 0)
    if n:
        out["examples"] = {
            "count": int(n), "clipped": int(raw["examples_clipped"]),
            "clip_fraction": raw["examples_clipped"] / n,
            "norm_mean": raw["example_norm_sum"] / n, "norm_max": raw["example_norm_max"]}
    return out


class ClipTelemetry:
    """Accumulates ClipResults without host syncs.

    Norm means, maxima and last values are over finite steps only; ``skipped_steps`` counts
    the non-finite ones; ``threshold`` is the last one reported (None if never).
    """

    def __init__(self):
        self._total = _empty()
        self._device: torch.device | None = None
        self._steps = 0

    def _reset_epoch(self, device: torch.device) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self._device, self._steps = device, 0
        self._sum = torch.zeros(len(_COUNTS) + len(_NORMS), **f64)
        self._max = torch.full((len(_NORMS),), -math.inf, **f64)
        self._last = torch.full((len(_NORMS),), math.nan, **f64)
        self._thr = torch.full((1,), math.nan, **f64)
        self._ex = torch.zeros(len(_EXAMPLES) + 1, **f64)  # the sums, then the max

    @torch.no_grad()
    def update(self, r: ClipResult) -> None:
        if self._device is None:
            self._reset_epoch(r.norm_pre.device)
        dev = self._device
        fin = r.finite.to(dev)
        counts = torch.stack([r.clipped, ~r.finite, r.finite, r.zeroed]).to(dev, torch.float64)
        norms = torch.stack([r.norm_pre, r.norm_post]).to(dev, torch.float64)
        self._sum += torch.cat([counts, torch.where(fin, norms, 0.0)])
        self._max = torch.maximum(self._max, torch.where(fin, norms, -math.inf))
        self._last = torch.where(fin, norms, self._last)
        thr = r.threshold.to(dev, torch.float64).view(1)
        self._thr = torch.where(torch.isnan(thr), self._thr, thr)
        if r.examples is not None:
            ex = torch.stack([r.examples, r.examples_clipped, r.example_norm_sum,
                              r.example_norm_max]).to(dev, torch.float64)
            self._ex[:3] += ex[:3]
            self._ex[3] = torch.maximum(self._ex[3], ex[3])
        self._steps += 1

    def _epoch_raw(self) -> dict:
        raw = _empty()
        if self._device is None:
            return raw
        vals = torch.cat([self._sum, self._max, self._last, self._thr, self._ex]).tolist()
        vals = [None if not math.isfinite(v) else v for v in vals]
        k = len(_COUNTS)
        raw["steps"] = self._steps
        raw.update({name: int(v) for name, v in zip(_COUNTS, vals[: len(_COUNTS)], strict=True)})
        for i, n in enumerate(_NORMS):
            raw[f"{n}_sum"] = vals[k + i]
            raw[f"{n}_max"] = vals[k + 2 + i]
            raw[f"{n}_last"] = vals[k + 4 + i]
        raw["threshold"] = vals[k + 6]
        ex = vals[k + 7:]
        raw.update({name: ex[i] or 0 for i, name in enumerate(_EXAMPLES)})
        raw["examples"] = int(raw["examples"])
        raw["examples_clipped"] = int(raw["examples_clipped"])
        raw["example_norm_max"] = ex[3] if raw["examples"] else None
        return raw

    def epoch_summary(self) -> dict:
        """This epoch's summary (plain Python numbers); folds it into the run totals, resets."""
        raw = self._epoch_raw()
        self._total = _merge(self._total, raw)
        if self._device is not None:
            self._reset_epoch(self._device)
        return _summary(raw)

    def total_summary(self) -> dict:
        """The same dict over the whole run, the current epoch included."""
        return _summary(self.state_dict())

    def state_dict(self) -> dict:
        """Run totals, current epoch included, as JSON-serialisable ints/floats/None."""
        return _merge(self._total, self._epoch_raw())

    def load_state_dict(self, state: dict) -> None:
        missing = set(_empty()) - set(state) - {*_EXAMPLES, "example_norm_max"}
        if missing:
            raise ValueError(f"clip telemetry state lacks {sorted(missing)}")
        # checkpoints written before per-example figures existed lack them: zero
        self._total = _empty() | {k: state[k] for k in _empty() if k in state}
        if self._device is not None:
            self._reset_epoch(self._device)
