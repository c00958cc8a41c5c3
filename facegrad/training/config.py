"""Training configuration: the one definition used by the ML core, the API schema and the CLI.

Every field has a default that trains a good model, bounds that reject absurd values, and a
description that ends up in the OpenAPI document.
"""

from __future__ import annotations

from typing import Any, Literal

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
from facegrad.recognition import architectures as arch_registry

# TrainConfig.clip: one of the registered clip modes' configs (rebuilt when one is registered)
ClipConfig = clip_modes.clip_config_union()

# the registered architectures (facegrad.recognition.architectures): TrainConfig.architecture's
# choices, the defaults a field left unset (null) takes and its limits
ARCHITECTURES = arch_registry.ARCHITECTURES
DEFAULT_ARCHITECTURE = arch_registry.DEFAULT_ARCHITECTURE


def _architecture_type() -> Any:
    return Literal[tuple(ARCHITECTURES)]  # type: ignore[valid-type]


def _architecture_description() -> str:
    return "; ".join(f"'{a.name}'{' (default)' if a.name == DEFAULT_ARCHITECTURE else ''}: "
                     f"{a.description}" for a in ARCHITECTURES.values()) + "."


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


class PrivacyConfig(_Strict):
    """Differentially private training (DP-SGD, Abadi et al. 2016) with clip mode
    'per_example': the trained weights are (epsilon, delta)-DP with respect to one ``unit``."""

    target_epsilon: float | None = Field(
        None, gt=0, le=100,
        description="The epsilon to reach at the end of training: the noise multiplier is "
        "chosen for it. Give this or noise_multiplier.")
    noise_multiplier: float | None = Field(
        None, gt=0, le=100,
        description="sigma: the noise added to each step's sum of clipped gradients has sd "
        "sigma * max_norm. Give this or target_epsilon; the job reports the epsilon it reached.")
    delta: float = Field(
        1e-5, gt=0, lt=0.01,
        description="delta of (epsilon, delta)-DP: should be well below 1 / the number of "
        "units (people or images) trained on.")
    accountant: Literal["prv", "rdp"] = Field(
        "prv", description="Opacus' accountant for epsilon: 'prv' (privacy random variables, "
        "Gopi et al. 2021; tight) or 'rdp' (Renyi DP, Mironov 2017; an upper bound).")
    unit: Literal["person", "image"] = Field(
        "person",
        description="What the guarantee protects. 'person' (default): people are sampled, the "
        "sum of a sampled person's photos' gradients is clipped as one (user-level DP), so the "
        "weights hardly depend on whether any one person was in the dataset at all. 'image': "
        "each photo on its own (example-level DP, as Opacus does it), which protects one photo "
        "but not a person with many.")
    expected_batch_size: int | None = Field(
        None, ge=2, le=1_000_000,
        description="Images per step on average: each person (or image) joins a step with "
        "probability q = expected_batch_size / training images (Poisson sampling). Unset: 256, "
        "at most a quarter of the training images. The noise is added once per step, so larger "
        "steps drown less signal in it (De et al. 2022). Under privacy the job's batch_size is "
        "the images per forward pass instead: a step is processed in chunks of that size "
        "(virtual steps), and a person brings at most that many photos to a step.")

    @model_validator(mode="after")
    def _one_noise_setting(self):
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("privacy needs exactly one of target_epsilon (the noise is chosen "
                             "to reach it) and noise_multiplier")
        return self


