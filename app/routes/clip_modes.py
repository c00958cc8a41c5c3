"""The clip modes a job's ``clip`` accepts, from the registry (facegrad.clipping.modes): what
the web console offers, with each mode's main parameter and its default and bounds."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.auth import admin_only
from app.schemas import ClipKnob, ClipModeList, ClipModeOut
from facegrad.clipping.modes import CLIP_MODES, ClipMode

router = APIRouter(prefix="/v1/clip-modes", tags=["jobs"], dependencies=[Depends(admin_only)])
BOUNDS = {"default": "default", "minimum": "minimum", "maximum": "maximum",
          "exclusiveMinimum": "exclusive_minimum", "exclusiveMaximum": "exclusive_maximum",
          "description": "description"}


def to_out(mode: ClipMode) -> ClipModeOut:
    props = mode.config.model_json_schema()["properties"]
    knob = None
    if mode.knob:
        prop = props[mode.knob]
        knob = ClipKnob(name=mode.knob, **{ours: prop[theirs] for theirs, ours in BOUNDS.items()
                                           if theirs in prop})
    return ClipModeOut(name=mode.name, label=mode.label, cli=mode.cli, knob=knob,
                       fields=[n for n in props if n != "mode"])


@router.get("", response_model=ClipModeList, summary="The clip modes a job can use")
def list_clip_modes() -> ClipModeList:
    return ClipModeList(items=[to_out(m) for m in CLIP_MODES.values()])
