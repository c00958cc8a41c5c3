"""``--clip`` and ``--arch``: read from the registries (facegrad.clipping.modes,
facegrad.recognition.architectures), imported only when a value is parsed or help is shown
(they load torch, which running a command does not need)."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

# --- --clip SPEC ------------------------------------------------------------------------------

def _value(text: str):
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if t.lower() in ("inf", "nan", "infinity"):
        return t.lower()
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def arch_choices() -> list[str]:
    """The registered architectures (facegrad.recognition.architectures), what --arch takes."""
    from facegrad.recognition.architectures import ARCHITECTURES

    return list(ARCHITECTURES)


def arch_help() -> str:
    """--arch's help, from the architecture registry."""
    from facegrad.recognition.architectures import ARCHITECTURES, DEFAULT_ARCHITECTURE

    return "; ".join(f"{a.name}{' (server default)' if a.name == DEFAULT_ARCHITECTURE else ''}: "
                     f"{a.description}" for a in ARCHITECTURES.values()) + "."


def clip_help() -> str:
    """--clip's help, from the clip-mode registry (facegrad.clipping.modes)."""
    from facegrad.clipping.modes import CLIP_MODES

    modes = "; ".join(f"{m.cli} ({m.label})" for m in CLIP_MODES.values())
    return (f"Clipping rule: {modes}; a scope (norm:5:per_tensor) and more fields as "
            "key=value (norm:5:norm_type=inf). Default: the server's (norm:5).")


def sweep_clip_help() -> str:
    return ("A clipping rule to compare; repeat it: --clip none --clip norm:5:per_tensor "
            "--clip threshold:0.9. " + clip_help())


def check_arch(value: str | None) -> str | None:
    if value is not None and value not in arch_choices():
        raise typer.BadParameter(f"unknown architecture {value!r}; one of "
                                 f"{', '.join(arch_choices())}", param_hint="--arch")
    return value


def _fill_registry_help(params, helps: dict) -> None:
    for p in params:
        if p.name in helps:
            p.help = helps[p.name]()


class RegistryHelpCommand(TyperCommand):
    """A command whose --arch and --clip help is read from the registries when help is shown
    (the clip modes' registry loads torch, which running a command does not need)."""

    def format_help(self, ctx, formatter):
        _fill_registry_help(self.params, {"arch": arch_help, "clip": clip_help})
        return super().format_help(ctx, formatter)


class RegistryHelpGroup(TyperGroup):
    """``facegrad sweep``: as :class:`RegistryHelpCommand`."""

    def format_help(self, ctx, formatter):
        _fill_registry_help(self.params, {"arch": arch_help, "clip": sweep_clip_help})
        return super().format_help(ctx, formatter)


def parse_clip(spec: str) -> dict:
    """``norm:5``, ``norm:5:per_tensor``, ``value:1``, ``threshold:0.9``, ``agc:0.01``,
    ``autoclip:10``, ``none`` (each registered mode's spelling, facegrad.clipping.modes); any
    field also as ``key=value`` (``norm:5:norm_type=inf``) and ``skip``/``fail`` for
    on_nonfinite. The first bare number is the mode's main parameter (its knob)."""
    from facegrad.clipping.modes import CLIP_MODES

    parts = [p.strip() for p in spec.split(":")]
    mode = parts[0].lower()
    if mode not in CLIP_MODES:
        examples = ", ".join(m.cli for m in CLIP_MODES.values())
        raise typer.BadParameter(f"unknown clip mode {parts[0]!r}; one of "
                                 f"{', '.join(CLIP_MODES)} (e.g. {examples})",
                                 param_hint="--clip")
    entry = CLIP_MODES[mode]
    fields = entry.config.model_fields
    # the knob first: a bare number sets it
    params = [n for n in fields if n not in ("mode", "on_nonfinite")]
    if entry.knob in params:
        params.remove(entry.knob)
        params.insert(0, entry.knob)
    out: dict[str, Any] = {"mode": mode}
    for part in parts[1:]:
        if not part:
            continue
        if "=" in part:
            key, val = (s.strip() for s in part.split("=", 1))
            if key not in fields or key == "mode":
                raise typer.BadParameter(
                    f"clip mode {mode!r} has no parameter {key!r}; it takes "
                    f"{', '.join(params + ['on_nonfinite']) or 'only on_nonfinite'}",
                    param_hint="--clip")
            out[key] = _value(val)
        elif part in ("global", "per_tensor") and "scope" in fields:
            out["scope"] = part
        elif part in ("skip", "fail"):
            out["on_nonfinite"] = part
        elif params and params[0] not in out and isinstance(_value(part), int | float):
            out[params[0]] = _value(part)
        else:
            raise typer.BadParameter(f"cannot read {part!r} in {spec!r}; clip mode {mode!r} "
                                     f"takes {', '.join(params) or 'no parameter'}",
                                     param_hint="--clip")
    return out
