"""Gradient clipping study on ORL, through the public HTTP API only: writes
docs/clipping-study.md and docs/clipping-study.png.

    .venv/bin/pip install matplotlib        # needed by this script only (the chart)
    facegrad up --workers 2 &
    .venv/bin/python bench/clipping_study.py [--url http://127.0.0.1:8000] [--key KEY]
        [--epochs 30] [--seeds 3] [--dlib-epochs 4] [--dlib-seeds 3] [--quick]

It uploads the training part of ORL (../shared/data/att_faces, 40 people x 10 images; the tests'
split, testkit/harness.py orl_split: 3 images per person held out and never uploaded), then:

1. probes unclipped seed_cnn (the origin document's CNN, plain SGD, constant rate) at lr 0.5, 1
   and 2 (one seed, --probe-epochs) and takes the smallest rate that fails or ends near chance
   (val acc < 0.1, chance 0.025) as the "high" rate; probes dlib_resnet fine-tuning the whole
   network (backbone_lr_scale 1, freeze_stages 0, clip none) at lr 0.3, 1 and 3 and takes the
   smallest that clearly hurts (fails, val acc < 0.8 or the pretrained network kept);
2. sweeps the origin's experiment: seed_cnn, SGD without momentum, constant rate, 64x64, every
   clip setting below at lr 0.01 and at the high rate, --seeds seeds each;
3. sweeps the same clip settings fine-tuning dlib_resnet at its high rate.

The sentences in the doc are written from the numbers, so the doc stays true when rerun.
--quick: a smoke run (1 seed, 2 epochs, two settings, one probe rate each).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

try:
    import matplotlib
except ImportError:
    sys.exit("bench/clipping_study.py needs matplotlib for its chart (only this script does): "
             ".venv/bin/pip install matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# _common puts the repository root on sys.path
from _common import CFP_SECTION, ROOT, cpu_model, doc_section  # noqa: E402

from testkit.harness import orl_split, zip_of  # noqa: E402

CHANCE = 1 / 40
TERMINAL = ("succeeded", "failed", "cancelled", "partial")

SETTINGS = [
    ("none", {"mode": "none"}),
    ("value 1", {"mode": "value", "clip_value": 1.0}),
    ("norm 5 per_tensor", {"mode": "norm", "max_norm": 5.0, "scope": "per_tensor"}),
    ("norm 5 global", {"mode": "norm", "max_norm": 5.0, "scope": "global"}),
    ("threshold 0.5", {"mode": "threshold", "alpha": 0.5}),
    ("threshold 0.9", {"mode": "threshold", "alpha": 0.9}),
    ("agc", {"mode": "agc"}),
    ("autoclip", {"mode": "autoclip"}),
]
ORIGIN = "norm 5 per_tensor"
SEED_PROBE = [0.5, 1.0, 2.0]
DLIB_PROBE = [0.3, 1.0, 3.0]


# --- API --------------------------------------------------------------------------------------

class Api:
    def __init__(self, url: str, key: str | None):
        headers = {"X-API-Key": key} if key else {}
        self.c = httpx.Client(base_url=url, timeout=300, headers=headers)

    def get(self, path: str, **params):
        r = self.c.get(path, params=params)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, **kw):
        r = self.c.post(path, **kw)
        if r.status_code >= 400:
            sys.exit(f"POST {path} answered {r.status_code}: {r.text}")
        return r.json()

    def sweep(self, name: str, base: dict, grid: dict) -> str:
        s = self.post("/v1/sweeps", json={"name": name, "base": base, "grid": grid,
                                           "metric": "val_acc"})
        print(f"  sweep {name!r}: {s['id']} ({len(s['job_ids'])} jobs)", flush=True)
        return s["id"]


def wait_all(api: Api, sweeps: dict[str, str], on_done=None, poll: float = 5.0) -> None:
    """Poll the sweeps (name -> id) until every one is finished, printing progress; on_done(name)
    may queue further sweeps (it returns {name: id} to add)."""
    pending, last, t0 = dict(sweeps), "", time.time()
    while pending:
        line = []
        for name, sid in list(pending.items()):
            s = api.get(f"/v1/sweeps/{sid}")
            p = s["progress"]
            line.append(f"{name}: {p['succeeded'] + p['failed'] + p['cancelled']}/{p['jobs']} "
                        f"({p['running']} running)")
            if s["status"] in TERMINAL and p["queued"] == 0 and p["running"] == 0:
                del pending[name]
                if on_done:
                    pending.update(on_done(name) or {})
        msg = "; ".join(line)
        if msg != last:
            print(f"  [{time.time() - t0:6.0f} s] {msg}", flush=True)
            last = msg
        if pending:
            time.sleep(poll)


def collect(api: Api, sid: str) -> dict:
    lb = api.get(f"/v1/sweeps/{sid}/leaderboard", metric="val_acc")
    jobs = {}
    for row in lb["rows"]:
        for jid in row["job_ids"]:
            jobs[jid] = api.get(f"/v1/jobs/{jid}")
            jobs[jid]["history"] = api.get(f"/v1/jobs/{jid}/metrics")["history"]
    return {"leaderboard": lb, "jobs": jobs}


# --- numbers ----------------------------------------------------------------------------------

def label_of(clip: dict) -> str:
    """The SETTINGS name of a clip config as the server echoes it (defaults filled in)."""
    for name, c in SETTINGS:
        if all(clip.get(k) == v for k, v in c.items()):
            return name
    return str(clip)


def diverged(job: dict) -> bool:
    err = (job.get("error") or "").lower()
    return job["status"] == "failed" and ("diverg" in err or "non-finite" in err)


def final_acc(job: dict) -> float | None:
    v = (job.get("metrics") or {}).get("val_acc")
    return v if job["status"] == "succeeded" and v is not None and math.isfinite(v) else None


def msd(vals: list[float]) -> tuple[float, float, int] | None:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def fmt(v, pct: bool = False, nd: int = 3) -> str:
    if v is None:
        return "-"
    m, s, _ = v
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f} %"
    return f"{m:.{nd}g} ± {s:.2g}" if s else f"{m:.{nd}g}"


def rows_of(data: dict, lr_key: bool) -> list[dict]:
    """One dict per (setting[, lr]) in the SETTINGS order, from the leaderboard and the jobs."""
    out = []
    for row in data["leaderboard"]["rows"]:
        st = row["setting"]
        jobs = [data["jobs"][j] for j in row["job_ids"]]
        m = row["metrics"]
        fine = [((j.get("metrics") or {}).get("open_set") or {}).get("fine_tuning") or {}
                for j in jobs]
        out.append({
            "label": label_of(st.get("clip", {})),
            "lr": st.get("learning_rate", jobs[0]["config"].get("learning_rate")),
            "runs": row["runs"], "succeeded": row["succeeded"], "failed": row["failed"],
            "diverged": sum(diverged(j) for j in jobs),
            "acc": msd([final_acc(j) for j in jobs]),
            "m": m, "jobs": jobs,
            "skipped": sum((j.get("clipping") or {}).get("skipped_steps") or 0 for j in jobs),
            "kept": sum(f.get("kept") == "fine_tuned" for f in fine),
        })
    order = {name: i for i, (name, _) in enumerate(SETTINGS)}
    out.sort(key=lambda r: (r["lr"] if lr_key else 0, order.get(r["label"], 99)))
    return out


def mstat(r: dict, name: str):
    v = r["m"].get(name)
    if not v or v.get("mean") is None:
        return None
    return v["mean"], v.get("sd") or 0.0, v.get("n", 0)


def table(rows: list[dict], dlib: bool) -> list[str]:
    head = ["setting", "lr", "runs", "ok / failed / diverged", "val acc", "best val loss",
            "epochs to 90 %", "skipped steps", "clip fraction", "grad norm before",
            "grad norm after", "wall s"]
    if dlib:
        head += ["known named", "strangers rejected", "kept fine-tuned"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["label"], f"{r['lr']:g}", str(r["runs"]),
                 f"{r['succeeded']} / {r['failed']} / {r['diverged']}", fmt(r["acc"], pct=True),
                 fmt(mstat(r, "best_val_loss")), fmt(mstat(r, "epochs_to_90pct"), nd=2),
                 str(r["skipped"]), fmt(mstat(r, "clip_fraction"), nd=2),
                 fmt(mstat(r, "grad_norm_pre")), fmt(mstat(r, "grad_norm_post")),
                 fmt(mstat(r, "wall_seconds"), nd=3)]
        if dlib:
            cells += [fmt(mstat(r, "known_named"), pct=True),
                      fmt(mstat(r, "strangers_rejected"), pct=True),
                      f"{r['kept']} of {r['runs']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --- words ------------------------------------------------------------------------------------

def acc_words(r: dict) -> str:
    return fmt(r["acc"], pct=True) if r["acc"] else "no finished run"


def compare(a: dict, b: dict) -> str:
    """'a' vs 'b' on final val acc, with whether the gap exceeds the seeds' spread."""
    if not a["acc"] or not b["acc"]:
        return f"val acc {acc_words(a)} vs {acc_words(b)}"
    gap = a["acc"][0] - b["acc"][0]
    spread = a["acc"][1] + b["acc"][1]
    size = ("within the seeds' spread" if abs(gap) <= spread
            else ("higher" if gap > 0 else "lower") + " by more than the seeds' spread")
    return f"val acc {acc_words(a)} vs {acc_words(b)} ({100 * gap:+.1f} points, {size})"


