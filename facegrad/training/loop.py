"""The training loop: data → model → clipped steps → checkpoints → trained weights.

Reads top to bottom like a script; ``train`` takes hooks that record progress, metrics and
checkpoints, and a ``should_stop`` for cancellation, and stops at the trained network: the
gallery, calibration and the model artifact are the next steps of a job
(:mod:`facegrad.pipeline`). It knows nothing of HTTP, Celery or the database.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facegrad.clipping import Clipper, build_clipper
from facegrad.clipping.telemetry import ClipTelemetry
from facegrad.data.batches import DeviceBatches, loading_mode, make_batches, stratified_split
from facegrad.data.preprocess import normaliser
from facegrad.data.store import FaceArrays
from facegrad.recognition.architectures import architecture, build_model
from facegrad.recognition.gallery import holdout_identities
from facegrad.recognition.models import forward_logits, plain_logits
from facegrad.training import checkpoint as ckpt
from facegrad.training import distributed, private
from facegrad.training.config import TrainConfig
from facegrad.training.distributed import Rank


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged, bad data); the message is shown to the user."""


class Cancelled(Exception):
    pass


@dataclass
class Hooks:
    on_progress: Callable[[dict], None] = lambda p: None
    on_epoch: Callable[[dict], None] = lambda rec: None
    on_checkpoint: Callable[[Path, int], None] = lambda path, epoch: None
    should_stop: Callable[[], bool] = lambda: False
    on_resume: Callable[[int], None] = lambda epoch: None
    on_stage: Callable[[str], None] = lambda stage: None  # a job's step after training
    progress_interval_s: float = 1.0


@dataclass
class DataSplit:
    """How a run divided the dataset: ``full`` is the whole dataset; the identities in ``held``
    (labels of ``full``) were held out of training; ``trained_on`` is the rest, labels
    renumbered (it shares ``full``'s images), which ``train_idx``/``val_idx`` index;
    ``too_few`` are its classes with too few images to give some to validation."""

    full: FaceArrays
    trained_on: FaceArrays
    held: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    too_few: list[int]


@dataclass
class TrainedModel:
    """What training gives: the trained network (on ``device``), the epochs' records, the
    clipping totals and the split it was trained on."""

    model: torch.nn.Module
    device: torch.device
    history: list[dict]
    clipping: dict
    split: DataSplit
    resumed_from_epoch: int | None = None
    processes: int = 1
    privacy: dict | None = None  # the (epsilon, delta) record of a private run


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' was asked for but this worker has no CUDA GPU")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Weight decay on weights, not on biases and scales; a pretrained backbone's groups learn at
    ``backbone_lr_scale`` of the rate (``lr_scale``, applied by :func:`train_step`)."""
    groups = []
    for scale, named in _by_lr_scale(cfg, model):
        trainable = [p for p in named if p.requires_grad]
        for decay in (True, False):
            ps = [p for p in trainable if (p.ndim > 1) == decay]
            if ps:
                groups.append({"params": ps, "lr_scale": scale,
                               "weight_decay": cfg.optimizer.weight_decay if decay else 0.0})
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=o.momentum,
                               nesterov=o.nesterov)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.learning_rate)


def _by_lr_scale(cfg: TrainConfig, model: torch.nn.Module):
    """[(lr scale, parameters)]: a pretrained model's backbone apart from its new head."""
    if not architecture(cfg.architecture).pretrained:
        return [(1.0, list(model.parameters()))]
    return [(cfg.backbone_lr_scale, list(model.backbone.parameters())),
            (1.0, list(model.classifier.parameters()))]


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Cosine decay after a linear warm-up of 3% of the steps (or the constant rate)."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    warm = max(1, int(0.03 * total))
    if step < warm:
        return cfg.learning_rate * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.learning_rate * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def autocast_dtype(device: torch.device, amp: bool):
    if device.type != "cuda" or not amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class StepParts:
    """What a training step works on: built by ``make_step_parts``, used by ``train_step``."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    clipper: Clipper
    telemetry: ClipTelemetry
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    device: torch.device
    forward: torch.nn.Module  # (x, y) -> (embedding, logits); DistributedDataParallel on a group
    per_example: bool = False  # forward computes per-example gradients (Opacus), clip mode
    # per_example


class TrainForward(torch.nn.Module):
    """The model's training forward, ``(x, y) -> (embedding, logits)`` with the head's margin,
    as one module that DistributedDataParallel can wrap."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return forward_logits(self.model, x, y)


