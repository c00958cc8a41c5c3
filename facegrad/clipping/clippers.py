"""The clipper of each clip mode: built from the mode's config (:mod:`.config`), called on the
parameters after backward (:class:`.base.Clipper`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .agc import clip_agc_
from .autoclip import AutoClip
from .base import Clipper
from .config import ClipAGC, ClipAutoClip, ClipNorm, ClipThreshold, ClipValue
from .norm import clip_norm_global_, clip_norm_per_tensor_, total_norm
from .threshold import clip_threshold_
from .value import clip_value_


def _post(grads) -> torch.Tensor:
    return total_norm(torch._foreach_norm(grads, 2.0), 2.0)


class ValueClipper(Clipper):
    mode = "value"

    def __init__(self, cfg: ClipValue):
        self.clip_value = cfg.clip_value

    def _clip(self, params, grads, l2, pre):
        fired = clip_value_(grads, self.clip_value)
        return _post(grads), fired, None, None


class NormClipper(Clipper):
    mode = "norm"

    def __init__(self, cfg: ClipNorm):
        self.max_norm, self.p, self.scope = cfg.max_norm, cfg.p, cfg.scope

    def _clip(self, params, grads, l2, pre):
        if self.scope == "global":
            _, coef = clip_norm_global_(grads, self.max_norm, self.p, l2)
            thr = torch.full_like(pre, self.max_norm)
            return pre * coef, coef < 1, None, thr
        coefs = clip_norm_per_tensor_(grads, self.max_norm, self.p, l2)
        return total_norm(torch.stack(l2) * coefs, 2.0), (coefs < 1).any(), None, None


class ThresholdClipper(Clipper):
    mode = "threshold"

    def __init__(self, cfg: ClipThreshold):
        self.alpha, self.scope = cfg.alpha, cfg.scope

    def _clip(self, params, grads, l2, pre):
        zeroed, thr = clip_threshold_(grads, self.alpha, self.scope)
        return _post(grads), zeroed > 0, zeroed, thr


class AGCClipper(Clipper):
    mode = "agc"

    def __init__(self, cfg: ClipAGC, exempt: Iterable[nn.Parameter] = ()):
        self.clip_factor, self.eps = cfg.clip_factor, cfg.eps
        self.exempt = {id(p) for p in exempt}

    @classmethod
    def for_model(cls, cfg: ClipAGC, model: nn.Module) -> AGCClipper:
        return cls(cfg, output_layer_params(model) if cfg.exempt_output else ())

    def _clip(self, params, grads, l2, pre):
        pairs = [(p, g) for p, g in zip(params, grads, strict=True) if id(p) not in self.exempt]
        if not pairs:
            return pre, torch.zeros_like(pre, dtype=torch.bool), None, None
        ps, gs = zip(*pairs, strict=True)
        fired = clip_agc_(list(ps), list(gs), self.clip_factor, self.eps)
        return _post(grads), fired, None, None


class AutoClipClipper(Clipper):
    mode = "autoclip"

    def __init__(self, cfg: ClipAutoClip):
        self.autoclip = AutoClip(cfg.percentile, cfg.warmup_steps, cfg.history_size)

    def _clip(self, params, grads, l2, pre):
        coef, thr = self.autoclip.clip_(grads, pre)
        return pre * coef, coef < 1, None, thr

    def state_dict(self) -> dict:
        return self.autoclip.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.autoclip.load_state_dict(state)


def output_layer_params(model: nn.Module) -> list[nn.Parameter]:
    """The final classifier's parameters.

    ``model.output_layer_names`` (parameter-name prefixes, matched at ``.`` boundaries) wins if
    present; otherwise the last ``nn.Linear`` in ``model.modules()`` order; else none.
    """
    prefixes = getattr(model, "output_layer_names", None)
    if prefixes is not None:
        prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        prefixes = [pre.rstrip(".") for pre in prefixes]  # "classifier." means "classifier"
        found = [
            p
            for name, p in model.named_parameters()
            if any(name == pre or name.startswith(pre + ".") for pre in prefixes)
        ]
        if not found:
            raise ValueError(f"output_layer_names {prefixes} match no parameter of the model")
        return found
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return list(linears[-1].parameters()) if linears else []