def finite_runs(r: dict) -> int:
    return r["runs"] - r["diverged"]


def seed_sentences(rows: list[dict], lrs: list[float], hi: float) -> list[str]:
    s = []
    for lr in lrs:
        at = {r["label"]: r for r in rows if r["lr"] == lr}
        none, orig = at.get("none"), at.get(ORIGIN)
        if not none:
            continue
        t = (f"At lr {lr:g}, unclipped training diverged in {none['diverged']} of "
             f"{none['runs']} runs (failed: {none['failed']})")
        if orig:
            t += (f"; per-tensor norm 5 (the origin's clipnorm) kept {finite_runs(orig)} of "
                  f"{orig['runs']} finite, {compare(orig, none)}")
        s.append(t + ".")
        ranked = sorted((r for r in at.values() if r["acc"]), key=lambda r: -r["acc"][0])
        if ranked:
            best = ranked[0]
            s.append(f"At lr {lr:g} the best setting by mean val acc was {best['label']} "
                     f"({acc_words(best)}); the worst was {ranked[-1]['label']} "
                     f"({acc_words(ranked[-1])}).")
        never = [r["label"] for r in at.values() if r["diverged"] == 0 and r["failed"] == 0]
        bad = [f"{r['label']} ({r['diverged']} of {r['runs']})" for r in at.values()
               if r["diverged"]]
        s.append(f"At lr {lr:g}, no run diverged with: {', '.join(never) or 'none'}"
                 + (f"; runs diverged with: {', '.join(bad)}." if bad else "."))
        fired = [(r["label"], mstat(r, "clip_fraction")) for r in at.values()
                 if r["label"] != "none" and mstat(r, "clip_fraction")]
        if fired:
            parts = ", ".join(f"{lab} {100 * v[0]:.0f} %" for lab, v in fired)
            s.append(f"Share of steps on which clipping fired at lr {lr:g}: {parts}.")
    lo = [r for r in rows if r["lr"] == min(lrs)]
    for alpha in ("threshold 0.5", "threshold 0.9"):
        th = {r["lr"]: r for r in rows if r["label"] == alpha}
        orig = {r["lr"]: r for r in rows if r["label"] == ORIGIN}
        for lr in lrs:
            if lr in th and lr in orig:
                s.append(f"The origin's threshold rule ({alpha}) vs its clipnorm at lr {lr:g}: "
                         f"{compare(th[lr], orig[lr])}; diverged {th[lr]['diverged']} vs "
                         f"{orig[lr]['diverged']} of {th[lr]['runs']}.")
    if lo and hi != min(lrs):
        none_lo = next((r for r in lo if r["label"] == "none"), None)
        orig_lo = next((r for r in lo if r["label"] == ORIGIN), None)
        cf = mstat(orig_lo, "clip_fraction") if orig_lo else None
        if none_lo and orig_lo and cf is not None:
            s.append(f"At the origin's own rate (lr {min(lrs):g}) its clipnorm fired on "
                     f"{100 * cf[0]:.0f} % of steps and {compare(orig_lo, none_lo)} against no "
                     "clipping: " + ("clipping there is close to a no-op."
                                     if cf[0] < 0.05 else "clipping does act at that rate."))
    return s


