"""Differentially private training (DP-SGD, Abadi et al. 2016) on Opacus.

Each step draws units (people, or images) by Poisson sampling with rate q (Opacus'
``UniformWithReplacementSampler``), computes per-example gradients (Opacus'
``GradSampleModule``), clips each unit's gradient to C and adds Gaussian noise of sd sigma·C
(:class:`facegrad.clipping.per_example.PerExampleClipper`), and records the step with Opacus'
accountant (PRV, Gopi et al. 2021, or RDP, Mironov 2017). sigma is chosen for a target epsilon
by Opacus' ``get_noise_multiplier``.

Sampling and noise draw from generators seeded from the operating system's randomness, not from
the job's ``seed``: an adversary who knows the seed could otherwise regenerate the noise and
subtract it, or know which people each step saw, and the guarantee would be void.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModule, register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.utils.tensor_utils import unfold2d
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn

from facegrad.recognition.dlib_resnet import Affine
from facegrad.recognition.models import CosineClassifier, plain_logits
from facegrad.training.config import TrainConfig

# Opacus' backward hooks on a network whose first layers are frozen: harmless, and once a step
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients",
                        category=UserWarning)


DEFAULT_EXPECTED_BATCH = 256


class PrivacyError(ValueError):
    """Settings under which the guarantee would not hold, or cannot be reached; the message
    says why and what to change (the API answers 422 with it)."""


# --- per-unit gradients ----------------------------------------------------------------------
# With unit 'person' what is clipped is one person's summed gradient. Opacus computes one row
# per photo (``grad_sample``: a copy of the trainable weights per photo, the step's largest
# cost); the rules below compute one row per *person* directly when a chunk's rows are grouped
# by :func:`grouped_rows` (for a convolution or linear layer, the person's photos and
# positions together are one matrix product), and fall back to Opacus' per-photo rule
# otherwise. ``GradSampleModule`` sizes its buffer by the rows a rule returns
# (``max_batch_len``), so the rows are the units.

_GROUPS: tuple[torch.Tensor, list[tuple[int, int]]] | None = None  # (unit of each row, spans)


class grouped_rows:  # noqa: N801 (a context manager, used like a function)
    """Within this block, per-sample gradient rules return one row per unit: ``units`` gives
    each row's unit, rows of a unit contiguous and units numbered 0.. in order."""

    def __init__(self, units: torch.Tensor):
        counts = torch.bincount(units.cpu()).tolist()
        ends = np.cumsum(counts).tolist()
        self.groups = (units, list(zip([0, *ends[:-1]], ends, strict=True)))

    def __enter__(self):
        global _GROUPS
        _GROUPS = self.groups
        return self

    def __exit__(self, *exc):
        global _GROUPS
        _GROUPS = None


def _per_unit(per_sample):
    """A grad sampler that sums ``per_sample``'s rows by unit (inside :class:`grouped_rows`)."""

    def rule(layer, activations, backprops):
        out = per_sample(layer, activations, backprops)
        if _GROUPS is None:
            return out
        units, spans = _GROUPS
        layer.max_batch_len = len(spans)
        return {p: g.new_zeros((len(spans), *g.shape[1:])).index_add_(0, units.to(g.device), g)
                for p, g in out.items()}

    return rule


def _conv_or_linear_rule(per_sample):
    """Per unit, a convolution's (or linear layer's) weight gradient is one matrix product over
    the unit's rows and positions: sum_i sum_q b_iq a_iq^T, never a copy per photo."""

    def rule(layer, activations, backprops):
        plain = isinstance(layer, nn.Linear) or (
            type(layer) is nn.Conv2d and layer.groups == 1 and not isinstance(layer.padding, str))
        if _GROUPS is None or not plain:
            return _per_unit(per_sample)(layer, activations, backprops)
        units, spans = _GROUPS
        x = activations[0].to(backprops.dtype)
        n = x.shape[0]
        if isinstance(layer, nn.Conv2d):
            a = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding,
                         stride=layer.stride, dilation=layer.dilation)  # (n, in*k*k, q)
            b = backprops.reshape(n, backprops.shape[1], -1)  # (n, out, q)
            a, b = a.transpose(1, 2), b.transpose(1, 2)  # (n, q, .)
        else:
            a = x.reshape(n, -1, x.shape[-1])
            b = backprops.reshape(n, -1, backprops.shape[-1])
        out = {}
        if layer.weight.requires_grad:
            out[layer.weight] = torch.stack([
                b[s:e].reshape(-1, b.shape[-1]).t() @ a[s:e].reshape(-1, a.shape[-1])
                for s, e in spans]).view(len(spans), *layer.weight.shape)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = b.sum(1).new_zeros((len(spans), b.shape[-1])).index_add_(
                0, units.to(b.device), b.sum(1))
        layer.max_batch_len = len(spans)
        return out

    return rule


register_grad_sampler(nn.Linear)(_conv_or_linear_rule(compute_linear_grad_sample))
register_grad_sampler(nn.Conv2d)(_conv_or_linear_rule(compute_conv_grad_sample))


# --- per-sample gradient rules for this project's layers (Opacus has none for them) ----------

