"""The CUDA path beside the CPU path, in one run on a machine with a GPU.

    python bench/cuda_check.py [--skip-cpu-job]

Four checks, each printed with MET / MISSED:

1. Clip modes. The default job's network (dlib's pretrained ResNet in ``PretrainedFace``) takes
   one backward pass on the same 16 ORL chips on the CPU and on the GPU, in float32 with TF32
   off, so the two sets of gradients differ only by kernel rounding. Every registered clip mode
   but ``per_example`` (check 3) then clips both sets, with its knob set so that it bites
   (AutoClip's first step cannot: the percentile of one norm is that norm). Bar:
   the clipped gradients differ by at most 1e-3 of their norm, at most 1e-4 of the elements are
   off by more than 1e-3 of their tensor's largest before clipping (a threshold mode may zero
   an element lying within rounding of T on one device only), and both devices agree on
   whether the step was clipped. Never exact equality: the kernels differ.
2. The default job (``TrainConfig()``: fine-tuning, calibration, descriptor choice, saved
   model) on 12 ORL people, once with ``device='cuda'`` (autocast and channels_last, as the
   service runs it) and once on the CPU. Each saved model is loaded as identify loads it
   (``LoadedModel``, on the CPU) and names the 12 people's other photos and rejects 4 strangers.
   Bar: the CUDA-trained model names >= 0.95 and rejects >= 0.95, as the CPU one does in
   tests/test_pretrained.py. The job times are printed side by side (a ratio, same run).
3. A private job (clip mode ``per_example`` with ``privacy``: Opacus' per-sample gradients and
   accountant) on the GPU. Bar: it finishes with examples clipped one by one (its telemetry
   counts them) and an epsilon at most its target.
4. dlib's CNN face detector (``facegrad.recognition.mmod``) on 32 CFP profile photos of one
   size, in one batch on the GPU (TF32 off) and one at a time on the CPU. Bar: the same boxes
   wherever a score is clear of the threshold (1e-3) and scores within 1e-3. The time per
   picture on each is printed (a ratio, same run).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from _common import box_agreement, footer, header, pretrained_dir, sync, table, verdict

import numpy as np  # isort: skip
import torch  # isort: skip

N_IDS = 12


def knobs(grads: list[torch.Tensor]) -> list[dict]:
    """One setting per mode that clips these gradients (the defaults where they already do)."""
    flat = torch.cat([g.flatten() for g in grads])
    pre, top = float(flat.norm()), float(flat.abs().max())
    return [
        {"mode": "none"},
        {"mode": "value", "clip_value": 0.1 * top},
        {"mode": "norm", "max_norm": 0.5 * pre},
        {"mode": "norm", "max_norm": 0.5 * top, "norm_type": "inf"},
        {"mode": "threshold", "alpha": 0.9},
        {"mode": "threshold", "alpha": 0.9, "scope": "per_tensor"},
        {"mode": "agc", "clip_factor": 0.01},
        {"mode": "autoclip", "percentile": 10.0, "warmup_steps": 0},
    ]


def disagreement(got: list[torch.Tensor], want: list[torch.Tensor],
                 unclipped: list[torch.Tensor]) -> tuple[float, float]:
    """(|got - want| / |want| over all elements, the share of elements that differ by more than
    1e-3 of the largest element of their tensor's ``unclipped`` gradient): a comparison by
    scale, since an element near zero can differ by a large factor through rounding alone,
    and by the scale before clipping, which a mode such as AGC shrinks for some tensors only."""
    diff = torch.cat([(g - w).flatten() for g, w in zip(got, want)])
    ref = torch.cat([w.flatten() for w in want])
    scale = torch.cat([torch.full((u.numel(),), float(u.abs().max())) for u in unclipped])
    off = diff.abs() > 1e-3 * scale
    return float(diff.norm() / ref.norm().clamp_min(1e-30)), float(off.float().mean())


def check_clip_modes(chips, device: torch.device) -> bool:
    """Check 1, in float32 with TF32 off on both devices."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _check_clip_modes(chips, device)
    finally:  # the jobs after this check run as the service runs them
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _check_clip_modes(chips, device: torch.device) -> bool:
    from pydantic import TypeAdapter

    from facegrad.clipping import CLIP_MODES, build_clipper
    from facegrad.clipping.modes import clip_config_union
    from facegrad.data.preprocess import to_unit
    from facegrad.recognition.models import PretrainedFace, forward_logits
    from facegrad.training.loop import pretrained_state

    torch.manual_seed(0)
    net = PretrainedFace(N_IDS)
    net.backbone.load_state_dict(pretrained_state(pretrained_dir()))
    x = to_unit(torch.from_numpy(chips.images[:16]).permute(0, 3, 1, 2).contiguous())
    y = torch.from_numpy(chips.labels[:16]).long()
    models = {}
    for key, dev in (("cpu", torch.device("cpu")), ("cuda", device)):
        m = copy.deepcopy(net).to(dev).train()
        logits = forward_logits(m, x.to(dev), y.to(dev))[1]
        torch.nn.functional.cross_entropy(logits, y.to(dev)).backward()
        models[key] = m
    base = {k: [p.grad.detach().clone() for p in m.parameters() if p.grad is not None]
            for k, m in models.items()}
    rel0, off0 = disagreement([g.cpu() for g in base["cuda"]], base["cpu"], base["cpu"])
    print(f"gradients before clipping: |g_cuda - g_cpu| / |g_cpu| = {rel0:.1e}, elements off "
          f"by more than 1e-3 of their tensor's largest: {off0:.1e}")
    adapter = TypeAdapter(clip_config_union())
    rows, ok_all = [], True
    seen = set()
    for setting in knobs(base["cpu"]):
        cfg = adapter.validate_python(setting)
        seen.add(cfg.mode)
        out = {}
        for k, m in models.items():
            params = [p for p in m.parameters() if p.grad is not None]
            for p, g in zip(params, base[k]):
                p.grad.copy_(g)
            res = build_clipper(cfg, m)(params)
            out[k] = ([p.grad.detach().cpu() for p in params], res)
        (g_cpu, r_cpu), (g_gpu, r_gpu) = out["cpu"], out["cuda"]
        rel, off = disagreement(g_gpu, g_cpu, base["cpu"])
        # threshold modes zero the elements above T: an element within rounding of T may fall
        # on either side, so a few elements may differ outright
        close = rel <= 1e-3 and off <= 1e-4
        same_call = bool(r_cpu.clipped) == bool(r_gpu.clipped)
        ok = close and same_call
        ok_all &= ok
        label = ",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in setting.items() if k != "mode")
        rows.append([setting["mode"] + (f" ({label})" if label else ""),
                     bool(r_cpu.clipped), bool(r_gpu.clipped), int(r_cpu.zeroed),
                     int(r_gpu.zeroed), f"{rel:.1e}", f"{off:.1e}", verdict(ok)])
    print(table(["mode (setting)", "clipped cpu", "clipped cuda", "zeroed cpu", "zeroed cuda",
                 "|g_cuda - g_cpu| / |g_cpu|", "elements off", "agree"], rows))
    missing = set(CLIP_MODES) - seen - {"per_example"}
    if missing:
        print(f"modes not checked here: {', '.join(sorted(missing))}")
        ok_all = False
    print(f"clip modes on CUDA agree with the CPU: {verdict(ok_all)}")
    return ok_all


def named_and_rejected(model_dir: Path, test, strangers, names) -> tuple[float, float]:
    from facegrad.recognition.inference import LoadedModel

    lm = LoadedModel(model_dir)
    xt, yt = test
    named = [m[0] for m in lm.match(lm.embed(xt))]
    known = float(np.mean([a == names[i] for a, i in zip(named, yt)]))
    rejected = float(np.mean([m[0] is None for m in lm.match(lm.embed(strangers))]))
    return known, rejected


def check_default_job(chips, test, strangers, device: torch.device, with_cpu: bool) -> bool:
    from facegrad.pipeline import run_training_job
    from facegrad.training.config import TrainConfig

    rows, times, ok = [], [], False
    devices = [device] + ([torch.device("cpu")] if with_cpu else [])
    for k, dev in enumerate(devices):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = run_training_job(TrainConfig(device=dev.type), chips, Path(tmp) / "run",
                                   pretrained_dir=pretrained_dir())
            times.append(time.perf_counter() - t0)
            known, rejected = named_and_rejected(res.model_path.parent, test, strangers,
                                                 chips.names)
        ft = res.open_set.get("fine_tuning", {})
        last = res.history[-1] if res.history else {}
        rows.append([res.info["device"], f"{times[-1]:.1f}", len(res.history),
                     last.get("train_acc"),
                     ft.get("kept"), res.model_meta["preprocessing"]["descriptor"], known,
                     rejected])
        if k == 0:
            ok = known >= 0.95 and rejected >= 0.95 and res.info["device"].startswith(
                device.type)
    print(table(["trained on", "job s", "epochs", "train acc (last)", "network kept",
                 "descriptor", "test photos named", "strangers rejected"], rows))
    if with_cpu:
        print(f"job time cuda / cpu: {times[0] / times[1]:.2f}x")
    print(f"default job trained on CUDA names and rejects >= 0.95: {verdict(ok)}")
    return ok


def check_private_job(chips, test, strangers, device: torch.device) -> bool:
    from facegrad.pipeline import run_training_job
    from facegrad.training.config import TrainConfig

    target = 8.0
    cfg = TrainConfig.model_validate({
        "device": device.type, "epochs": 2,
        "clip": {"mode": "per_example", "max_norm": 1.0},
        "privacy": {"target_epsilon": target, "delta": 1e-3}})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = run_training_job(cfg, chips, Path(tmp) / "run", pretrained_dir=pretrained_dir())
        took = time.perf_counter() - t0
        known, rejected = named_and_rejected(res.model_path.parent, test, strangers,
                                             chips.names)
    priv = res.model_meta.get("privacy") or {}
    eps = priv.get("epsilon")
    per_example = [h["clipping"].get("examples", {}) for h in res.history]
    counted = sum(e.get("count", 0) for e in per_example)
    print(table(["device", "job s", "epsilon (target)", "delta", "examples clipped one by one",
                 "test photos named", "strangers rejected"],
                [[res.info["device"], f"{took:.1f}", f"{eps} ({target})", priv.get("delta"),
                  counted, known, rejected]]))
    ok = eps is not None and 0 < eps <= target and counted > 0 \
        and res.info["device"].startswith(device.type)
    print(f"private job on CUDA finishes within its epsilon: {verdict(ok)}")
    return ok


def check_detector(device: torch.device) -> bool:
    import cv2
    from PIL import Image

    from facegrad.recognition.detect import CNN_FILE, predictor_path
    from facegrad.recognition.mmod import MMODDetector
    from testkit.harness import SHARED_DATA

    files = sorted((SHARED_DATA / "cfp_dev").glob("*/profile_01.jpg"))[:32]
    pics = np.stack([cv2.resize(np.asarray(Image.open(f).convert("RGB")), (240, 320),
                                interpolation=cv2.INTER_AREA) for f in files])
    path = predictor_path(CNN_FILE)
    cpu = MMODDetector.from_file(path)
    dev = MMODDetector.from_file(path).to(device)
    torch.backends.cudnn.allow_tf32 = False
    dev.detect(pics[:2])  # kernels chosen outside the timing
    t = time.perf_counter()
    on_dev = dev.detect(pics)
    sync(device)
    dev_ms = 1e3 * (time.perf_counter() - t) / len(pics)
    t = time.perf_counter()
    on_cpu = [cpu.detect(p)[0] for p in pics]
    cpu_ms = 1e3 * (time.perf_counter() - t) / len(pics)
    same, worst, found = box_agreement(
        ([(d.rect, d.confidence) for d in a], [(d.rect, d.confidence) for d in b])
        for a, b in zip(on_dev, on_cpu))
    ok = same == len(pics) and worst < 1e-3 and found >= len(pics) // 2
    print(f"{len(pics)} CFP profiles at 240x320: the same boxes in {same}, {found} faces on the "
          f"CPU, scores within {worst:.1e}; ms per picture: {device.type} batched {dev_ms:.2f}, "
          f"cpu one at a time {cpu_ms:.1f} ({cpu_ms / dev_ms:.1f}x)")
    print(f"CNN face detector on {device.type} agrees with the CPU: {verdict(ok)}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-cpu-job", action="store_true",
                    help="train the default job on the GPU only (no CPU run beside it)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a dry run of this script on a machine without a GPU (the CPU "
                    "checked against itself)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/cuda_check.py needs a CUDA device (or --device cpu for a dry run)")
    device = torch.device(args.device)
    header("cuda_check: the CUDA path beside the CPU", device)
    from testkit.harness import orl_chips

    chips, test, strangers = orl_chips(N_IDS, 4)  # the split tests/test_pretrained.py uses
    results = {}
    for name, check in (
            ("clip modes", lambda: check_clip_modes(chips, device)),
            ("default job", lambda: check_default_job(chips, test, strangers, device,
                                                      not args.skip_cpu_job)),
            ("private job", lambda: check_private_job(chips, test, strangers, device)),
            ("face detector", lambda: check_detector(device))):
        print(f"\n-- {name}", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = check()
        except Exception as e:  # report and go on: one broken path should not hide the others
            print(f"{name}: failed with {type(e).__name__}: {e}")
            results[name] = False
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    print("\n" + ", ".join(f"{k}: {verdict(v)}" for k, v in results.items()))
    footer()
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