def make_step_parts(cfg: TrainConfig, num_classes: int, device: torch.device,
                    pretrained_dir: Path | None = None, rank: Rank = Rank()) -> StepParts:
    """The model (channels_last on CUDA), optimizer, clipper, telemetry and AMP scaler of a run.

    A pretrained architecture starts from its weights (converted once into ``pretrained_dir``)
    with its first ``freeze_stages`` stages frozen (all of them when ``backbone_lr_scale`` is
    0). On a process group (``rank.world`` > 1) the training forward is wrapped in
    DistributedDataParallel, which starts every rank from rank 0's weights and averages the
    gradients in backward; batch norm becomes SyncBatchNorm on GPUs (PyTorch's SyncBatchNorm
    runs on CUDA only: on the CPU each rank normalises its own share)."""
    model = build_model(cfg.architecture, num_classes, cfg.image_size)
    if architecture(cfg.architecture).pretrained:
        model.backbone.load_state_dict(pretrained_state(pretrained_dir))
        model.freeze(cfg.freeze_stages if cfg.backbone_lr_scale > 0 else 6)
    if rank.world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    per_example = cfg.clip.mode == "per_example"
    if per_example:  # per-example gradients (Opacus), in float32 and on one process
        private.check_model(model, cfg.architecture)
        for m in model.modules():  # Opacus' hooks cannot follow an in-place ReLU
            if isinstance(m, torch.nn.ReLU):
                m.inplace = False
        if rank.world > 1:
            raise TrainingError("clip mode per_example runs on one device (devices 1)")
        forward, amp_dtype = private.wrap(TrainForward(model)), None
    else:
        forward, amp_dtype = distributed.wrap(TrainForward(model), rank), autocast_dtype(
            device, cfg.amp)
    return StepParts(model=model, params=params, opt=make_optimizer(cfg, model),
                     clipper=build_clipper(cfg.clip, model), telemetry=ClipTelemetry(),
                     scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
                     amp_dtype=amp_dtype, device=device, forward=forward,
                     per_example=per_example)


def pretrained_state(pretrained_dir: Path | None) -> dict[str, torch.Tensor]:
    """dlib's face-recognition ResNet's weights as a state dict, converted once into
    ``pretrained_dir`` (the caller's: the service passes ``<data dir>/pretrained``), then read."""
    from safetensors.torch import load_file

    from facegrad.recognition.dlib_resnet import pretrained_weights

    if pretrained_dir is None:
        raise TrainingError("a pretrained architecture needs pretrained_dir: the folder its "
                            "converted weights are kept in")
    return load_file(str(pretrained_weights(Path(pretrained_dir))))


@torch.no_grad()
def imprint_head(model: torch.nn.Module, batches: DeviceBatches, batch_size: int,
                 rank: Rank = Rank()) -> None:
    """The model's cosine head imprinted with each class's training embeddings
    (:meth:`~facegrad.recognition.models.CosineClassifier.imprint`). On a process group each
    rank embeds its share and the sums are added up."""
    model.eval()
    sums = torch.zeros_like(model.classifier.weight)
    for xb, yb in batches.epoch(batch_size, None, augment=False, drop_last=False,
                                shard=rank.shard):
        sums.index_add_(0, yb, model(xb)[0].float())
    distributed.all_reduce(sums, rank)
    model.classifier.imprint(sums)


@torch.no_grad()
def blend_with_pretrained(net: torch.nn.Module, pretrained: dict[str, torch.Tensor],
                          share: float) -> None:
    """Weight-space ensembling (WiSE-FT, Wortsman et al. 2022): every floating-point tensor of
    ``net``'s state (weights and batch-norm statistics) becomes ``(1 - share) * pretrained +
    share * fine-tuned``, ``pretrained`` holding the same names. Fine-tuning from one pretrained
    network stays in one basin of the loss, so the average is a network of its own, not a mix
    of two: on turned faces of people no job saw it keeps most of fine-tuning's gain while
    frontal faces stay as the pretrained network had them (docs/clipping-study.md)."""
    state = net.state_dict()
    for name, tuned in state.items():
        if tuned.is_floating_point():
            base = pretrained[name].to(tuned.device, tuned.dtype)
            tuned.copy_(torch.lerp(base, tuned, share))