def _affine_grad_sample(layer: Affine, activations: list[torch.Tensor], backprops: torch.Tensor):
    """y = x · w[c] + b[c] per channel: dL/dw[c] = sum over pixels of x·g, dL/db[c] of g."""
    x = activations[0].to(backprops.dtype)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = torch.einsum("nchw,nchw->nc", x, backprops)
    if layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


def _cosine_grad_sample(layer: CosineClassifier, activations: list[torch.Tensor],
                        backprops: torch.Tensor):
    """logits = s · (e · w_k / |w_k| - margin): per example, dL/dw_k = s · g_k · (e - ŵ_k (ŵ_k · e))
    / |w_k| (the margin is a constant; the row normalisation's Jacobian projects out ŵ_k)."""
    if not layer.weight.requires_grad:
        return {}
    e = activations[0].to(backprops.dtype)  # (n, d)
    w = layer.weight
    norm = w.norm(dim=1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps
    w_hat = w / norm
    proj = e @ w_hat.t()  # (n, k): ŵ_k · e
    g = backprops * layer.scale  # (n, k)
    per = torch.einsum("nk,nd->nkd", g, e) - torch.einsum("nk,kd->nkd", g * proj, w_hat)
    return {w: per / norm}


register_grad_sampler(Affine)(_per_unit(_affine_grad_sample))
register_grad_sampler(CosineClassifier)(_per_unit(_cosine_grad_sample))


# --- the plan: sampling rate, steps and noise, fixed before training ---------------------------

@dataclass
class PrivacyPlan:
    """What the accountant is told: ``units`` (N people or images) drawn with probability
    ``sample_rate`` (q) in each of ``steps`` steps, noise ``noise_multiplier`` (sigma)."""

    unit: str
    units: int
    images: int
    sample_rate: float
    steps_per_epoch: int
    steps: int
    noise_multiplier: float
    delta: float
    accountant: str
    max_norm: float
    target_epsilon: float | None
    expected_batch_size: int | None = None  # images per step on average (q · images)

    @property
    def expected_units(self) -> float:
        return self.sample_rate * self.units

    def record(self, epsilon: float | None = None) -> dict:
        """The job's and the model's ``privacy`` record."""
        out = asdict(self)
        out["epsilon"] = epsilon
        out["mechanism"] = ("DP-SGD: Poisson-sampled " + self.unit + "s, each one's gradient "
                            "clipped to max_norm, Gaussian noise of sd noise_multiplier * "
                            "max_norm on the sum")
        return out


def check_model(model: torch.nn.Module, architecture: str) -> None:
    """Refuse a network whose layers mix the examples of a batch (batch norm): one person's
    photo would then change every other example's gradient, and clipping each one would bound
    nothing (Opacus' ModuleValidator lists such layers)."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        kinds = sorted({type(e).__name__ for e in errors})
        raise PrivacyError(
            f"architecture {architecture!r} cannot clip per example: "
            f"{'; '.join(str(e) for e in errors[:2])} ({', '.join(kinds)}). Batch norm mixes "
            "the examples of a batch, so no one example's influence is bounded; use "
            "dlib_resnet (its per-channel affine layers are per-example) or a network with "
            "group norm")


def plan(cfg: TrainConfig, units: int, images: int) -> PrivacyPlan:
    """The sampling rate, steps and noise for ``cfg`` on ``units`` people (or images) holding
    ``images`` training photos. q = expected batch / images, so a step holds that many images on
    average (``expected_batch_size``; unset: 256, at most a quarter of the images); an epoch
    is 1/q steps (Opacus' convention). Raises :class:`PrivacyError`."""
    p = cfg.privacy
    if p is None:
        raise ValueError("no privacy settings")
    if units < 2:
        raise PrivacyError(f"privacy needs at least 2 {p.unit}s to train on, the dataset gives "
                           f"{units}")
    batch = p.expected_batch_size or min(DEFAULT_EXPECTED_BATCH, images // 4)
    q = batch / images
    if q >= 1 or batch < 1:
        raise PrivacyError(
            f"expected_batch_size {batch} is not smaller than the {images} training images: "
            "Poisson sampling, which the accountant's epsilon assumes, needs a sampling rate "
            "below 1; lower privacy.expected_batch_size")
    if p.delta >= 1 / units:
        raise PrivacyError(
            f"delta {p.delta:g} is not below 1 / {units} {p.unit}s: such a guarantee allows "
            f"one {p.unit}'s data to be given away whole; use delta <= {0.1 / units:.2g}")
    steps_per_epoch = max(1, int(1 / q))
    steps = steps_per_epoch * cfg.epochs
    sigma = p.noise_multiplier
    if sigma is None:
        try:
            sigma = get_noise_multiplier(target_epsilon=p.target_epsilon, target_delta=p.delta,
                                         sample_rate=q, steps=steps, accountant=p.accountant)
        except ValueError as e:
            raise PrivacyError(
                f"target_epsilon {p.target_epsilon:g} cannot be reached with q={q:.4g} over "
                f"{steps} steps at delta {p.delta:g} ({e}); raise target_epsilon, or train "
                "fewer epochs or with a smaller expected_batch_size") from None
    return PrivacyPlan(p.unit, units, images, q, steps_per_epoch, steps, float(sigma), p.delta,
                       p.accountant, cfg.clip.max_norm, p.target_epsilon, batch)


def units_of(cfg: TrainConfig, labels: np.ndarray) -> tuple[int, int]:
    """(units, images) that ``plan`` takes, for the training images' ``labels``."""
    images = len(labels)
    if cfg.privacy is not None and cfg.privacy.unit == "person":
        return len(np.unique(labels)), images
    return images, images


class Accountant:
    """Opacus' accountant of the run: one entry per noisy step, kept in checkpoints so that a
    resumed job's epsilon covers the whole run."""

    def __init__(self, plan: PrivacyPlan):
        self.plan = plan
        self.inner = create_accountant(plan.accountant)

    def step(self) -> None:
        self.inner.step(noise_multiplier=self.plan.noise_multiplier,
                        sample_rate=self.plan.sample_rate)

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self.inner.history)

    def epsilon(self) -> float | None:
        if not self.inner.history:
            return 0.0
        return float(self.inner.get_epsilon(delta=self.plan.delta))

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.inner.history]}

    def load_state_dict(self, state: dict) -> None:
        self.inner.history = [tuple(h) for h in state["history"]]


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the operating system's randomness (never stored)."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def wrap(forward: torch.nn.Module) -> GradSampleModule:
    """The training forward with Opacus' per-sample gradient hooks (gradients of a summed loss,
    so each row of ``grad_sample`` is one example's own gradient)."""
    return GradSampleModule(forward, batch_first=True, loss_reduction="sum", strict=False)


