"""The one registry of clip modes: each mode's config class, clipper class, main knob, CLI
spelling and console label, read by the training config's ``clip`` union, ``build_clipper``,
the sweeps' setting labels and the CLI's ``--clip`` parser.

A new mode is a module with its config class (a :class:`.config.ClipModeConfig` with
``mode: Literal["name"]``) and its :class:`.base.Clipper`, plus one :func:`register` line below
(or a call at run time: the training config rebuilds its ``clip`` union on each registration).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args

from pydantic import Field

from .base import Clipper
from .clippers import AGCClipper, AutoClipClipper, NormClipper, ThresholdClipper, ValueClipper
from .config import (
    ClipAGC,
    ClipAutoClip,
    ClipModeConfig,
    ClipNone,
    ClipNorm,
    ClipPerExample,
    ClipThreshold,
    ClipValue,
)
from .per_example import PerExampleClipper


@dataclass(frozen=True)
class ClipMode:
    name: str  # the config's ``mode``, the CLI's first word
    config: type[ClipModeConfig]
    clipper: type[Clipper]  # built by ``clipper.for_model(cfg, model)``
    knob: str | None  # the main parameter: the CLI's bare number, always in a sweep's label
    cli: str  # how the CLI spells a typical setting, e.g. "norm:5"
    label: str  # one line for the console and help texts


CLIP_MODES: dict[str, ClipMode] = {}
_listeners: list[Callable[[], None]] = []


def register(mode: ClipMode) -> ClipMode:
    """Add (or replace) a clip mode; whoever built something from the registry rebuilds it."""
    if get_args(mode.config.model_fields["mode"].annotation) != (mode.name,):
        raise ValueError(f"{mode.config.__name__}.mode must be Literal[{mode.name!r}]")
    CLIP_MODES[mode.name] = mode
    for rebuild in _listeners:
        rebuild()
    return mode


def unregister(name: str) -> None:
    CLIP_MODES.pop(name)
    for rebuild in _listeners:
        rebuild()


def on_change(rebuild: Callable[[], None]) -> None:
    """Call ``rebuild`` after each (un)registration (the training config's ``clip`` union)."""
    _listeners.append(rebuild)


def clip_mode(name: str) -> ClipMode:
    try:
        return CLIP_MODES[name]
    except KeyError:
        raise ValueError(f"unknown clip mode {name!r}; one of {', '.join(CLIP_MODES)}") from None


def clip_config_union() -> Any:
    """The registered config classes as one pydantic type, told apart by ``mode``."""
    configs = tuple(m.config for m in CLIP_MODES.values())
    return Annotated[Union[configs], Field(discriminator="mode")]  # noqa: UP007


register(ClipMode("none", ClipNone, Clipper, None, "none", "no clipping"))
register(ClipMode("value", ClipValue, ValueClipper, "clip_value", "value:1",
                  "clamp every gradient element to ±clip_value"))
register(ClipMode("norm", ClipNorm, NormClipper, "max_norm", "norm:5",
                  "rescale the gradient whose norm exceeds max_norm (global or per tensor)"))
register(ClipMode("threshold", ClipThreshold, ThresholdClipper, "alpha", "threshold:0.9",
                  "zero every element above alpha · max|g|"))
register(ClipMode("agc", ClipAGC, AGCClipper, "clip_factor", "agc:0.01",
                  "adaptive gradient clipping, unit-wise, relative to the weights"))
register(ClipMode("autoclip", ClipAutoClip, AutoClipClipper, "percentile", "autoclip:10",
                  "clip the global norm to a percentile of the norms seen so far"))
register(ClipMode("per_example", ClipPerExample, PerExampleClipper, "max_norm", "per_example:1",
                  "clip each example's (or person's) gradient to max_norm: DP-SGD's clipping"))
