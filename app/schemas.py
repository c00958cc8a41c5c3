"""Request and response bodies of the v1 API."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_serializer,
)

from facegrad.service.sweeps import DEFAULT_METRIC, METRICS
from facegrad.training.config import ClipNone, ClipNorm, TrainConfig


def _utc(v: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored in UTC): mark them UTC, so that every timestamp
    the API returns carries its offset (RFC 3339 'date-time', as the OpenAPI document says)."""
    return v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v.astimezone(timezone.utc)


UTCDateTime = Annotated[datetime, AfterValidator(_utc)]

# Value sets used by several fields: each is one named component of the OpenAPI document (see
# SHARED_ENUMS), so that a generated client has one enum type for it, not one per field.
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
SweepStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "partial"]
Detect = Literal["auto", "none"]
MetricName = Literal[tuple(METRICS)]  # type: ignore[valid-type]
OnNonfinite = ClipNone.model_fields["on_nonfinite"].annotation  # every clip mode's
ClipScope = ClipNorm.model_fields["scope"].annotation  # norm's and threshold's
SHARED_ENUMS: dict[str, Any] = {
    "JobStatus": JobStatus, "SweepStatus": SweepStatus, "Detect": Detect,
    "MetricName": MetricName, "OnNonfinite": OnNonfinite, "ClipScope": ClipScope}


def _as_is(v: Any) -> Any:
    return v


def documented_as(schema_type: Any) -> BeforeValidator:
    """For ``Annotated[T, documented_as(S)]``: validated as T, shown in the JSON schema as S.

    For fields whose values are checked as a whole elsewhere (a sweep's base and grid are
    checked combination by combination, with messages that name the combination)."""
    return BeforeValidator(_as_is, json_schema_input_type=schema_type)


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where: 'body', 'query', 'path' or 'header', "
                                 "then the field's path")
    msg: str
    type: str


class Error(BaseModel):
    """Every error answer: 4xx and 5xx alike."""

    detail: str | list[FieldError] = Field(
        description="what is wrong and what to do; for invalid parameters and fields a list "
        "of them, one entry each")


