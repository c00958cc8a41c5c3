"""Per-example clipping, DP-SGD's (Abadi et al. 2016, "Deep Learning with Differential
Privacy", algorithm 1): every example's gradient is clipped to C on its own, the clipped
gradients are summed, Gaussian noise of sd sigma·C is added to the sum, and the sum is divided
by the expected number of examples of a step.

The per-example gradients are ``p.grad_sample`` (one row per example), which Opacus'
``GradSampleModule`` computes in backward. A step may be several chunks ("virtual steps", so
that a large logical batch fits in memory): :meth:`PerExampleClipper.accumulate` after each
chunk's backward, then the clipper's call finishes the step. With ``units`` the rows are
grouped first (e.g. one person's photos): the unit's summed gradient is what gets clipped,
which bounds one person's influence instead of one photo's (user-level DP, McMahan et al. 2018,
"Learning Differentially Private Recurrent Language Models").
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .base import Clipper, ClipResult
from .config import ClipPerExample
from .norm import EPS


class PerExampleClipper(Clipper):
    mode = "per_example"

    def __init__(self, cfg: ClipPerExample):
        self.max_norm = cfg.max_norm
        self.noise_multiplier = 0.0
        self.expected_units: float | None = None
        self.generator: torch.Generator | None = None
        self._reset()

    def set_noise(self, noise_multiplier: float, expected_units: float,
                  generator: torch.Generator | None) -> None:
        """Add N(0, (noise_multiplier · max_norm)²) to each step's sum and divide it by
        ``expected_units`` (q · N under Poisson sampling) rather than the step's own count:
        the accountant's analysis assumes both."""
        self.noise_multiplier = float(noise_multiplier)
        self.expected_units = float(expected_units)
        self.generator = generator

    def _reset(self) -> None:
        self._clipped_sum: list[Tensor] | None = None
        self._raw_sum: list[Tensor] | None = None
        self._stats = None  # [units, clipped units, norm sum, norm max, non-finite units]

    @torch.no_grad()
    def accumulate(self, params: Iterable[torch.nn.Parameter], units: Tensor | None = None,
                   num_units: int | None = None) -> None:
        """Clip this chunk's per-example gradients and add them to the step's sum.

        ``units`` (one int per row of ``grad_sample``, in ``0..num_units-1``) groups rows whose
        summed gradient is clipped as one; None: every row is its own unit. Units are this
        chunk's: a unit must not span two calls (it would be clipped, and counted, twice).
        Frees ``grad_sample`` and ``grad``."""
        params = [p for p in params if p.requires_grad]
        samples = [p.grad_sample for p in params]
        if any(not torch.is_tensor(s) for s in samples):
            raise RuntimeError("per_example clipping needs per-example gradients "
                               "(p.grad_sample, from Opacus' GradSampleModule, one forward "
                               "per backward) on every trainable parameter")
        # the unclipped sum is what autograd put in .grad (the telemetry's norm before clipping)
        raw = [p.grad if p.grad is not None else s.sum(0) for p, s in zip(params, samples,
                                                                           strict=True)]
        if units is not None:
            n = int(num_units if num_units is not None else int(units.max()) + 1)
            samples = [s.new_zeros((n, *s.shape[1:])).index_add_(0, units.to(s.device), s)
                       for s in samples]
        flat = [s.flatten(1) for s in samples]
        norms = torch.stack([torch.einsum("ni,ni->n", f, f) for f in flat]).sum(0).sqrt()
        finite = torch.isfinite(norms)
        factor = torch.where(finite, (self.max_norm / (norms + EPS)).clamp(max=1.0), 0.0)
        if not bool(finite.all()):  # (a host sync) a NaN row times 0 is still NaN
            flat = [torch.nan_to_num(f) for f in flat]
        clipped = [(factor.to(f.dtype) @ f).view(p.shape) for f, p in zip(flat, params,
                                                                           strict=True)]
        kept = torch.where(finite, norms, 0.0)
        stats = torch.stack([
            torch.tensor(float(len(norms)), device=norms.device),
            ((norms > self.max_norm) & finite).sum().float(),
            kept.sum(), kept.max() if len(norms) else norms.new_zeros(()),
            (~finite).sum().float()]).double()
        if self._clipped_sum is None:
            self._clipped_sum, self._raw_sum, self._stats = clipped, raw, stats
        else:
            torch._foreach_add_(self._clipped_sum, clipped)
            torch._foreach_add_(self._raw_sum, raw)
            self._stats[:3] += stats[:3]
            self._stats[3] = torch.maximum(self._stats[3], stats[3])
            self._stats[4] += stats[4]
        for p in params:
            p.grad_sample = None
            p.grad = None

    @torch.no_grad()
    def __call__(self, parameters: Iterable[torch.nn.Parameter]) -> ClipResult:
        """Finish the step: ``p.grad`` = (sum of clipped gradients + noise) / divisor, where
        the divisor is ``expected_units`` when noise is set, else the step's unit count."""
        params = [p for p in parameters if p.requires_grad]
        if self._clipped_sum is None:  # an empty step (Poisson sampling drew nobody)
            self._clipped_sum = [torch.zeros_like(p) for p in params]
            self._raw_sum = [torch.zeros_like(p) for p in params]
            self._stats = torch.zeros(5, dtype=torch.float64, device=params[0].device)
        units, n_clipped, norm_sum, norm_max, bad = self._stats
        divisor = (self.expected_units if self.expected_units
                   else max(1.0, float(units)))  # a host sync only without noise
        std = self.noise_multiplier * self.max_norm
        for p, s in zip(params, self._clipped_sum, strict=True):
            if std > 0:
                s.add_(torch.normal(0.0, std, s.shape, generator=self.generator,
                                    device=s.device, dtype=s.dtype))
            p.grad = s.div_(divisor)
        pre = torch.stack([r.float().pow(2).sum() for r in self._raw_sum]).sum().sqrt() / divisor
        post = torch.stack([p.grad.float().pow(2).sum() for p in params]).sum().sqrt()
        finite = bad == 0
        result = ClipResult(
            pre, post, n_clipped > 0, torch.zeros((), dtype=torch.int64, device=pre.device),
            finite, torch.full_like(pre, self.max_norm),
            examples=units, examples_clipped=n_clipped, example_norm_sum=norm_sum,
            example_norm_max=norm_max)
        self._reset()
        return result
