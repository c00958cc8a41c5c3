"""Training configuration: the one definition used by the ML core, the API schema and the CLI.

Every field has a default that trains a good model, bounds that reject absurd values, and a
description that ends up in the OpenAPI document.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

from facegrad.clipping import modes as clip_modes
from facegrad.clipping.config import (  # noqa: F401 (re-exported: the clip configs of a job)
    ClipAGC,
    ClipAutoClip,
    ClipNone,
    ClipNorm,
    ClipThreshold,
    ClipValue,
)

# TrainConfig.clip: one of the registered clip modes' configs (rebuilt when one is registered)
ClipConfig = clip_modes.clip_config_union()

ARCHITECTURES = ("dlib_resnet", "facenet_s", "seed_cnn")
DEFAULT_ARCHITECTURE = "dlib_resnet"
PRETRAINED = ("dlib_resnet",)  # fine-tuned from pretrained weights; the others train from scratch
# what a field left unset (null) takes, by architecture: a pretrained network is fine-tuned
# briefly, gently, at the input size it was trained at
FROM_SCRATCH = {"epochs": 60, "learning_rate": 3e-3, "image_size": 64, "optimizer": "adamw"}
ARCH_DEFAULTS = {
    # SGD as the origin's SGD(lr=0.01, clipnorm=5.0): Adam's steps of a fixed size overwhelm
    # this network's small weights (|w| ~ 0.01 in its convolutions; without batch norm the
    # affine scales carry the magnitude) and collapsed its embedding within an epoch
    "dlib_resnet": {"epochs": 4, "learning_rate": 0.01, "image_size": 150, "optimizer": "sgd"},
    "facenet_s": FROM_SCRATCH,
    "seed_cnn": FROM_SCRATCH,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")




class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] | None = Field(
        None, description="Unset: the architecture's (sgd for dlib_resnet, adamw otherwise).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by adam/adamw).")
    weight_decay: float = Field(5e-4, ge=0, le=1)
    nesterov: bool = False

    @model_validator(mode="after")
    def _nesterov(self):
        if self.nesterov and (self.name not in ("sgd", None) or self.momentum == 0):
            raise ValueError("nesterov needs optimizer name 'sgd' with momentum > 0")
        return self


class TrainConfig(_Strict):
    """Everything that defines a training run. Only dataset_id is required by the API."""

    architecture: Literal["dlib_resnet", "facenet_s", "seed_cnn"] = Field(
        DEFAULT_ARCHITECTURE,
        description="'dlib_resnet' (default): dlib's face-recognition ResNet, pretrained on about "
        "3 million faces, fine-tuned on the dataset (epochs 0: used as it is); 'facenet_s' (a "
        "small residual net trained from scratch) or 'seed_cnn' (the origin document's "
        "Conv32-Conv64-Dense128 CNN, from scratch).",
    )
    epochs: int | None = Field(
        None, ge=0, le=1000,
        description="Passes over the training images (default 4 for dlib_resnet, 60 otherwise). "
        "0, only for dlib_resnet: the pretrained network as it is, gallery and calibration only.")
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float | None = Field(
        None, gt=0, le=10,
        description="Peak learning rate (default 0.01 for dlib_resnet, 3e-3 otherwise); for "
        "dlib_resnet the head's, the backbone learning at backbone_lr_scale of it.")
    backbone_lr_scale: float = Field(
        0.1, ge=0, le=1,
        description="dlib_resnet: the pretrained layers' learning rate as a share of the head's "
        "(0 freezes them all). A lower rate keeps what the network learnt from millions of faces.")
    freeze_stages: int = Field(
        2, ge=0, le=5,
        description="dlib_resnet: how many of its stages (stem, then residual stages of 32, 64, "
        "128, 256 filters) stay frozen: early layers describe edges and textures any face "
        "shares; freezing them also halves the backward pass.")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="Cosine decay with a short warm-up, or a constant rate."
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    clip: ClipConfig = Field(default_factory=lambda: ClipNorm(mode="norm", max_norm=5.0))
    image_size: int | None = Field(
        None, ge=32, le=256,
        description="Square input side in pixels (default 64; dlib_resnet: 150, its fixed "
        "input size).")
    val_fraction: float = Field(
        0.1, ge=0, lt=0.9, description="Share of each identity held out for validation."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    devices: int | None = Field(
        None, ge=1, le=64,
        description="Processes that train this one job together, one per device "
        "(DistributedDataParallel: NCCL on GPUs, gloo on the CPU). Unset: every GPU the worker "
        "has, or 1 on a CPU worker. Each step's global batch (batch_size) is split between "
        "them and clipping applies to the all-reduced gradients.")
    data_loading: Literal["auto", "memory", "stream"] = Field(
        "auto",
        description="'memory': the training split is resized once and held on the training "
        "device; 'stream': batches are read from the stored dataset as training goes, so "
        "memory does not grow with the dataset; 'auto': memory when the resized split fits "
        "in 1 GiB, else stream.")
    augment: bool = Field(
        True, description="Random affine (scale 0.8-1.25, shift, rotation), flip, gamma/contrast "
        "and greyscale, batched on the training device.")
    descriptor: Literal["flip_mean", "embedding"] = Field(
        "flip_mean",
        description="How a face is described for the gallery, identify and verify: "
        "'flip_mean' (default), the normalised mean of the network's embeddings of the face "
        "and of its mirror image (a face turned left then compares like one turned right; "
        "costs a second forward pass); 'embedding', the face's embedding alone.")
    amp: bool = Field(True, description="Mixed precision on CUDA (ignored on CPU).")
    checkpoint_every: int = Field(1, ge=1, le=1000, description="Checkpoint every N epochs.")
    target_fpir: float | None = Field(
        None, gt=0, lt=1,
        description="Unset (default): the open-set threshold is the equal-error point between "
        "known faces and strangers scored on the gallery (held-out people as strangers): the "
        "score where the share of known faces rejected equals the share of strangers accepted; "
        "where the two separate, the middle of the gap between their 1 % tails. A number: the "
        "threshold is set so that this share of people absent from the gallery would still be "
        "given an identity (a stricter gallery rejects more known faces too)."
    )
    calibration_identities: float = Field(
        0.2, ge=0, le=0.5,
        description="Share of the identities (with 10 or more in the dataset, and at least 2) "
        "held out of training and used as strangers to calibrate the open-set and verification "
        "thresholds; they are then enrolled into the gallery from their images, so they are "
        "still identified. 0: calibrate on the trained identities (optimistic).",
    )

    @model_validator(mode="after")
    def _architecture_defaults(self):
        """Fields the job leaves unset take its architecture's defaults (``ARCH_DEFAULTS``),
        then each architecture's limits apply."""
        d = ARCH_DEFAULTS[self.architecture]
        for name in ("epochs", "learning_rate", "image_size"):
            if getattr(self, name) is None:
                setattr(self, name, d[name])
        if self.optimizer.name is None:
            self.optimizer.name = d["optimizer"]
            self.optimizer._nesterov()
        if self.architecture == "seed_cnn" and self.image_size < 32:
            raise ValueError("seed_cnn needs image_size >= 32")
        if self.architecture in PRETRAINED and self.image_size != 150:
            raise ValueError(f"{self.architecture} reads 150x150 faces: image_size must be 150")
        if self.architecture not in PRETRAINED and self.epochs < 1:
            raise ValueError(f"{self.architecture} trains from scratch: epochs must be >= 1 "
                             "(epochs 0 is for the pretrained dlib_resnet)")
        return self


def _rebuild_clip_union() -> None:
    """Let TrainConfig.clip accept exactly the registered clip modes."""
    global ClipConfig
    ClipConfig = clip_modes.clip_config_union()
    old = TrainConfig.model_fields["clip"]
    TrainConfig.model_fields["clip"] = FieldInfo.from_annotated_attribute(
        ClipConfig, Field(default_factory=old.default_factory, description=old.description))
    TrainConfig.model_rebuild(force=True)


clip_modes.on_change(_rebuild_clip_union)
