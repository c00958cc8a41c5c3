"""The one registry of architectures: each network's builder, input normalisation, whether it
is fine-tuned from pretrained weights, the training defaults a job leaves unset and its
description, read by the training config (``architecture``'s choices, defaults and limits),
:func:`build_model`, the training loop, the saved model's preprocessing, the CLI's ``--arch``
and (through the OpenAPI schema) the web console.

A new architecture is a module with its network (``forward(x) -> (embedding, logits)``, the
embedding normalised, 128-d) plus one :func:`register` line below, or a call at run time: the
training config rebuilds its ``architecture`` field on each registration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Architecture:
    name: str  # the config's ``architecture``, the CLI's ``--arch``
    build: Callable[[int, int], nn.Module]  # build(num_classes, image_size)
    normalisation: str  # a key of facegrad.data.preprocess.NORMALISERS
    pretrained: bool  # fine-tuned from pretrained weights (image_size fixed, epochs 0 allowed)
    # what a job's unset fields take: epochs, learning_rate, image_size, optimizer
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""  # one sentence for the API schema, the CLI and the console
    network: str | None = None  # the pretrained network's name, written in a model's meta


DEFAULT_ARCHITECTURE = "dlib_resnet"
ARCHITECTURES: dict[str, Architecture] = {}
_listeners: list[Callable[[], None]] = []


def register(arch: Architecture) -> Architecture:
    """Add (or replace) an architecture; whoever built something from the registry rebuilds it."""
    missing = {"epochs", "learning_rate", "image_size", "optimizer"} - set(arch.defaults)
    if missing:
        raise ValueError(f"architecture {arch.name!r} needs defaults for {sorted(missing)}")
    ARCHITECTURES[arch.name] = arch
    for rebuild in _listeners:
        rebuild()
    return arch


def unregister(name: str) -> None:
    ARCHITECTURES.pop(name)
    for rebuild in _listeners:
        rebuild()


def on_change(rebuild: Callable[[], None]) -> None:
    """Call ``rebuild`` after each (un)registration (the training config's ``architecture``)."""
    _listeners.append(rebuild)


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; one of {', '.join(ARCHITECTURES)}"
                         ) from None


def build_model(architecture_name: str, num_classes: int, image_size: int = 64) -> nn.Module:
    return architecture(architecture_name).build(num_classes, image_size)


def _models():
    """facegrad.recognition.models, imported when a network is built: reading the registry (the
    CLI's choices and help) does not load torch."""
    from facegrad.recognition import models

    return models


# a network trained from scratch: longer, faster, at a small input size
FROM_SCRATCH = {"epochs": 60, "learning_rate": 3e-3, "image_size": 64, "optimizer": "adamw"}

register(Architecture(
    "dlib_resnet", lambda n, size: _models().PretrainedFace(n), "rgb_unit", True,
    # SGD as the origin's SGD(lr=0.01, clipnorm=5.0): Adam's steps of a fixed size overwhelm
    # this network's small weights (|w| ~ 0.01 in its convolutions; without batch norm the
    # affine scales carry the magnitude) and collapsed its embedding within an epoch. 8 epochs:
    # with CFP's folds each the test in turn and the job on the other four, 8 epochs gained more
    # on the test people's frontal-profile pairs than 4 in 5 of 5 folds (+0.013 against +0.008
    # over the pretrained network), frontal-frontal alike (bench/finetune_rotation.py)
    {"epochs": 8, "learning_rate": 0.01, "image_size": 150, "optimizer": "sgd"},
    "dlib's face-recognition ResNet, pretrained on about 3 million faces, fine-tuned on the "
    "dataset (epochs 0: used as it is)",
    network="dlib_face_recognition_resnet_model_v1"))
register(Architecture(
    "facenet_s", lambda n, size: _models().FaceNetS(n, size), "per_image_standardise", False,
    FROM_SCRATCH,
    "a small residual net trained from scratch"))
register(Architecture(
    "seed_cnn", lambda n, size: _models().SeedCNN(n, size), "per_image_standardise", False,
    FROM_SCRATCH,
    "the origin document's Conv32-Conv64-Dense128 CNN, from scratch"))
