"""Gradient clipping engine: arithmetic of every mode, dispatch, state and telemetry."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import TypeAdapter
from torch import nn

from facegrad.clipping import (
    AGCClipper,
    AutoClipClipper,
    Clipper,
    ClipResult,
    ClipTelemetry,
    NormClipper,
    ThresholdClipper,
    ValueClipper,
    build_clipper,
)
from facegrad.training.config import (
    ClipAGC,
    ClipAutoClip,
    ClipConfig,
    ClipNone,
    ClipNorm,
    ClipThreshold,
    ClipValue,
)

T = torch.tensor
EPS = 1e-6


def params_with(*grads) -> list[nn.Parameter]:
    out = []
    for g in grads:
        g = None if g is None else torch.as_tensor(g, dtype=torch.float32).clone()
        p = nn.Parameter(torch.zeros(2) if g is None else torch.zeros_like(g))
        p.grad = g
        out.append(p)
    return out


def l2(params) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))


def close(a, b, rtol=1e-6, atol=1e-7):
    torch.testing.assert_close(
        torch.as_tensor(a).float(), torch.as_tensor(b).float(), rtol=rtol, atol=atol
    )


def norm_clipper(**kw):
    return build_clipper(ClipNorm(mode="norm", **kw), nn.Identity())


def result(pre, post, clipped=False, zeroed=0, thr=math.nan) -> ClipResult:
    pre = T(float(pre))
    return ClipResult(pre, T(float(post)), T(clipped), T(zeroed), torch.isfinite(pre), T(thr))


# ---------------------------------------------------------------- value


def test_value_clamps_each_element():
    ps = params_with([0.5, -2.0, 3.0], [[-0.25, 1.0]])
    r = build_clipper(ClipValue(mode="value", clip_value=1.0), nn.Identity())(ps)
    assert ps[0].grad.tolist() == [0.5, -1.0, 1.0]
    assert ps[1].grad.tolist() == [[-0.25, 1.0]]
    assert bool(r.clipped) and bool(r.finite)
    close(r.norm_pre, math.sqrt(0.25 + 4 + 9 + 0.0625 + 1))
    close(r.norm_post, math.sqrt(0.25 + 1 + 1 + 0.0625 + 1))
    assert int(r.zeroed) == 0 and math.isnan(float(r.threshold))


def test_value_within_range_does_not_fire():
    ps = params_with([0.5, -1.0], [1.0])  # |g| == clip_value is not clipping
    r = ValueClipper(ClipValue(mode="value", clip_value=1.0))(ps)
    assert ps[0].grad.tolist() == [0.5, -1.0] and not bool(r.clipped)
    assert float(r.norm_pre) == float(r.norm_post)


# ---------------------------------------------------------------- norm


def test_norm_global_and_per_tensor_differ():
    # tensor norms 1 and 10; global norm sqrt(101)
    grads = ([0.6, 0.8], [6.0, 8.0])
    ps = params_with(*grads)
    r = norm_clipper(max_norm=5.0)(ps)
    coef = 5.0 / (math.sqrt(101) + EPS)
    close(ps[0].grad, [0.6 * coef, 0.8 * coef])
    close(ps[1].grad, [6 * coef, 8 * coef])
    close(r.norm_pre, math.sqrt(101))
    close(r.norm_post, 5.0)
    assert float(r.threshold) == 5.0 and bool(r.clipped)

    ps = params_with(*grads)
    r = norm_clipper(max_norm=5.0, scope="per_tensor")(ps)
    assert torch.equal(ps[0].grad, T([0.6, 0.8]))  # untouched
    close(ps[1].grad, [3.0 * 10 / (10 + EPS), 4.0 * 10 / (10 + EPS)])
    close(r.norm_post, math.sqrt(1 + 25))
    close(r.norm_post, l2(ps))
    assert bool(r.clipped) and math.isnan(float(r.threshold))


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("max_norm", [5.0, 6.0])
def test_norm_at_or_under_limit_is_untouched(scope, max_norm):
    ps = params_with([3.0, 4.0])
    r = norm_clipper(max_norm=max_norm, scope=scope)(ps)
    assert ps[0].grad.tolist() == [3.0, 4.0]
    assert not bool(r.clipped) and float(r.norm_post) == 5.0


def test_norm_p1_and_inf():
    ps = params_with([1.0, -2.0], [3.0])  # L1 6, Linf 3, L2 sqrt(14)
    r = norm_clipper(max_norm=3.0, norm_type=1.0)(ps)
    c = 3.0 / (6.0 + EPS)
    close(ps[0].grad, [c, -2 * c])
    close(ps[1].grad, [3 * c])
    close(r.norm_pre, math.sqrt(14))
    close(r.norm_post, math.sqrt(14) * c)

    ps = params_with([1.0, -2.0], [3.0])
    r = norm_clipper(max_norm=1.5, norm_type="inf")(ps)
    c = 1.5 / (3.0 + EPS)
    close(ps[0].grad, [c, -2 * c])
    close(ps[1].grad, [3 * c])
    assert float(r.threshold) == 1.5

    ps = params_with([1.0, -2.0], [3.0])
    norm_clipper(max_norm=2.5, norm_type="inf", scope="per_tensor")(ps)
    assert ps[0].grad.tolist() == [1.0, -2.0]
    close(ps[1].grad, [2.5 * 3 / (3 + EPS)])


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_norm_global_matches_torch(p):
    torch.manual_seed(int(p) if p != math.inf else 7)
    grads = [torch.randn(17, 5) * 3, torch.randn(5), torch.randn(2, 3, 4)]
    ours = params_with(*grads)
    ref = params_with(*grads)
    r = norm_clipper(max_norm=0.5, norm_type="inf" if p == math.inf else p)(ours)
    total = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type=p)
    for a, b in zip(ours, ref, strict=True):
        close(a.grad, b.grad)
    assert bool(r.clipped)
    if p == 2.0:
        close(r.norm_pre, total)
        close(r.norm_post, 0.5, rtol=1e-5)
    close(r.norm_post, l2(ours), rtol=1e-5)


def test_value_matches_torch():
    torch.manual_seed(1)
    grads = [torch.randn(9, 4), torch.randn(3)]
    ours, ref = params_with(*grads), params_with(*grads)
    r = build_clipper(ClipValue(mode="value", clip_value=0.7), nn.Identity())(ours)
    torch.nn.utils.clip_grad_value_(ref, 0.7)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a.grad, b.grad)
    close(r.norm_post, l2(ours), rtol=1e-5)


# ---------------------------------------------------------------- threshold


def test_threshold_global_strict():
    ps = params_with([1.0, -4.0, 2.0], [0.5, -1.0])
    r = build_clipper(ClipThreshold(mode="threshold", alpha=0.5), nn.Identity())(ps)
    # T = 0.5 * 4 = 2; only |-4| > 2 (2 itself stays: strictly greater)
    assert ps[0].grad.tolist() == [1.0, 0.0, 2.0]
    assert ps[1].grad.tolist() == [0.5, -1.0]
    assert r.zeroed.dtype == torch.int64 and int(r.zeroed) == 1
    assert float(r.threshold) == 2.0 and bool(r.clipped)
    close(r.norm_post, math.sqrt(1 + 4 + 0.25 + 1))


def test_threshold_per_tensor():
    ps = params_with([1.0, -4.0, 2.0], [0.5, -1.0])
    r = ThresholdClipper(ClipThreshold(mode="threshold", alpha=0.5, scope="per_tensor"))(ps)
    # T = 2 for the first tensor, 0.5 for the second
    assert ps[0].grad.tolist() == [1.0, 0.0, 2.0]
    assert ps[1].grad.tolist() == [0.5, 0.0]
    assert int(r.zeroed) == 2 and math.isnan(float(r.threshold))


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_threshold_alpha_one_zeroes_nothing(scope):
    ps = params_with([1.0, -4.0, 2.0], [0.5, -1.0])
    r = build_clipper(ClipThreshold(mode="threshold", alpha=1.0, scope=scope), nn.Identity())(ps)
    assert ps[0].grad.tolist() == [1.0, -4.0, 2.0] and ps[1].grad.tolist() == [0.5, -1.0]
    assert int(r.zeroed) == 0 and not bool(r.clipped)


# ---------------------------------------------------------------- agc


def agc_model():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(T([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]]))  # row norms 5, 1, 0
        model[0].bias.copy_(T([3.0, 4.0, 0.0]))  # norm 5
        model[2].weight.fill_(0.01)
        model[2].bias.fill_(0.0)
    model[0].weight.grad = T([[0.6, 0.8], [0.0, 2.0], [0.0, 0.01]])
    model[0].bias.grad = T([6.0, 8.0, 0.0])
    model[2].weight.grad = torch.full((2, 3), 100.0)
    model[2].bias.grad = T([50.0, -50.0])
    return model


def test_agc_unitwise_and_exempt_output():
    model = agc_model()
    r = build_clipper(ClipAGC(mode="agc", clip_factor=0.5, eps=1e-3), model)(model.parameters())
    # max_norm per row: 0.5*5 = 2.5, 0.5*1 = 0.5, 0.5*max(0, 1e-3) = 5e-4
    # row 0 is under its limit and stays; rows 1 and 2 are scaled down to theirs
    close(model[0].weight.grad, [[0.6, 0.8], [0.0, 0.5], [0.0, 5e-4]], rtol=1e-5, atol=0)
    assert model[0].weight.grad[0].tolist() == T([0.6, 0.8]).tolist()
    close(model[0].bias.grad, [1.5, 2.0, 0.0])  # 1-D: whole tensor, 10 -> 2.5
    assert torch.equal(model[2].weight.grad, torch.full((2, 3), 100.0))  # exempt output layer
    assert model[2].bias.grad.tolist() == [50.0, -50.0]
    assert bool(r.clipped)
    close(r.norm_post, l2(model.parameters()), rtol=1e-5)


def test_agc_without_exemption_clips_output():
    model = agc_model()
    cfg = ClipAGC(mode="agc", clip_factor=0.5, exempt_output=False)
    build_clipper(cfg, model)(model.parameters())
    # output rows: w norm sqrt(3)*0.01 -> max_norm 0.5*0.01*sqrt(3); grad row norm 100*sqrt(3)
    close(model[2].weight.grad, torch.full((2, 3), 0.005), rtol=1e-5)


def test_agc_output_layer_names_take_precedence():
    class Net(nn.Module):
        def __init__(self, names=("head",)):
            super().__init__()
            self.output_layer_names = list(names)
            self.head = nn.Linear(2, 2)
            self.proj = nn.Linear(2, 2)  # last nn.Linear, but not the output layer

    net = Net()
    for p in net.parameters():
        p.grad = torch.full_like(p, 100.0)
    clipper = build_clipper(ClipAGC(mode="agc"), net)
    assert isinstance(clipper, AGCClipper)
    clipper(net.parameters())
    assert torch.equal(net.head.weight.grad, torch.full((2, 2), 100.0))
    assert net.proj.weight.grad.abs().max() < 1.0

    with pytest.raises(ValueError, match="match no parameter"):
        build_clipper(ClipAGC(mode="agc"), Net(["hea"]))  # prefixes match at "." boundaries


@pytest.mark.parametrize("arch", ["facenet_s", "seed_cnn"])
def test_agc_builds_for_the_service_models(arch):
    """Their output_layer_names end in "." ("classifier."): still matched at the boundary."""
    from facegrad.clipping import output_layer_params
    from facegrad.recognition.architectures import build_model

    model = build_model(arch, 5, 64)
    out = output_layer_params(model)
    assert out and {id(p) for p in out} == {id(p) for p in model.classifier.parameters()}
    assert isinstance(build_clipper(ClipAGC(mode="agc"), model), AGCClipper)


def test_agc_matches_reference_on_random():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 5), nn.Linear(5, 2))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    expected = []
    for p in model.parameters():  # timm's adaptive_clip_grad
        dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
        w = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=dims is not None)
        g = torch.linalg.vector_norm(p.grad, dim=dims, keepdim=dims is not None)
        max_norm = w.clamp(min=1e-3) * 0.05
        expected.append(torch.where(g < max_norm, p.grad, p.grad * max_norm / g.clamp(min=1e-6)))
    expected[-2:] = [model[3].weight.grad.clone(), model[3].bias.grad.clone()]
    build_clipper(ClipAGC(mode="agc", clip_factor=0.05), model)(model.parameters())
    for p, e in zip(model.parameters(), expected, strict=True):
        close(p.grad, e, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- autoclip


def step(clipper, norm):
    ps = params_with([0.6 * norm, 0.8 * norm])
    return clipper(ps), ps[0].grad


def test_autoclip_warmup_then_percentile():
    c = build_clipper(ClipAutoClip(mode="autoclip", percentile=25, warmup_steps=3), nn.Identity())
    for n in (1.0, 2.0, 3.0):  # warm-up: record only
        r, g = step(c, n)
        close(g, [0.6 * n, 0.8 * n])
        assert not bool(r.clipped) and math.isnan(float(r.threshold))
    r, g = step(c, 10.0)  # history [1, 2, 3, 10]: 25th percentile (linear) = 1.75
    assert float(r.threshold) == pytest.approx(1.75, abs=1e-6)
    close(r.norm_post, 1.75 * 10 / (10 + EPS))
    close(g, [0.6 * 1.75, 0.8 * 1.75], rtol=1e-5)
    assert bool(r.clipped)
    r, g = step(c, 1.0)  # history [1, 1, 2, 3, 10]: p25 = 1 -> coef clamps to 1
    assert float(r.threshold) == pytest.approx(1.0, abs=1e-6)
    assert not bool(r.clipped) and float(r.norm_post) == float(r.norm_pre)
    sd = c.state_dict()
    assert sd["count"] == 5
    assert sd["history"][:5].tolist() == pytest.approx([1, 2, 3, 10, 1], rel=1e-6)


def test_autoclip_ring_buffer():
    cfg = ClipAutoClip(mode="autoclip", percentile=50, warmup_steps=0, history_size=3)
    c = AutoClipClipper(cfg)
    for n in (1.0, 2.0, 3.0):
        step(c, n)
    r, _ = step(c, 100.0)  # 1 is overwritten: history {100, 2, 3}, median 3
    assert float(r.threshold) == pytest.approx(3.0, rel=1e-6)
    assert sorted(c.state_dict()["history"].tolist()) == pytest.approx([2, 3, 100], rel=1e-6)


def test_autoclip_state_dict_round_trip():
    cfg = ClipAutoClip(mode="autoclip", percentile=30, warmup_steps=2, history_size=8)
    a = build_clipper(cfg, nn.Identity())
    for n in (4.0, 1.0, 2.5, 7.0):
        step(a, n)
    sd = a.state_dict()
    assert isinstance(sd["count"], int) and json.dumps({"count": sd["count"]})
    assert sd["history"].dtype == torch.float32 and sd["history"].is_contiguous()
    b = build_clipper(cfg, nn.Identity())
    b.load_state_dict({"history": sd["history"].clone(), "count": sd["count"]})
    ra, ga = step(a, 9.0)
    rb, gb = step(b, 9.0)
    assert float(ra.threshold) == float(rb.threshold) and torch.equal(ga, gb)
    assert (
        a.state_dict()["history"].nan_to_num(-1).tolist()
        == b.state_dict()["history"].nan_to_num(-1).tolist()
    )
    small = build_clipper(cfg.model_copy(update={"history_size": 4}), nn.Identity())
    with pytest.raises(ValueError, match="slots"):
        small.load_state_dict(sd)


# ---------------------------------------------------------------- non-finite


def test_nan_gradients_not_recorded_and_not_scaled():
    cfg = ClipAutoClip(mode="autoclip", percentile=50, warmup_steps=0, history_size=4)
    c = build_clipper(cfg, nn.Identity())
    step(c, 2.0)
    before = c.state_dict()
    ps = params_with([float("nan"), 5.0], [3.0])
    r = c(ps)
    assert not bool(r.finite) and not bool(r.clipped)
    after = c.state_dict()
    assert after["count"] == before["count"] == 1
    assert after["history"].nan_to_num(-1).tolist() == before["history"].nan_to_num(-1).tolist()
    assert ps[0].grad[1].item() == 5.0 and ps[1].grad.tolist() == [3.0]


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_inf_gradient_norm_mode(scope):
    ps = params_with([float("inf"), 5.0], [30.0])
    r = norm_clipper(max_norm=1.0, scope=scope)(ps)
    assert not bool(r.finite) and not bool(r.clipped)
    assert ps[0].grad[1].item() == 5.0
    if scope == "global":
        assert ps[1].grad.tolist() == [30.0]  # a non-finite norm scales nothing


def test_none_grads_skipped_and_empty():
    ps = params_with([3.0, 4.0], None)
    r = norm_clipper(max_norm=1.0)(ps)
    assert float(r.norm_pre) == 5.0 and ps[1].grad is None
    r = Clipper()(params_with(None))
    assert float(r.norm_pre) == 0.0 and bool(r.finite) and not bool(r.clipped)


@pytest.mark.parametrize(
    "cfg",
    [
        ClipNone(),
        ClipValue(mode="value"),
        ClipNorm(mode="norm", max_norm=1.0),
        ClipNorm(mode="norm", max_norm=1.0, scope="per_tensor"),
        ClipThreshold(mode="threshold"),
        ClipAGC(mode="agc"),
        ClipAutoClip(mode="autoclip", warmup_steps=0, percentile=1),
    ],
)
def test_results_are_0d_and_norm_post_is_true_norm(cfg):
    torch.manual_seed(0)
    c = build_clipper(cfg, nn.Linear(2, 2))
    for _ in range(3):
        ps = params_with(torch.randn(4, 3) * 3, torch.randn(3))
        r = c(ps)
        for f in ("norm_pre", "norm_post", "clipped", "zeroed", "finite", "threshold"):
            assert getattr(r, f).ndim == 0, f
        assert r.clipped.dtype == r.finite.dtype == torch.bool and r.zeroed.dtype == torch.int64
        close(r.norm_post, l2(ps), rtol=1e-5)
    assert bool(r.clipped) == (cfg.mode != "none")


# ---------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    "data, cls",
    [
        ({"mode": "none"}, Clipper),
        ({"mode": "value", "clip_value": 0.5}, ValueClipper),
        ({"mode": "norm", "max_norm": 5.0, "scope": "per_tensor"}, NormClipper),
        ({"mode": "threshold", "alpha": 0.9}, ThresholdClipper),
        ({"mode": "agc"}, AGCClipper),
        ({"mode": "autoclip", "percentile": 10}, AutoClipClipper),
    ],
)
def test_build_clipper_dispatch(data, cls):
    cfg = TypeAdapter(ClipConfig).validate_python(data)
    c = build_clipper(cfg, nn.Linear(2, 2))
    assert type(c) is cls and c.mode == data["mode"]
    if data["mode"] == "autoclip":
        assert set(c.state_dict()) == {"history", "count"}
    else:
        assert c.state_dict() == {}


def test_dispatch_settings_reach_clippers():
    c = build_clipper(ClipNorm(mode="norm", max_norm=5.0, scope="per_tensor"), nn.Identity())
    assert (c.max_norm, c.scope, c.p) == (5.0, "per_tensor", 2.0)
    c = build_clipper(ClipNorm(mode="norm", norm_type="inf"), nn.Identity())
    assert c.p == math.inf
    ps = params_with([3.0, 4.0])
    r = build_clipper(ClipNone(), nn.Identity())(ps)
    assert ps[0].grad.tolist() == [3.0, 4.0] and float(r.norm_post) == 5.0
    assert not bool(r.clipped)
    with pytest.raises(TypeError):
        build_clipper(object(), nn.Identity())


# ---------------------------------------------------------------- telemetry


def test_telemetry_epoch_and_total():
    tel = ClipTelemetry()
    tel.update(result(3.0, 2.0, clipped=True, thr=2.0))
    tel.update(result(1.0, 1.0, thr=2.0))
    tel.update(result(5.0, 2.5, clipped=True, zeroed=4, thr=2.5))
    tel.update(result(float("nan"), float("nan")))  # skipped; 'last' stays the last finite
    s = tel.epoch_summary()
    assert s == {
        "steps": 4,
        "clipped_steps": 2,
        "clip_fraction": 0.5,
        "skipped_steps": 1,
        "zeroed": 4,
        "grad_norm_pre": {"last": 5.0, "mean": 3.0, "max": 5.0},
        "grad_norm_post": {"last": 2.5, "mean": pytest.approx(5.5 / 3), "max": 2.5},
        "threshold": 2.5,
    }
    assert json.dumps(s)

    tel.update(result(0.5, 0.25, clipped=True))
    s2 = tel.epoch_summary()  # reset: only the new step
    assert s2["steps"] == 1 and s2["clipped_steps"] == 1 and s2["skipped_steps"] == 0
    assert s2["grad_norm_pre"] == {"last": 0.5, "mean": 0.5, "max": 0.5}
    assert s2["threshold"] is None and s2["zeroed"] == 0

    total = tel.total_summary()
    assert total["steps"] == 5 and total["clipped_steps"] == 3 and total["clip_fraction"] == 0.6
    assert total["skipped_steps"] == 1 and total["zeroed"] == 4
    assert total["grad_norm_pre"] == {"last": 0.5, "mean": 9.5 / 4, "max": 5.0}
    assert total["threshold"] == 2.5

    empty = tel.epoch_summary()
    assert empty["steps"] == 0 and empty["clip_fraction"] == 0.0
    assert empty["grad_norm_pre"] == {"last": None, "mean": None, "max": None}


def test_telemetry_state_dict_resumes_totals():
    tel = ClipTelemetry()
    tel.update(result(4.0, 2.0, clipped=True, thr=2.0))
    tel.update(result(float("inf"), float("inf")))
    sd = json.loads(json.dumps(tel.state_dict()))  # includes the unsummarised epoch
    resumed = ClipTelemetry()
    resumed.load_state_dict(sd)
    resumed.update(result(2.0, 2.0))
    total = resumed.total_summary()
    assert total["steps"] == 3 and total["skipped_steps"] == 1 and total["clipped_steps"] == 1
    assert total["grad_norm_pre"] == {"last": 2.0, "mean": 3.0, "max": 4.0}
    assert total["threshold"] == 2.0
    assert resumed.epoch_summary()["steps"] == 1
    with pytest.raises(ValueError):
        ClipTelemetry().load_state_dict({"steps": 1})


def test_telemetry_with_real_clipper():
    tel = ClipTelemetry()
    c = build_clipper(ClipThreshold(mode="threshold", alpha=0.5), nn.Identity())
    tel.update(c(params_with([1.0, -4.0, 2.0])))
    tel.update(c(params_with([1.0])))  # alpha < 1 always zeroes the largest element
    tel.update(c(params_with([0.0, 0.0])))  # T = 0: nothing is > 0
    s = tel.epoch_summary()
    assert s["zeroed"] == 2 and s["clipped_steps"] == 2 and s["threshold"] == 0.0
    assert s["grad_norm_pre"]["max"] == pytest.approx(math.sqrt(21))
    assert s["grad_norm_post"] == {
        "last": 0.0,
        "mean": pytest.approx(math.sqrt(5) / 3),
        "max": pytest.approx(math.sqrt(5)),
    }