class UnitSampler:
    """A step's Poisson sample as chunks of at most ``max_images`` training positions that
    never split a unit: ``(positions, unit of each position within the step, units)``.

    With ``unit`` 'person' a sampled person brings all their training photos, at most
    ``max_images`` of them (a random subset, drawn from the same secret generator)."""

    def __init__(self, plan: PrivacyPlan, labels: np.ndarray, max_images: int):
        self.plan, self.max_images = plan, max_images
        self.gen = secret_generator()
        self.sampler = UniformWithReplacementSampler(
            num_samples=plan.units, sample_rate=plan.sample_rate, generator=self.gen,
            steps=plan.steps_per_epoch)
        if plan.unit == "person":
            people = np.unique(labels)
            self.members = [np.flatnonzero(labels == c) for c in people]
        else:
            self.members = None

    def epoch(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, int]]]:
        for drawn in self.sampler:
            yield self._chunks(drawn)

    def _chunks(self, drawn: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        groups = [np.array([u]) for u in drawn] if self.members is None else [
            self._some(self.members[u]) for u in drawn]
        chunks, cur = [], []
        for g in groups:
            if cur and sum(len(c) for c in cur) + len(g) > self.max_images:
                chunks.append(cur)
                cur = []
            cur.append(g)
        if cur:
            chunks.append(cur)
        return [(torch.from_numpy(np.concatenate(c)),
                 torch.repeat_interleave(torch.arange(len(c)),
                                         torch.tensor([len(g) for g in c])), len(c))
                for c in chunks]

    def _some(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) <= self.max_images:
            return rows
        pick = torch.randperm(len(rows), generator=self.gen)[: self.max_images].numpy()
        return rows[np.sort(pick)]


def chunk_backward(parts, xb: torch.Tensor, yb: torch.Tensor,
                   units: torch.Tensor | None = None, n_units: int | None = None):
    """One chunk of a per-example step: forward, summed loss, backward (one gradient row per
    unit: per image, or per person with ``units``) and clipping into the step's sum.
    Returns ``(summed loss, logits)``."""
    _, logits = parts.forward(xb, yb)
    loss = F.cross_entropy(logits.float(), yb, reduction="sum")
    if units is None or n_units == len(units):  # one image a unit: Opacus' rows as they are
        loss.backward()
    else:  # one row per person, computed as such
        with grouped_rows(units):
            loss.backward()
    parts.clipper.accumulate(parts.params)
    return loss.detach(), logits


def private_step(parts, chunks, batches, gen: torch.Generator, augment: bool, lr: float):
    """One DP-SGD step over a Poisson sample's ``chunks`` (virtual steps): per chunk forward,
    summed loss, backward, per-unit clipping into the step's sum; then noise, the average and
    the optimizer step. Returns ``(loss_sum, correct, seen, result, ok)``."""
    for g in parts.opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    parts.opt.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=parts.device)
    correct = torch.zeros((), device=parts.device, dtype=torch.long)
    seen = 0
    for positions, units, n_units in chunks:
        xb, yb = batches.take(positions, gen, augment)
        loss, logits = chunk_backward(parts, xb, yb, units, n_units)
        loss_sum += loss
        correct += (plain_logits(parts.model, logits.detach(), yb).argmax(1) == yb).sum()
        seen += len(yb)
    result = parts.clipper(parts.params)
    ok = bool(result.finite) and math.isfinite(float(loss_sum))
    if ok:
        parts.opt.step()
    return loss_sum, correct, seen, result, ok