def train_step(parts: StepParts, xb: torch.Tensor, yb: torch.Tensor, lr: float):
    """One step: forward, backward, unscale, clip, record telemetry, optimizer step.

    Returns ``(loss, logits, result, ok)``; ``ok`` is False when the loss or the gradient norm
    was not finite, in which case the optimizer did not step (the scaler was still updated so
    a float16 scaler backs off). The model must be in training mode.
    """
    if parts.device.type == "cuda":
        xb = xb.contiguous(memory_format=torch.channels_last)
    for g in parts.opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    amp_dtype = parts.amp_dtype
    if parts.per_example:  # each example's gradient clipped, then averaged (no noise)
        parts.opt.zero_grad(set_to_none=True)
        loss, logits = private.chunk_backward(parts, xb, yb)
        result = parts.clipper(parts.params)
        parts.telemetry.update(result)
        loss = loss / len(yb)
        ok = bool(result.finite) and bool(torch.isfinite(loss))
        if ok:
            parts.opt.step()
        return loss, logits, result, ok
    with torch.autocast(parts.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        _, logits = parts.forward(xb, yb)
        loss = F.cross_entropy(logits.float(), yb)
    parts.opt.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    parts.scaler.unscale_(parts.opt)  # clip true gradients, not scaled ones
    result = parts.clipper(parts.params)
    parts.telemetry.update(result)
    if not bool(result.finite) or not torch.isfinite(loss):
        parts.scaler.update()
        return loss, logits, result, False
    parts.scaler.step(parts.opt)
    parts.scaler.update()
    return loss, logits, result, True


STOP_CHECK_STEPS = 8


def train_epoch(cfg: TrainConfig, parts: StepParts, batches, epoch: int, step: int,
                total_steps: int, hooks: Hooks, progress: dict, rank: Rank = Rank()):
    """The inner loop over one epoch's ``(xb, yb)`` batches → ``(step, loss_sum, correct, seen)``.

    ``loss_sum`` and ``correct`` stay on the device (no per-step host sync); ``progress`` holds
    ``last_report``, the monotonic time of the last ``on_progress`` call, across epochs. On a
    process group a stop asked of rank 0 stops every rank at the same step, and the sums are
    this rank's share.
    """
    device = parts.device
    parts.model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for xb, yb in batches:
        # on a process group every rank must stop at the same step: rank 0's answer is shared
        # every STOP_CHECK_STEPS steps (a collective and a host sync; one process asks each step)
        if ((rank.world == 1 or step % STOP_CHECK_STEPS == 0)
                and distributed.any_rank(hooks.should_stop(), rank)):
            raise Cancelled()
        loss, logits, _, ok = train_step(parts, xb, yb, lr_at(cfg, step, total_steps))
        if not ok:
            if cfg.clip.on_nonfinite == "fail":
                raise TrainingError(
                    f"non-finite {'loss' if not torch.isfinite(loss) else 'gradient norm'} "
                    f"at epoch {epoch + 1}, step {step + 1}; lower the learning rate or clip "
                    "harder (on_nonfinite='skip' skips such steps instead)")
            step += 1
            continue
        loss_sum += loss.detach() * yb.numel()
        # accuracy without the head's margin (the margin only shapes the loss)
        correct += (plain_logits(parts.model, logits.detach(), yb).argmax(1) == yb).sum()
        seen += yb.numel()
        step += 1
        report_progress(cfg, hooks, progress, epoch, step, total_steps)
    return step, loss_sum, correct, seen


def report_progress(cfg: TrainConfig, hooks: Hooks, progress: dict, epoch: int, step: int,
                    total_steps: int) -> None:
    """``hooks.on_progress`` at most every ``progress_interval_s`` (``progress`` holds the
    monotonic time of the last call)."""
    now = time.monotonic()
    if now - progress["last_report"] >= hooks.progress_interval_s:
        progress["last_report"] = now
        hooks.on_progress({"epoch": epoch + 1, "epochs": cfg.epochs, "step": step,
                           "steps_total": total_steps})


def train_private_epoch(cfg: TrainConfig, parts: StepParts, batches, sampler: private.UnitSampler,
                        accountant: private.Accountant, gen: torch.Generator, epoch: int,
                        step: int, total_steps: int, hooks: Hooks, progress: dict):
    """:func:`train_epoch` for DP-SGD: 1/q steps, each over a Poisson sample of units drawn by
    ``sampler``, each recorded by ``accountant`` (a skipped, non-finite step too: its sample
    was drawn)."""
    parts.model.train()
    loss_sum = torch.zeros((), device=parts.device)
    correct = torch.zeros((), device=parts.device, dtype=torch.long)
    seen = 0
    for chunks in sampler.epoch():
        if hooks.should_stop():
            raise Cancelled()
        l_sum, n_right, n, result, ok = private.private_step(
            parts, chunks, batches, gen, cfg.augment, lr_at(cfg, step, total_steps))
        parts.telemetry.update(result)
        accountant.step()
        step += 1
        if not ok and cfg.clip.on_nonfinite == "fail":
            raise TrainingError(f"non-finite loss or gradient at epoch {epoch + 1}, step "
                                f"{step}; lower the learning rate (on_nonfinite='skip' skips "
                                "such steps instead)")
        if ok:
            loss_sum += l_sum
            correct += n_right
            seen += n
        report_progress(cfg, hooks, progress, epoch, step, total_steps)
    return step, loss_sum, correct, seen


@torch.no_grad()
def evaluate(model, batches: DeviceBatches, batch_size: int, amp_dtype,
             rank: Rank = Rank()) -> tuple[float, float]:
    """(mean loss, accuracy) over ``batches``; on a process group each rank evaluates its share
    and the sums are added up."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=rank.device)  # loss, correct, n
    for xb, yb in batches.epoch(batch_size * 2, None, augment=False, drop_last=False,
                                shard=rank.shard):
        with torch.autocast(xb.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            _, logits = forward_logits(model, xb)
        sums[0] += F.cross_entropy(logits.float(), yb, reduction="sum").double()
        sums[1] += (logits.argmax(1) == yb).sum()
        sums[2] += yb.numel()
    loss_sum, correct, n = distributed.all_reduce(sums, rank).tolist()
    return (loss_sum / n, correct / n) if n else (float("nan"), float("nan"))


def train(cfg: TrainConfig, data: FaceArrays, run_dir: Path, hooks: Hooks | None = None,
          resume: Path | None = None, pretrained_dir: Path | None = None,
          dataset_dir: Path | None = None) -> TrainedModel:
    """Train a job on this worker's devices: one process, or a DistributedDataParallel group
    of ``cfg.devices`` (default: every GPU) that this process leads
    (:mod:`facegrad.training.distributed`); the other ranks read the dataset from
    ``dataset_dir`` (``data`` is saved into the run folder for them when it is not given)."""
    device = pick_device(cfg.device)
    try:
        # per-example clipping (and DP-SGD's one noise draw per step) runs in one process:
        # unset devices means one, not every GPU (devices > 1 is refused by the config)
        world = distributed.world_size(
            1 if cfg.clip.mode == "per_example" and cfg.devices is None else cfg.devices, device)
    except distributed.DevicesError as e:
        raise TrainingError(str(e)) from e
    if world == 1:
        return train_rank(cfg, data, run_dir, hooks, resume, pretrained_dir, Rank(0, 1, device))
    run_dir = Path(run_dir)
    if dataset_dir is None:
        dataset_dir = run_dir / "distributed-data"
        data.save(dataset_dir)
    spec = {"config": cfg.model_dump(), "device": device.type, "dataset_dir": str(dataset_dir),
            "run_dir": str(run_dir), "resume": str(resume) if resume else None,
            "pretrained_dir": str(pretrained_dir) if pretrained_dir else None}
    with distributed.group(world, device, spec, run_dir) as rank:
        return train_rank(cfg, data, run_dir, hooks, resume, pretrained_dir, rank)


def train_rank(cfg: TrainConfig, data: FaceArrays, run_dir: Path, hooks: Hooks | None,
               resume: Path | None, pretrained_dir: Path | None,
               rank: Rank) -> TrainedModel | None:
    """The run itself, as one rank of ``rank.world`` (the whole of it when that is 1). Only rank
    0 reports, checkpoints and returns the trained model; the others return None."""
    hooks = hooks or Hooks()
    pretrained = architecture(cfg.architecture).pretrained
    normalise = normaliser(architecture(cfg.architecture).normalisation)
    run_dir = Path(run_dir)
    device = rank.device
    num_classes = len(data.names)
    if num_classes < 2:
        raise TrainingError("training needs at least 2 identities")
    # --- identities held out of training (the strangers that calibrate the open-set
    # threshold), then a seeded stratified split of the rest -----------------------------------
    full = data
    held, data, (train_idx, val_idx, too_few) = split_for_training(cfg, full)
    num_classes = len(data.names)

    # --- data: held on the device as uint8 or streamed --------------------------------------
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    # held on the device ('memory') or read from the stored file batch by batch ('stream', so
    # the worker's memory does not grow with the dataset): cfg.data_loading, 'auto' by the
    # training split's size; validation is loaded the same way
    loading = loading_mode(cfg.data_loading, len(train_idx), cfg.image_size)
    train_set = make_batches(data.images, data.labels, train_idx, cfg.image_size, device,
                             normalise, loading, pin=True)
    val_set = make_batches(data.images, data.labels, val_idx, cfg.image_size, device,
                           normalise, loading)
    drop_last = len(train_set) > cfg.batch_size
    steps_per_epoch = train_set.num_batches(cfg.batch_size, drop_last)
    plan = None
    if cfg.privacy is not None:  # DP-SGD: Poisson-sampled steps, 1/q of them an epoch
        try:
            plan = privacy_plan(cfg, data.labels[train_idx])
        except private.PrivacyError as e:
            raise TrainingError(str(e)) from e
        steps_per_epoch = plan.steps_per_epoch
    total_steps = steps_per_epoch * cfg.epochs

    # --- model, optimizer, clipping -----------------------------------------------------------
    parts = make_step_parts(cfg, num_classes, device, pretrained_dir, rank)
    model, params, opt, clipper, telemetry = (parts.model, parts.params, parts.opt,
                                              parts.clipper, parts.telemetry)
    amp_dtype = parts.amp_dtype
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    start_epoch, step = 0, 0
    accountant = sampler = None
    if plan is not None:
        accountant = private.Accountant(plan)
        sampler = private.UnitSampler(plan, data.labels[train_idx],
                                      cfg.batch_size)
        clipper.set_noise(plan.noise_multiplier, plan.expected_units,
                          private.secret_generator(device))

    # --- resume from the last checkpoint of an interrupted run ---------------------------------
    resumed_from = None
    if resume is not None:
        tensors, meta = ckpt.load(resume, device)
        ckpt.training_state_from_flat(model, opt, clipper, tensors, meta)
        telemetry.load_state_dict(meta["telemetry"])
        gen.set_state(tensors["rng.data"].cpu())
        torch.set_rng_state(tensors["rng.torch"].cpu())
        history = meta["history"]
        start_epoch = resumed_from = meta["epoch"]
        step = meta["step"]
        if accountant is not None:
            accountant.load_state_dict(meta["accountant"])
        hooks.on_resume(resumed_from)
    elif pretrained and cfg.epochs and plan is None:
        # (not under DP: imprinting reads the training images without noise)
        imprint_head(model, train_set, cfg.batch_size * 2, rank)

    def save_checkpoint(epoch: int) -> Path:
        tensors, state_meta = ckpt.training_state_to_flat(model, opt, clipper)
        tensors |= {"rng.data": gen.get_state(), "rng.torch": torch.get_rng_state()}
        meta = {"kind": "resume", "epoch": epoch, "step": step, "config": cfg.model_dump(),
                "telemetry": telemetry.state_dict(), "history": history} | state_meta
        if accountant is not None:
            meta["accountant"] = accountant.state_dict()
        path = ckpt.save(run_dir / "checkpoints" / f"epoch-{epoch:04d}", tensors, meta)
        hooks.on_checkpoint(path, epoch)
        return path

    # --- the loop -------------------------------------------------------------------------------
    progress = {"last_report": 0.0}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        if plan is None:
            batches = train_set.epoch(cfg.batch_size, gen, cfg.augment, drop_last,
                                      shard=rank.shard)
            step, loss_sum, correct, seen = train_epoch(cfg, parts, batches, epoch, step,
                                                        total_steps, hooks, progress, rank)
        else:
            step, loss_sum, correct, seen = train_private_epoch(
                cfg, parts, train_set, sampler, accountant, gen, epoch, step, total_steps,
                hooks, progress)
        sums = torch.stack([loss_sum.double(), correct.double(),
                            torch.tensor(float(seen), dtype=torch.float64, device=device)])
        loss_sum, correct, seen = distributed.all_reduce(sums, rank).tolist()
        seen = int(seen)

        clip_epoch = telemetry.epoch_summary()
        if seen == 0 or not all(torch.isfinite(p).all() for p in params):
            raise TrainingError(
                f"training diverged in epoch {epoch + 1}: every step had non-finite gradients "
                f"({clip_epoch['skipped_steps']} skipped); lower the learning rate or clip harder")
        val_loss, val_acc = evaluate(model, val_set, cfg.batch_size, amp_dtype, rank)
        record = {
            "epoch": epoch + 1, "step": step,
            "train_loss": float(loss_sum) / seen, "train_acc": int(correct) / seen,
            "val_loss": None if math.isnan(val_loss) else val_loss,
            "val_acc": None if math.isnan(val_acc) else val_acc,
            "lr": lr_at(cfg, max(0, step - 1), total_steps),
            "epoch_seconds": time.perf_counter() - t0,
            "clipping": clip_epoch,
        }
        if accountant is not None:  # the whole run's epsilon so far
            record["epsilon"] = accountant.epsilon()
        history.append(record)
        hooks.on_epoch(record | {"clipping_total": telemetry.total_summary()})
        if rank.lead and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs):
            save_checkpoint(epoch + 1)
    if not rank.lead:
        return None
    if pretrained and cfg.epochs and cfg.fine_tuned_share < 1:
        blend_with_pretrained(model.backbone, pretrained_state(pretrained_dir),
                              cfg.fine_tuned_share)

    # the device-resident training copies go now: the gallery that a job builds next would
    # otherwise sit on top of them at the run's memory peak
    del train_set, val_set
    if cfg.epochs > start_epoch and plan is None:
        del batches
    if parts.per_example:
        parts.forward.remove_hooks()  # Opacus' hooks off: the gallery is embedded next
    gc.collect()
    return TrainedModel(model, device, history, telemetry.total_summary(),
                        DataSplit(full, data, held, train_idx, val_idx, too_few),
                        resumed_from, rank.world,
                        plan.record(accountant.epsilon()) | {"steps_done": accountant.steps}
                        if plan is not None else None)


def split_for_training(cfg: TrainConfig, full: FaceArrays):
    """(held, trained_on, (train_idx, val_idx, too_few)): the identities held out of training
    (none for epochs 0: the pretrained network used as it is has seen none of them, all are
    honest strangers), the rest relabelled, and its seeded stratified split."""
    held = holdout_identities(full.labels, cfg.calibration_identities if cfg.epochs else 0,
                              cfg.seed)
    data = without_identities(full, held) if len(held) else full
    return held, data, stratified_split(data.labels, cfg.val_fraction, cfg.seed)


def privacy_plan(cfg: TrainConfig, train_labels: np.ndarray) -> private.PrivacyPlan:
    """The DP-SGD plan (sampling rate, steps, noise) for the training split's labels; raises
    :class:`private.PrivacyError` for settings whose guarantee would not hold."""
    return private.plan(cfg, *private.units_of(cfg, train_labels))


def privacy_plan_for_dataset(cfg: TrainConfig, full: FaceArrays) -> private.PrivacyPlan:
    """:func:`privacy_plan` of the split a job on ``full`` will train on (what the API checks
    before it queues the job); refuses a network whose layers mix a batch's examples."""
    private.check_model(build_model(cfg.architecture, 2, cfg.image_size), cfg.architecture)
    _, data, (train_idx, _, _) = split_for_training(cfg, full)
    return privacy_plan(cfg, data.labels[train_idx])


def without_identities(data: FaceArrays, held: np.ndarray) -> FaceArrays:
    """``data`` less the identities in ``held``: labels renumbered 0..K-1, held images -1.

    The images are the same (memory-mapped) array, not a copy: the split skips label -1.
    """
    keep_ids = [i for i in range(len(data.names)) if i not in set(held.tolist())]
    new_label = np.full(len(data.names), -1, dtype=np.int64)
    new_label[keep_ids] = np.arange(len(keep_ids))
    return FaceArrays(data.images, new_label[data.labels], [data.names[i] for i in keep_ids])