def dlib_sentences(rows: list[dict], lr: float) -> list[str]:
    at = {r["label"]: r for r in rows}
    none = at.get("none")
    if not none:
        return []
    s = [f"Fine-tuning the whole pretrained network at lr {lr:g}: unclipped, {none['diverged']} "
         f"of {none['runs']} runs diverged and {none['kept']} kept the fine-tuned network "
         f"(val acc {acc_words(none)})."]
    for r in rows:
        if r["label"] == "none":
            continue
        s.append(f"{r['label']}: {finite_runs(r)} of {r['runs']} finite, fine-tuned network kept "
                 f"in {r['kept']}, {compare(r, none)}.")
    ok = [r for r in rows if r["acc"]]
    if ok:
        best = max(ok, key=lambda r: r["acc"][0])
        s.append(f"Best by val acc: {best['label']} ({acc_words(best)}).")
    return s


# --- chart ------------------------------------------------------------------------------------

def curves(r: dict, key: str):
    """Mean over the row's runs of history[key] per epoch (runs that reached that epoch)."""
    per: dict[int, list[float]] = {}
    for j in r["jobs"]:
        for h in j["history"]:
            v = h.get(key) if key != "gnorm" else ((h.get("clipping") or {}).get(
                "grad_norm_pre") or {}).get("mean")
            if v is not None and math.isfinite(v):
                per.setdefault(h["epoch"], []).append(v)
    ep = sorted(per)
    return ep, [statistics.fmean(per[e]) for e in ep]


