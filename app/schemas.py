"""Request and response bodies of the v1 API."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from facegrad.service.sweeps import DEFAULT_METRIC, METRICS
from facegrad.training.config import TrainConfig


def _utc(v: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored in UTC): mark them UTC, so that every timestamp
    the API returns carries its offset (RFC 3339 'date-time', as the OpenAPI document says)."""
    return v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v.astimezone(timezone.utc)


UTCDateTime = Annotated[datetime, AfterValidator(_utc)]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Error(BaseModel):
    detail: str | list | dict


class DatasetOut(BaseModel):
    id: str
    name: str
    created_at: UTCDateTime
    num_identities: int
    num_images: int
    identities: dict[str, int] = Field(description="label → number of images")
    rejected: dict[str, str] = Field(description="file → why it was not used")
    detect: str
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
    fraction: float = 0.0


class NormStats(BaseModel):
    last: float | None = None
    mean: float | None = None
    max: float | None = None


class ClippingOut(BaseModel):
    steps: int = 0
    clipped_steps: int = 0
    clip_fraction: float = 0.0
    skipped_steps: int = 0
    zeroed: int = 0
    grad_norm_pre: NormStats = NormStats()
    grad_norm_post: NormStats = NormStats()
    threshold: float | None = None


class JobOut(BaseModel):
    id: str
    dataset_id: str
    status: JobStatus
    created_at: UTCDateTime
    started_at: UTCDateTime | None
    finished_at: UTCDateTime | None
    config: dict
    progress: Progress
    metrics: dict
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
    metrics: dict
    config: dict
    clip: dict
    preprocessing: dict = Field(
        description="how faces are prepared and described: version, store_size, image_size, "
        "normalisation, descriptor (the model's normalised embedding)")
    threshold: float = Field(
        description="the calibrated default open-set threshold on the best identity's score "
        "(open_set.threshold); a request's threshold overrides it")
    open_set: dict = Field(
        description="what calibration measured and chose: threshold, policy (equal_error or "
        "target_fpir), known_named, strangers_rejected, fpir, rank1, tpir_at_fpir_0.05, "
        "verify_threshold, held_out identities, fine_tuning (pretrained architectures)")
    detect: str


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


SweepStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "partial"]
MetricName = Literal[tuple(METRICS)]  # type: ignore[valid-type]


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
    base: dict[str, Any] = Field(
        description="a job body as POST /v1/jobs takes it, with dataset_id; the fields the grid "
        "does not set")
    grid: dict[str, Any] = Field(
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