class _Record(BaseModel):
    """A stored JSON record: the keys it may have, typed; others kept. Serialised with the keys
    it has only (a key it lacks is left out, not written as null)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_serializer(mode="wrap")
    def _keys_it_has(self, handler):
        data = handler(self)
        unset = {f.alias or n for n, f in type(self).model_fields.items()
                 if n not in self.model_fields_set}
        return {k: v for k, v in data.items() if k not in unset}


def _tpir():
    return Field(None, alias="tpir_at_fpir_0.05", description="known people named correctly "
                 "when 5 % of strangers are accepted")


class FineTuningFigures(_Record):
    """One network on the held-out people among themselves."""

    people: int | None = None
    photos: int | None = None
    tpir_at_fpir_0_05: float | None = _tpir()
    verify_accuracy: float | None = Field(
        None, description="every pair of their photos: balanced accuracy at the best threshold")
    verify_pairs: int | None = None
    verify_tar_at_far_0_01: float | None = Field(
        None, alias="verify_tar_at_far_0.01",
        description="same-person pairs accepted where 1 % of different-person pairs are")


class FineTuningGain(_Record):
    """Fine-tuned minus pretrained, per figure."""

    tpir_at_fpir_0_05: float | None = _tpir()
    verify_accuracy: float | None = None
    verify_tar_at_far_0_01: float | None = Field(None, alias="verify_tar_at_far_0.01")


class FineTuningInFused(_Record):
    """Descriptor 'auto' taking fused after the fine-tuned network was kept: the two networks
    judged again, each beside SFace, on the same held-out people."""

    pretrained: FineTuningFigures | None = None
    fine_tuned: FineTuningFigures | None = None
    gain: FineTuningGain | None = None
    kept: str | None = Field(None, description="'fine_tuned' or 'pretrained'")


class FineTuning(_Record):
    """A pretrained network fine-tuned: both networks judged on people held out of training,
    among themselves (identification and verification of all their photos), and the one kept."""

    held_out: list[str] = []
    measured_on: str | None = None
    fine_tuned_share: float | None = Field(
        None, description="The fine-tuned network judged (and kept, when it is) is the "
        "average (1 - share) x pretrained + share x trained weights (the job's "
        "fine_tuned_share)")
    pretrained: FineTuningFigures | None = None
    fine_tuned: FineTuningFigures | None = None
    gain: FineTuningGain | None = None
    kept: str | None = Field(None, description="'fine_tuned' or 'pretrained': the network "
                             "the model serves")
    in_fused: FineTuningInFused | None = Field(
        None, description="with the fused descriptor chosen: the judgement made again in it; "
        "where it keeps the pretrained network, so does the model (kept)")
    note: str | None = None


class DescriptorChoice(_Record):
    """Descriptor 'auto': flip_mean and fused (SFace beside dlib's network) judged on people
    held out of training, among themselves, as fine_tuning judges networks; the one kept."""

    candidates: list[str] = []
    measured_on: str | None = None
    flip_mean: FineTuningFigures | None = None
    fused: FineTuningFigures | None = None
    gain: FineTuningGain | None = Field(None, description="fused minus flip_mean, per figure")
    chosen: str | None = Field(None, description="'flip_mean' or 'fused': the model's "
                               "descriptor (preprocessing.descriptor)")
    note: str | None = None


class SFaceRefit(_Record):
    """The served SFace when sface_refit: the kept recipe fine-tuned again on every photo of
    every person, after the judgement and the thresholds, which are the judged SFace's."""

    people: int | None = None
    photos: int | None = None
    seconds: float | None = None
    note: str | None = None


class SFaceFineTuning(_Record):
    """A model serving the fused descriptor: SFace fine-tuned on the people trained on
    (sface_epochs), judged against SFace as it is on the held-out people, in the fused
    descriptor; the one kept (preprocessing.sface)."""

    epochs: int | None = None
    fine_tuned_share: float | None = Field(
        None, description="The fine-tuned SFace is the average (1 - share) x the file's + "
        "share x trained weights (the job's sface_fine_tuned_share)")
    seconds: float | None = None
    measured_on: str | None = None
    pretrained: FineTuningFigures | None = None
    fine_tuned: FineTuningFigures | None = None
    gain: FineTuningGain | None = Field(None, description="fine-tuned minus pretrained SFace")
    kept: str | None = Field(None, description="'fine_tuned' or 'pretrained'")
    note: str | None = Field(None, description="why SFace was not fine-tuned, where it was not")
    refit: SFaceRefit | None = Field(None, description="where the kept SFace was refitted on "
                                     "every person (sface_refit)")


class OpenSetFigures(_Record):
    """What calibration measured and chose (a model's ``open_set``)."""

    threshold: float | None = Field(None, description="the identify threshold on the best "
                                    "identity's score")
    policy: str | None = Field(None, description="'equal_error' or 'target_fpir'")
    target_fpir: float | None = None
    method: str | None = None
    honest_identities: int | None = None
    calibrated_on: int | None = None
    known_faces: int | None = None
    strangers: int | None = None
    rank1: float | None = None
    known_named: float | None = None
    strangers_rejected: float | None = None
    fpir: float | None = None
    tpir_at_fpir_0_05: float | None = _tpir()
    verify_threshold: float | None = None
    verify_balanced_accuracy: float | None = Field(
        None, description="balanced accuracy of the held-out people's pairs at verify_threshold")
    verify_pairs: int | None = None
    verify_max_far: float | None = Field(
        None, description="the cap on the share of different-person pairs passing "
        "verify_threshold that it was calibrated with (TrainConfig.verify_max_far)")
    held_out: list[str] | None = None
    fine_tuning: FineTuning | None = None
    descriptor_choice: DescriptorChoice | None = None
    sface_fine_tuning: SFaceFineTuning | None = None
    note: str | None = None


class PrivacyRecord(_Record):
    """A private run's guarantee: the trained weights are (epsilon, delta)-differentially
    private with respect to one ``unit`` (docs/privacy.md)."""

    epsilon: float | None = Field(None, description="the privacy loss spent by the whole run "
                                  "(the accountant's upper bound)")
    delta: float | None = None
    unit: Literal["person", "image"] | None = Field(
        None, description="what is protected: one person (all their photos) or one photo")
    accountant: Literal["prv", "rdp"] | None = None
    noise_multiplier: float | None = Field(None, description="sigma: noise sd / max_norm")
    sample_rate: float | None = Field(None, description="q: the chance of each unit to be in "
                                      "a step (Poisson sampling)")
    steps: int | None = Field(None, description="noisy steps planned")
    steps_done: int | None = Field(None, description="noisy steps taken (the accountant's)")
    units: int | None = Field(None, description="people (or images) trained on")
    max_norm: float | None = Field(None, description="C: each unit's gradient clipped to it")
    expected_batch_size: int | None = Field(None, description="images per step on average "
                                            "(q · images)")
    images: int | None = Field(None, description="training images")
    target_epsilon: float | None = None
    covers: str | None = Field(None, description="what the guarantee covers, and what not")


class TrainMetrics(_Record):
    """The latest epoch's losses and accuracies; once trained, the open-set figures too."""

    train_loss: float | None = None
    train_acc: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    open_set: OpenSetFigures | None = None
    epsilon: float | None = Field(None, description="jobs with privacy: epsilon spent so far")
    privacy: PrivacyRecord | None = Field(None, description="jobs with privacy, once trained: "
                                          "the guarantee")


class Health(BaseModel):
    status: Literal["ok"]


class ReadyChecks(BaseModel):
    database: str = Field(description="'ok', or why it does not answer")
    broker: str = Field(description="'ok', or why it does not answer")


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    detail: str | None = Field(None, description="when unavailable: the parts that do not "
                               "answer")
    checks: ReadyChecks


class IngestProgress(BaseModel):
    done: int = Field(description="files decoded so far (kept or rejected)")
    total: int = Field(description="image files in the upload")


class DatasetOut(BaseModel):
    id: str
    name: str
    created_at: UTCDateTime
    status: Literal["ingesting", "ready", "failed"] = Field(
        description="'ingesting' while its images are decoded, cropped and stored; 'ready' for "
        "training; 'failed' when it cannot be used (`error` says why)")
    progress: IngestProgress
    error: str | None = Field(None, description="why the dataset failed (status 'failed')")
    num_identities: int = Field(description="0 until the dataset is ready")
    num_images: int = Field(description="0 until the dataset is ready")
    identities: dict[str, int] = Field(description="label → number of images (once ready)")
    rejected: dict[str, str] = Field(description="file → why it was not used (so far, while "
                                     "ingesting)")
    detect: Detect
    source_format: str
    warnings: list[str] = []


class DatasetList(BaseModel):
    items: list[DatasetOut]
    total: int


class JobCreate(TrainConfig):
    """A training job: the dataset and any training setting to change from its default."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"dataset_id": "00000000-0000-0000-0000-000000000000",
                      "architecture": "seed_cnn", "epochs": 30, "learning_rate": 0.01,
                      "optimizer": {"name": "sgd", "momentum": 0.0},
                      "clip": {"mode": "norm", "max_norm": 5.0, "scope": "per_tensor"}}]})
    dataset_id: str = Field(pattern=r"^[0-9a-fA-F-]{36}$", description="id of an uploaded dataset")


class Progress(BaseModel):
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps_total: int = 0
    fraction: float = Field(0.0, description="of the training steps done")
    stage: str | None = Field(None, description="what the job does now: 'training', then its "
                              "steps after training ('building the gallery', 'choosing the "
                              "network', 'choosing the descriptor', 'fine-tuning SFace', "
                              "'calibrating', 'refitting SFace on every person', 'saving the "
                              "model'), and 'done' once it succeeded")


class NormStats(BaseModel):
    last: float | None = None
    mean: float | None = None
    max: float | None = None


class ExampleClipping(BaseModel):
    count: int = Field(description="examples (or people, with privacy unit 'person') whose "
                       "gradients were clipped one by one")
    clipped: int = Field(description="how many of them were above max_norm")
    clip_fraction: float
    norm_mean: float | None = Field(None, description="their mean gradient norm before clipping")
    norm_max: float | None = None


class ClippingOut(BaseModel):
    steps: int = 0
    clipped_steps: int = 0
    clip_fraction: float = 0.0
    skipped_steps: int = 0
    zeroed: int = 0
    grad_norm_pre: NormStats = NormStats()
    grad_norm_post: NormStats = NormStats()
    threshold: float | None = None
    examples: ExampleClipping | None = Field(
        None, description="clip mode per_example: the examples (or people) clipped one by one")


class JobOut(BaseModel):
    id: str
    dataset_id: str
    status: JobStatus
    created_at: UTCDateTime
    started_at: UTCDateTime | None
    finished_at: UTCDateTime | None
    config: dict
    progress: Progress
    metrics: TrainMetrics
    clipping: ClippingOut
    checkpoints: list[dict]
    model_id: str | None
    error: str | None
    attempts: int
    resumed_from_epoch: int | None
    cancel_requested: bool
    worker: str | None
    info: dict = Field(default_factory=dict, description="Notes on the run: identities too "
                       "small to split for validation, the failure of an earlier attempt that "
                       "was retried, the processes it trained on.")


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class EpochRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    epoch: int
    train_loss: float | None = None
    train_acc: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    clipping: dict = {}


class JobMetrics(BaseModel):
    job_id: str
    status: JobStatus
    history: list[EpochRecord]


class ModelOut(BaseModel):
    id: str
    job_id: str | None
    dataset_id: str | None
    created_at: UTCDateTime
    architecture: str
    input_size: list[int] = Field(description="[height, width, channels] the model sees")
    labels: list[str]
    metrics: TrainMetrics
    config: dict
    clip: dict
    preprocessing: dict = Field(
        description="how faces are prepared and described: version, store_size, image_size, "
        "normalisation, descriptor (the model's normalised embedding)")
    threshold: float = Field(
        description="the calibrated default open-set threshold on the best identity's score "
        "(open_set.threshold); a request's threshold overrides it")
    open_set: OpenSetFigures = Field(
        description="what calibration measured and chose; fine_tuning for pretrained "
        "architectures, descriptor_choice for descriptor 'auto', held_out: the identities "
        "calibration held out of training")
    detect: Detect
    privacy: PrivacyRecord | None = Field(
        None, description="a model trained with privacy: its weights' (epsilon, delta) "
        "guarantee; null: no guarantee")


class ModelList(BaseModel):
    items: list[ModelOut]
    total: int


class Candidate(BaseModel):
    identity: str
    confidence: float = Field(description="the identity's score: cosine similarity to its "
                              "closest enrolled image; 0-1")


class Face(BaseModel):
    box: list[int] | None = Field(description="[x, y, w, h] in the original image, or null")
    identity: str | None = Field(description="null = unknown (best score under threshold)")
    confidence: float = Field(description="the best candidate's score, compared with the "
                              "threshold; 0-1")
    candidates: list[Candidate]


class IdentifyResult(BaseModel):
    filename: str
    faces: list[Face]
    note: str | None = None


class IdentifyOut(BaseModel):
    model_id: str
    threshold: float
    results: list[IdentifyResult]


class VerifyOut(BaseModel):
    model_id: str
    same_person: bool
    similarity: float = Field(description="cosine similarity of the two faces' embeddings")
    threshold: float = Field(description="the similarity threshold (applied when basis is "
                             "'similarity')")
    basis: Literal["identity", "similarity"] = Field(
        description="'identity': both faces were identified and the answer is whether they are "
        "the same enrolled person; 'similarity': the similarity was compared with the threshold")
    identities: list[str | None] = Field(
        description="each face's identity at the model's identify threshold (null: unknown)")


class IdentityList(BaseModel):
    model_id: str
    identities: dict[str, int] = Field(description="identity → number of enrolled images")


class SweepCreate(BaseModel):
    """A sweep: one job per combination of the grid's values, each the base with them set."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"name": "clip modes", "base": {
            "dataset_id": "00000000-0000-0000-0000-000000000000", "architecture": "seed_cnn",
            "epochs": 30, "image_size": 64},
            "grid": {"clip": [{"mode": "none"},
                              {"mode": "norm", "max_norm": 5.0, "scope": "per_tensor"},
                              {"mode": "threshold", "alpha": 0.9}],
                     "seed": [0, 1, 2]},
            "metric": "val_acc"}]})
    name: str = Field(min_length=1, max_length=200)
    base: Annotated[dict[str, Any], documented_as(JobCreate)] = Field(
        description="a job body as POST /v1/jobs takes it, with dataset_id; the fields the grid "
        "does not set")
    grid: Annotated[dict[str, Any],
                    documented_as(dict[str, Annotated[list[Any], Field(min_length=1)]])] = Field(
        default_factory=dict,
        description="job field → non-empty list of values; one job per combination "
        "(their product, at most FACEGRAD_MAX_SWEEP_JOBS). Any job field but dataset_id; "
        "'seed' repeats each setting (its runs are averaged on the leaderboard)")
    metric: MetricName = Field(DEFAULT_METRIC, description="the leaderboard's default ranking "
                               "metric")


