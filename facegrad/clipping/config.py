"""The clip modes' configurations: one pydantic model per mode, told apart by ``mode``.

The training configuration (:mod:`facegrad.training.config`) holds one of them as ``clip`` (the
union of the modes registered in :mod:`.modes`); :func:`facegrad.clipping.build_clipper` builds
the clipper for it.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ClipModeConfig(BaseModel):
    """What every clip mode's config has; a mode adds ``mode: Literal["its name"]`` and its
    parameters (:mod:`.modes` registers it)."""

    model_config = ConfigDict(extra="forbid")

    on_nonfinite: Literal["skip", "fail"] = Field(
        "skip",
        description="What to do when the gradient norm is NaN/inf: 'skip' the optimizer step "
        "and count it, or 'fail' the job with an error naming the step.",
    )


class ClipNone(ClipModeConfig):
    mode: Literal["none"] = "none"


class ClipValue(ClipModeConfig):
    """Clamp every gradient element to [-clip_value, clip_value] (Keras clipvalue)."""

    mode: Literal["value"]
    clip_value: float = Field(1.0, gt=0, le=1e6, description="Elements are clamped to ±clip_value.")


class ClipNorm(ClipModeConfig):
    """Rescale gradients whose p-norm exceeds max_norm.

    scope 'global' is torch's clip_grad_norm_ (Keras global_clipnorm); 'per_tensor' clips each
    parameter's gradient on its own (Keras clipnorm, as in SGD(lr=0.01, clipnorm=5.0)).
    """

    mode: Literal["norm"]
    max_norm: float = Field(5.0, gt=0, le=1e6, description="Largest allowed norm.")
    norm_type: float | Literal["inf"] = Field(2.0, description="p of the p-norm (>= 1), or 'inf'.")
    scope: Literal["global", "per_tensor"] = "global"

    @field_validator("norm_type")
    @classmethod
    def _p(cls, v):
        if v == "inf":
            return v
        if not (1.0 <= float(v) <= 100.0) or math.isnan(float(v)):
            raise ValueError("norm_type must be a number in [1, 100] or 'inf'")
        return float(v)

    @property
    def p(self) -> float:
        return math.inf if self.norm_type == "inf" else float(self.norm_type)


class ClipThreshold(ClipModeConfig):
    """The origin document's rule: T = alpha * max|g_i|; every g_i with |g_i| > T becomes 0."""

    mode: Literal["threshold"]
    alpha: float = Field(0.9, gt=0, le=1, description="T = alpha * max|g|, alpha in (0, 1].")
    scope: Literal["global", "per_tensor"] = Field(
        "global", description="Take max|g| over all parameters ('global') or per tensor."
    )


class ClipAGC(ClipModeConfig):
    """Adaptive gradient clipping (Brock et al. 2021).

    Unit-wise ||g|| <= clip_factor * max(||w||, eps).
    """

    mode: Literal["agc"]
    clip_factor: float = Field(0.01, gt=0, le=10)
    eps: float = Field(1e-3, gt=0, le=1)
    exempt_output: bool = Field(True, description="Leave the final classifier layer unclipped.")


class ClipAutoClip(ClipModeConfig):
    """AutoClip (Seetharaman et al. 2020): clip the global L2 norm to a percentile of history."""

    mode: Literal["autoclip"]
    percentile: float = Field(10.0, gt=0, le=100)
    warmup_steps: int = Field(
        10, ge=0, le=100000, description="Steps that only record norms before clipping starts."
    )
    history_size: int = Field(
        10000, ge=1, le=1_000_000, description="How many past norms the percentile looks at."
    )


class ClipPerExample(ClipModeConfig):
    """Clip each example's gradient (or each person's, with ``privacy.unit`` 'person') to
    max_norm before they are summed: DP-SGD's clipping (Abadi et al. 2016). With the job's
    ``privacy`` set, Gaussian noise of sd noise_multiplier · max_norm is added to the sum."""

    mode: Literal["per_example"]
    max_norm: float = Field(
        1.0, gt=0, le=1e6,
        description="C: the largest L2 norm one example's (or person's) gradient may have.")