class TrainConfig(_Strict):
    """Everything that defines a training run. Only dataset_id is required by the API."""

    architecture: _architecture_type() = Field(  # rebuilt when one is registered
        DEFAULT_ARCHITECTURE, description=_architecture_description())
    epochs: int | None = Field(
        None, ge=0, le=1000,
        description="Passes over the training images (default 8 for dlib_resnet, 60 otherwise). "
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
    fine_tuned_share: float = Field(
        0.5, ge=0, le=1,
        description="dlib_resnet: after fine-tuning, each backbone weight becomes (1 - share) "
        "x pretrained + share x fine-tuned (weight-space ensembling, WiSE-FT: Wortsman et al. "
        "2022, 'Robust fine-tuning of zero-shot models'; 0.5 is the paper's default). The "
        "average keeps what the network knew of faces unlike the job's while keeping most of "
        "what fine-tuning taught it; 1 keeps the fine-tuned weights as trained.")
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
    descriptor: Literal["auto", "flip_mean", "embedding", "fused"] = Field(
        "auto",
        description="How a face is described for the gallery, identify and verify: "
        "'flip_mean', the normalised mean of the network's embeddings of the face and of its "
        "mirror image (a face turned left then compares like one turned right; costs a second "
        "forward pass); 'embedding', the face's embedding alone; 'fused' (dlib_resnet only), "
        "flip_mean beside the flip mean of a second pretrained network, SFace (fine-tuned "
        "too, see sface_epochs): a pair scores a weighted sum of the two networks' cosines, "
        "SFace's centred on the dataset and each weighed by 1 / its spread over different "
        "people's pairs there; better on faces turned to profile, at about 4 times the cost of "
        "describing a face. "
        "'auto' (default): the job measures flip_mean and fused on the people it held out of "
        "training and keeps fused only where it tells them apart better (model.json: "
        "preprocessing.descriptor, open_set.descriptor_choice); architectures other than "
        "dlib_resnet use flip_mean.")
    sface_epochs: int = Field(
        3, ge=0, le=100,
        description="With the fused descriptor, after training dlib's network: epochs that "
        "fine-tune SFace on the people trained on, with the same head, rates and clipping "
        "(its WiSE-FT share: sface_fine_tuned_share); the job keeps it only where it tells "
        "the held-out people apart better than SFace as it is (model.json: "
        "open_set.sface_fine_tuning). "
        "0, epochs 0 or a private job: SFace as it is.")
    sface_fine_tuned_share: float = Field(
        1.0, ge=0, le=1,
        description="With SFace fine-tuned (sface_epochs): its own WiSE-FT share, as "
        "fine_tuned_share is dlib's network's: each SFace weight becomes (1 - share) x the "
        "file's + share x fine-tuned. 1 (default) keeps the fine-tuned weights: on CFP's "
        "turned faces of people the job never saw every share above 0 gained and 1 gained most "
        "(docs/identification.md).")
    sface_refit: bool = Field(
        True,
        description="With a fine-tuned SFace kept (sface_epochs): after calibrating, fine-tune "
        "SFace once more by the same recipe on every photo of every person, the held-out "
        "people's too, and serve that one (refitting on all the data once the model is "
        "chosen). The judgement and the thresholds stay those of the SFace that never saw the "
        "held-out people (model.json: open_set.sface_fine_tuning.refit). Costs a second "
        "fine-tuning, on about 1.4 times the photos. False: serve the judged SFace.")
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
    verify_max_far: float | None = Field(
        0.01, gt=0, lt=1,
        description="The verification threshold (POST /v1/verify) is the cut that best "
        "separates same-person from different-person pairs of the held-out people's photos "
        "(balanced accuracy), raised where needed so that at most this share of their "
        "different-person pairs passes it (the false accept rate at the threshold). Where the "
        "dataset's same-person pairs are hard (faces turned to profile) the best cut alone sits "
        "low and lets through look-alikes of frontal photos elsewhere. Unset: the best cut."
    )
    calibration_identities: float = Field(
        0.2, ge=0, le=0.5,
        description="Share of the identities (with 10 or more in the dataset, and at least 2) "
        "held out of training and used as strangers to calibrate the open-set and verification "
        "thresholds; they are then enrolled into the gallery from their images, so they are "
        "still identified. 0: calibrate on the trained identities (optimistic).",
    )

    privacy: PrivacyConfig | None = Field(
        None,
        description="Differentially private training (DP-SGD): needs clip mode 'per_example'. "
        "Each step samples people (or images) with probability q = batch_size / training "
        "images, clips each one's gradient to max_norm, adds Gaussian noise and accounts "
        "epsilon (docs/privacy.md). Unset: no guarantee.")

    @model_validator(mode="after")
    def _architecture_defaults(self):
        """Fields the job leaves unset take its architecture's defaults (its registry entry),
        then each architecture's limits apply."""
        arch = arch_registry.architecture(self.architecture)
        d = arch.defaults
        for name in ("epochs", "learning_rate", "image_size"):
            if getattr(self, name) is None:
                setattr(self, name, d[name])
        if self.optimizer.name is None:
            self.optimizer.name = d["optimizer"]
            self.optimizer._nesterov()
        if arch.pretrained and self.image_size != d["image_size"]:
            raise ValueError(f"{arch.name} reads {d['image_size']}x{d['image_size']} faces: "
                             f"image_size must be {d['image_size']}")
        if not arch.pretrained and self.epochs < 1:
            pretrained = " or ".join(a.name for a in ARCHITECTURES.values() if a.pretrained)
            raise ValueError(f"{arch.name} trains from scratch: epochs must be >= 1 (epochs 0 "
                             f"is for the pretrained {pretrained or 'architectures'})")
        if self.descriptor == "auto" and self.architecture != "dlib_resnet":
            self.descriptor = "flip_mean"  # the only network fused pairs SFace with is dlib's
        if self.descriptor == "fused" and self.architecture != "dlib_resnet":
            raise ValueError("descriptor 'fused' pairs dlib_resnet with SFace, which read the "
                             "same aligned 150 px chips: use architecture dlib_resnet, or "
                             "descriptor flip_mean")
        if self.clip.mode == "per_example" and self.devices is not None and self.devices > 1:
            raise ValueError("clip mode per_example runs on one device: over several processes "
                             "each would clip its own share, and with privacy add its own "
                             "noise, which is not the mechanism the accountant analyses (set "
                             "devices to 1 or leave it unset)")
        if self.privacy is not None:
            self._private_defaults(arch)
        return self

    def _private_defaults(self, arch) -> None:
        """Refuse what would void the guarantee (each a ValueError saying why: the API's 422).
        A pretrained backbone trains only its projection (and the head) under DP unless the job
        says otherwise: the noise grows with the number of trained weights, and with good
        pretrained features DP training of the last layers does best (Tramer & Boneh 2021,
        "Differentially Private Learning Needs Better Features")."""
        if self.clip.mode != "per_example":
            raise ValueError(f"privacy needs clip mode 'per_example' (each example's gradient "
                             f"clipped before the noise is added); clip mode "
                             f"{self.clip.mode!r} bounds no one example's influence, so no "
                             "guarantee would hold")
        if self.epochs < 1:
            raise ValueError("privacy with epochs 0 trains nothing: there is no training to "
                             "protect (leave privacy out)")
        if arch.pretrained and "freeze_stages" not in self.model_fields_set:
            self.freeze_stages = 5


def _rebuild_clip_union() -> None:
    """Let TrainConfig.clip accept exactly the registered clip modes."""
    global ClipConfig
    ClipConfig = clip_modes.clip_config_union()
    old = TrainConfig.model_fields["clip"]
    TrainConfig.model_fields["clip"] = FieldInfo.from_annotated_attribute(
        ClipConfig, Field(default_factory=old.default_factory, description=old.description))
    TrainConfig.model_rebuild(force=True)


clip_modes.on_change(_rebuild_clip_union)


def _rebuild_architecture_field() -> None:
    """Let TrainConfig.architecture accept exactly the registered architectures."""
    old = TrainConfig.model_fields["architecture"]
    TrainConfig.model_fields["architecture"] = FieldInfo.from_annotated_attribute(
        _architecture_type(), Field(old.default, description=_architecture_description()))
    TrainConfig.model_rebuild(force=True)


arch_registry.on_change(_rebuild_architecture_field)