class SweepProgress(BaseModel):
    jobs: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    fraction: float = Field(description="mean of the jobs' progress fractions (an ended job "
                            "counts 1)")


class SweepOut(BaseModel):
    id: str
    name: str
    created_at: UTCDateTime
    finished_at: UTCDateTime | None
    dataset_id: str
    base: dict
    grid: dict
    metric: str
    status: SweepStatus = Field(description="queued (all jobs queued), running, then once all "
                                "jobs ended: succeeded (all), cancelled (cancel requested), "
                                "failed (none succeeded) or partial")
    cancel_requested: bool
    job_ids: list[str]
    progress: SweepProgress


class SweepList(BaseModel):
    items: list[SweepOut]
    total: int
    limit: int
    offset: int


class MetricStat(BaseModel):
    mean: float | None
    sd: float | None = Field(description="sample standard deviation over the runs (0 for one)")
    n: int = Field(description="runs that have the metric")


class LeaderboardRow(BaseModel):
    setting: dict = Field(description="the grid values of this row's jobs, without seed")
    label: str = Field(description="the setting as compact text, e.g. "
                       "'clip=norm:max_norm=5,scope=per_tensor'")
    runs: int
    succeeded: int
    failed: int
    job_ids: list[str]
    metrics: dict[str, MetricStat]


class Leaderboard(BaseModel):
    sweep_id: str
    status: SweepStatus
    metric: str
    direction: Literal["max", "min"]
    metrics: dict[str, str] = Field(description="metric → its description and direction")
    rows: list[LeaderboardRow] = Field(description="best first by the metric's mean; rows "
                                       "without it last")


class ClipKnob(BaseModel):
    """A clip mode's main parameter, as its config's JSON schema gives it."""

    name: str
    default: float | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    description: str | None = None


class ClipModeOut(BaseModel):
    name: str = Field(description="the clip config's `mode`")
    label: str = Field(description="what the mode does, in one line")
    cli: str = Field(description="a typical setting as the CLI's --clip spells it")
    knob: ClipKnob | None = Field(description="the main parameter (none for 'none')")
    fields: list[str] = Field(description="every parameter of the mode's config (the "
                              "`clip` object of a job), `mode` excepted")


class ClipModeList(BaseModel):
    items: list[ClipModeOut]