def chart(panels: list[tuple[str, list[dict], str, bool]], path: Path) -> None:
    n = len(panels)
    cols = 2
    fig, axes = plt.subplots((n + 1) // cols, cols, figsize=(11, 3.6 * ((n + 1) // cols)),
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    colour = {name: cmap(i) for i, (name, _) in enumerate(SETTINGS)}
    for ax, (title, rows, key, log) in zip(axes.flat, panels):
        for r in rows:
            ep, ys = curves(r, key)
            if ep:
                ax.plot(ep, ys, marker=".", lw=1.4, color=colour.get(r["label"]),
                        label=r["label"], ls="--" if r["label"] == "none" else "-")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("grad norm before clipping" if key == "gnorm" else "val acc")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------

def torch_version() -> str:
    try:
        import torch
        return torch.__version__ + " (local)"
    except ImportError:
        return "unknown"


def probe_pick(data: dict, bad) -> tuple[float, list[str], bool]:
    """The smallest probed rate whose run is bad(job); else the largest. Lines for the doc."""
    jobs = sorted(data["jobs"].values(), key=lambda j: j["config"]["learning_rate"])
    lines, pick = [], None
    for j in jobs:
        lr = j["config"]["learning_rate"]
        acc = (j.get("metrics") or {}).get("val_acc")
        ft = (((j.get("metrics") or {}).get("open_set") or {}).get("fine_tuning") or {})
        kept = f", kept {ft['kept']}" if ft.get("kept") else ""
        err = f" ({j['error']})" if j.get("error") else ""
        lines.append(f"| {lr:g} | {j['status']}{err} | "
                     f"{'-' if acc is None else f'{100 * acc:.1f} %'}{kept} |")
        if pick is None and bad(j):
            pick = lr
    found = pick is not None
    return (pick if found else jobs[-1]["config"]["learning_rate"]), lines, found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", default=os.environ.get("FACEGRAD_API_KEY"))
    ap.add_argument("--epochs", type=int, default=30, help="seed_cnn epochs (origin: 30)")
    ap.add_argument("--probe-epochs", type=int, default=5, help="seed_cnn probe epochs")
    ap.add_argument("--dlib-epochs", type=int, default=4, help="dlib_resnet epochs (default 4)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dlib-seeds", type=int, default=None, help="default: --seeds")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epochs, 2 settings")
    ap.add_argument("--md", default=str(ROOT / "docs" / "clipping-study.md"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "clipping-study.png"))
    a = ap.parse_args()
    settings, seed_probe, dlib_probe = SETTINGS, SEED_PROBE, DLIB_PROBE
    if a.quick:
        a.seeds, a.dlib_seeds, a.epochs, a.probe_epochs, a.dlib_epochs = 1, 1, 2, 2, 1
        settings, seed_probe, dlib_probe = [SETTINGS[0], SETTINGS[2]], [1.0], [1.0]
    dlib_seeds = a.dlib_seeds or a.seeds
    t_start = time.time()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    api = Api(a.url, a.key)
    ready = api.c.get("/readyz")
    if ready.status_code != 200:
        sys.exit(f"{a.url}/readyz answered {ready.status_code}: {ready.text}")

    train, test = orl_split()
    n_train = sum(map(len, train.values()))
    print(f"uploading ORL training split: {n_train} images of {len(train)} people "
          f"({sum(map(len, test.values()))} held out, not uploaded)", flush=True)
    ds = api.post("/v1/datasets", files={"file": ("orl-train.zip", zip_of(train))},
                  data={"name": "orl-train (clipping study)", "detect": "auto"})
    clips = [c for _, c in settings]

    seed_base = {"dataset_id": ds["id"], "architecture": "seed_cnn", "image_size": 64,
                 "optimizer": {"name": "sgd", "momentum": 0.0}, "lr_schedule": "constant"}
    dlib_base = {"dataset_id": ds["id"], "architecture": "dlib_resnet", "backbone_lr_scale": 1.0,
                 "freeze_stages": 0, "epochs": a.dlib_epochs}
    print("probing the high learning rates (clip none, seed 0)", flush=True)
    sweeps = {
        "seed probe": api.sweep("seed_cnn probe", {**seed_base, "epochs": a.probe_epochs,
                                                   "clip": {"mode": "none"}, "seed": 0},
                                {"learning_rate": seed_probe}),
        "dlib probe": api.sweep("dlib_resnet probe", {**dlib_base, "clip": {"mode": "none"},
                                                      "seed": 0},
                                {"learning_rate": dlib_probe}),
    }
    found: dict = {}

    def on_done(name: str):
        # each probe's main sweep is queued as soon as its probe ends, to keep workers busy
        if name == "seed probe":
            found["seed"] = probe_pick(collect(api, sweeps[name]), lambda j: (
                j["status"] == "failed" or (final_acc(j) or 0) < 4 * CHANCE))
            hi = found["seed"][0]
            print(f"  seed_cnn high rate: {hi:g}", flush=True)
            sweeps["seed_cnn"] = api.sweep("clipping study: seed_cnn",
                                           {**seed_base, "epochs": a.epochs},
                                           {"clip": clips, "learning_rate": [0.01, hi],
                                            "seed": list(range(a.seeds))})
            return {"seed_cnn": sweeps["seed_cnn"]}
        if name == "dlib probe":
            found["dlib"] = probe_pick(collect(api, sweeps[name]), lambda j: (
                j["status"] == "failed" or (final_acc(j) or 0) < 0.8 or (
                    ((j.get("metrics") or {}).get("open_set") or {}).get("fine_tuning")
                    or {}).get("kept") == "pretrained"))
            hi = found["dlib"][0]
            print(f"  dlib_resnet high rate: {hi:g}", flush=True)
            sweeps["dlib_resnet"] = api.sweep("clipping study: dlib_resnet",
                                              {**dlib_base, "learning_rate": hi},
                                              {"clip": clips, "seed": list(range(dlib_seeds))})
            return {"dlib_resnet": sweeps["dlib_resnet"]}
        return None

    wait_all(api, dict(sweeps), on_done)
    print("collecting leaderboards and histories", flush=True)
    seed_data = collect(api, sweeps["seed_cnn"])
    dlib_data = collect(api, sweeps["dlib_resnet"])
    wall = time.time() - t_start

    hi, seed_probe_lines, seed_found = found["seed"]
    dhi, dlib_probe_lines, dlib_found = found["dlib"]
    seed_rows = rows_of(seed_data, lr_key=True)
    dlib_rows = rows_of(dlib_data, lr_key=False)
    lrs = sorted({r["lr"] for r in seed_rows})

    png = Path(a.png)
    panels = [(f"seed_cnn, SGD lr {lr:g}: val acc (mean of {a.seeds} seeds)",
               [r for r in seed_rows if r["lr"] == lr], "val_acc", False) for lr in lrs]
    panels.append((f"dlib_resnet whole network, lr {dhi:g}: val acc (mean of {dlib_seeds})",
                   dlib_rows, "val_acc", False))
    panels.append((f"seed_cnn lr {hi:g}: grad norm before clipping (epoch mean)",
                   [r for r in seed_rows if r["lr"] == hi], "gnorm", True))
    chart(panels, png)

    cmd = "python bench/clipping_study.py " + " ".join(sys.argv[1:])
    md = [
        "# Gradient clipping study: the origin document's claims on ORL",
        "",
        "Generated by `bench/clipping_study.py`; every number and sentence below comes from the "
        "run it describes. Rerun it against any server (`facegrad up --workers 2`) to refresh. "
        "The last section, fine-tuning on CFP's turned faces, is written by "
        "`bench/finetune_sweep.py` in the same way, from its own run.",
        "",
        f"- command: `{cmd}`",
        f"- server: {a.url} (public HTTP API only)",
        f"- date: {started}; wall time of the run: {wall / 60:.1f} min",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch_version()}; "
        f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- data: ORL training split, {n_train} images of {len(train)} people (testkit/harness.py "
        "orl_split; the 120 held-out images were not uploaded); jobs hold out their own "
        "validation images (val_fraction 0.1), which is what val acc measures"
        + ("; dlib_resnet jobs also hold 20 % of the people out as strangers for calibration"
           " (so their val acc is over the remaining people)"),
        f"- chance: {100 * CHANCE:.1f} %. \"diverged\": a run that failed on non-finite values; "
        "\"skipped steps\": steps skipped for non-finite gradients, summed over all runs; other "
        "columns are means ± sd over the runs that succeeded (leaderboard metrics).",
        "",
        "## Learning-rate probe (clip none, seed 0)",
        "",
        f"seed_cnn, SGD without momentum, constant rate, {a.probe_epochs} epochs; high rate = the "
        f"smallest that fails or ends below {400 * CHANCE:.0f} % val acc (near chance):",
        "",
        "| lr | status | val acc |", "| --- | --- | --- |", *seed_probe_lines, "",
        f"Chosen: lr {hi:g}" + ("" if seed_found else " (none of the probed rates failed; the "
                                "largest was taken)") + ".",
        "",
        f"dlib_resnet, whole network (backbone_lr_scale 1, freeze_stages 0), {a.dlib_epochs} "
        "epochs; high rate = the smallest that fails, ends below 80 % val acc or has the "
        "pretrained network restored:",
        "",
        "| lr | status | val acc |", "| --- | --- | --- |", *dlib_probe_lines, "",
        f"Chosen: lr {dhi:g}" + ("" if dlib_found else " (none of the probed rates hurt clearly; "
                                 "the largest was taken)") + ".",
        "",
        f"## seed_cnn (the origin's CNN), SGD momentum 0, constant rate, {a.epochs} epochs, "
        f"64x64, {a.seeds} seeds",
        "",
    ]
    if a.epochs < 30:
        md += [f"Epochs reduced from the origin's 30 to {a.epochs} to fit the time budget on this "
               "machine: accuracies are below what 30 epochs reach.", ""]
    md += table(seed_rows, dlib=False)
    md += ["", f"## dlib_resnet fine-tuned (whole network) at lr {dhi:g}, {a.dlib_epochs} "
           f"epochs, {dlib_seeds} seeds", ""]
    if a.dlib_epochs < 4 or dlib_seeds < a.seeds:
        md += [f"Reduced from the default 4 epochs and {a.seeds} seeds to {a.dlib_epochs} "
               f"epoch(s) and {dlib_seeds} seed(s) to fit the time budget on this machine "
               "(a whole-network epoch of this 29-convolution ResNet takes minutes on CPU).", ""]
    md += table(dlib_rows, dlib=True)
    md += ["", "Known named / strangers rejected: the job's open-set calibration "
           "(`metrics.open_set`); kept fine-tuned: runs whose fine-tuned network beat the "
           "pretrained one on the held-out people (`open_set.fine_tuning.kept`).", "",
           f"![validation accuracy per epoch and gradient norm]({png.name})", "",
           "## What holds of the origin's claims", ""]
    md += [f"- {s}" for s in seed_sentences(seed_rows, lrs, hi)]
    md += [f"- {s}" for s in dlib_sentences(dlib_rows, dhi)]
    md.append("")
    # the section bench/finetune_sweep.py writes at the end of the same doc is kept
    kept = doc_section(Path(a.md), CFP_SECTION)
    Path(a.md).write_text("\n".join(md + kept))
    print(f"wrote {a.md} and {png} ({png.stat().st_size // 1024} KB) in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
