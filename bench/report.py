"""Run the benchmarks of bench/ at one commit and write docs/benchmarks.md from what they print.

    .venv/bin/python bench/report.py [--only NAME ...] [--skip NAME ...] [--quick] [--no-long]
                                     [--allow-dirty] [--out docs/benchmarks.md] [--list] [-v]

Records the commit (``git rev-parse HEAD``; a working tree with uncommitted changes to tracked
files is refused unless ``--allow-dirty``, and the report then says so), the machine (CPU,
cores, memory, torch and its threads, the CUDA device or none), the load average at the start and
the end, and the date; runs each benchmark of ``BENCHMARKS`` below as a subprocess with its
command line, one after another, and writes one Markdown file: a header, a summary table (bar and
verdict per benchmark), then per benchmark its command, wall time and printed figures.

Verdicts: MET / MISSED from the tokens the script prints (any MISSED: MISSED); where a script
prints its figures but no tokens, ``judge`` applies the bar to its printed figures; "recorded"
where there is no bar (or none judged at the options used); "failed" where the script exits
non-zero (its last lines are shown, and the report is still written); "not run" with the reason
(no CUDA device, not selected, --no-long).

``--quick`` runs every benchmark with its cheapest sensible options (about 15 minutes on a
2-core CPU shared with other work): a check that the benchmarks run, not figures to record.
Progress goes to stderr; ``-v`` also echoes each script's output there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# --- verdicts of scripts that print figures without MET / MISSED ------------------------------

Judgement = tuple[str, str]  # (verdict, detail); verdict "MET", "MISSED" or "recorded"


def kv_line(out: str, prefix: str) -> dict[str, float]:
    """The ``key=value`` pairs of the last line starting with ``prefix`` (nan where not a
    number); {} when there is no such line."""
    lines = [ln for ln in out.splitlines() if ln.startswith(prefix)]
    if not lines:
        return {}
    vals = {}
    for k, v in re.findall(r"(\w+)=(\S+)", lines[-1][len(prefix):]):
        try:
            vals[k] = float(v)
        except ValueError:
            vals[k] = math.nan
    return vals


def row_value(out: str, label: str) -> float:
    """The figure after ``label`` on a ``label   0.970`` line (bench/open_set.py's rows)."""
    m = re.search(rf"^{re.escape(label)}\s+([0-9.]+)\s*$", out, re.M)
    return float(m.group(1)) if m else math.nan


def checks(parts: list[tuple[str, float, str, bool]]) -> Judgement:
    """[(figure's name, figure, condition, ok)] -> a verdict: MISSED if a figure is missing or a
    check fails; the detail reads "ratio 0.935 >= 0.8: MET; ..." (3 significant digits)."""
    detail = "; ".join(f"{name} {'n/a' if v != v else f'{v:.3g}'} {cond}: "
                       f"{'MET' if ok else 'MISSED'}" for name, v, cond, ok in parts)
    met = all(ok and v == v for _, v, _, ok in parts)
    return ("MET" if met else "MISSED"), detail


def judge_peer(out: str) -> Judgement:
    v = kv_line(out, "peer:")
    fg, dl = v.get("facegrad_mean", math.nan), v.get("dlib_mean", math.nan)
    return checks([("facegrad mean", fg, f">= dlib's {dl:.3f}", fg >= dl)])


def judge_identify_speed(out: str) -> Judgement:
    r = kv_line(out, "identify_speed:").get("ratio", math.nan)
    return checks([("ratio", r, ">= 0.8", r >= 0.8)])


def judge_verification(out: str) -> Judgement:
    v = kv_line(out, "verification:")
    g = {k: v.get(k, math.nan) for k in ("fp_tuned", "fp_pretrained", "ff_tuned",
                                         "ff_tuned_at_threshold", "refused")}
    if g["fp_tuned"] != g["fp_tuned"]:
        return "recorded", "the bars judge the fine-tuned network, not trained at these options"
    return checks([
        ("FP", g["fp_tuned"], ">= 0.90", g["fp_tuned"] >= 0.90),
        ("FP", g["fp_tuned"], f">= pretrained + 0.05 = {g['fp_pretrained'] + 0.05:.3f}",
         g["fp_tuned"] >= g["fp_pretrained"] + 0.05),
        ("FF", g["ff_tuned"], ">= 0.99", g["ff_tuned"] >= 0.99),
        ("FF at own threshold", g["ff_tuned_at_threshold"], ">= 0.95",
         g["ff_tuned_at_threshold"] >= 0.95),
        ("refused", g["refused"], "== 0", g["refused"] == 0),
    ])


OPEN_SET_BARS = [  # tests/test_open_set.py's bars, on bench/open_set.py's rows
    ("known identified", 0.98),
    ("strangers rejected", 0.95),
    ("enrolled identified", 0.94),
    ("remaining strangers rejected", 0.95),
    ("verify, known pairs", 0.95),
]


def judge_open_set(out: str) -> Judgement:
    parts = []
    for label, bar in OPEN_SET_BARS:
        v = row_value(out, label)
        parts.append((label, v, f">= {bar:.2f}", v >= bar))
    return checks(parts)


# --- the registry -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Bench:
    name: str
    script: str  # in bench/
    measures: str  # one sentence
    bar: str  # "" for none: figures recorded
    full: tuple[str, ...] = ()  # arguments of a full report
    quick: tuple[str, ...] = ()  # arguments of --quick
    cuda: bool = False  # needs a CUDA device
    long: bool = False  # ten minutes or more at its full arguments on a 2-core CPU
    judge: Callable[[str], Judgement] | None = None  # when the script prints no MET / MISSED
    headline: str = ""  # prefix of the output line shown in the summary table
    noise: tuple[str, ...] = ()  # regexes of progress lines left out of the report
    notes: str = ""  # how to read the section

    def args(self, quick: bool) -> list[str]:
        return list(self.quick if quick else self.full)


BENCHMARKS: list[Bench] = [
    Bench(
        "peer", "peer.py",
        "dlib's own pipeline (detector upsampled once, 5 landmarks, descriptor, nearest image, "
        "tolerance 0.6) beside facegrad's default job on the same splits of ORL and of ORL faces "
        "in harsh-light photos: closed-set accuracy, known named, strangers rejected, enrolled "
        "named, known named at 5 % stranger acceptance.",
        "facegrad's mean of known, rejected, enrolled >= dlib's",
        quick=("--quick",), judge=judge_peer, headline="peer: ",
        notes="Closed set: everyone enrolled from 7 photos, the other 3 asked about. Open set: a "
        "seeded draw of known people and strangers (printed); 3 strangers are then enrolled "
        "from 5 photos and asked about their other 5. known@5%: threshold-free, the share of "
        "known faces named right above the score that only 5 % of the strangers' images exceed. "
        "\"no face\": photos where the side found no face. `--quick`: 12 ORL and 9 photo "
        "people, facegrad trained for 1 epoch."),
    Bench(
        "detection", "detection.py",
        "faces found on bare ORL images, on CFP's frontal and profile photos enlarged 3x, on ORL "
        "faces placed in 640x480 pictures at several sizes and turns, two faces per picture and "
        "noise pictures, by which stage; the eye line's angle error; ms per 640x480 image.",
        "", quick=("--per-cell", "8", "--cfp", "20"), headline="summary: ",
        notes="Stages: detector (HOG), padded (the retry on the image with a replicated border), "
        "cnn (dlib's CNN detector, run in PyTorch, where HOG finds nothing), crop rule (a tight "
        "crop taken as the face). \"eyes deg\": median error of the eye line's angle (from the "
        "landmarks) against the face's turn; \"other\": boxes away from the face. The ms "
        "figures are wall / CPU time of the script's process (dlib runs on one thread): CPU "
        "time is what an idle machine would show. The CNN stage line compares the PyTorch port "
        "with dlib-bin's own detector on the same pictures, one thread each."),
    Bench(
        "identify_speed", "identify_speed.py",
        "identify's per-photo work (detect, align, describe) on 640x480 photos with one face, "
        "this code against the detector of commit 6defaf2 (read with `git show`) in the same "
        "run; pictures with no face timed apart.",
        "ratio >= 0.8", quick=("--photos", "8", "--rounds", "2"), judge=judge_identify_speed,
        headline="identify_speed: ",
        notes="new: this code's `crop_faces` (HOG, then dlib's CNN in PyTorch where HOG finds "
        "nothing) and the flip_mean descriptor; base: `facegrad/recognition/detect.py` as it "
        "was at 6defaf2 (HOG on the grey image, no CNN stage) and the plain embedding. The two "
        "alternate; ratio "
        "= new images/s over base's, on photos with a face. One torch thread."),
    Bench(
        "verification", "verification.py",
        "a pair protocol on CFP (`../shared/data/cfp_dev`): the default job trained on folds "
        "1-4's people, the pretrained network (epochs 0) and dlib's own pipeline, measured on "
        "fold 5's frontal-frontal (FF) and frontal-profile (FP) pairs, through the library.",
        "FP >= 0.90 and >= pretrained + 0.05; FF >= 0.99 (>= 0.95 at the model's threshold); "
        "0 refused",
        quick=("--no-train", "--no-dlib", "--train-folds", "4", "--test-folds", "5"), long=True,
        judge=judge_verification, headline="verification: ",
        notes="Every photo goes through `crop_one` as upload and verify do; a pair scores the "
        "cosine of its two descriptors (dlib: minus their distance). accuracy: per test fold, "
        "at the threshold best on the other test folds (on the fold itself when there is only "
        "one: slightly optimistic); \"at own thr\": at the model's recorded verification "
        "threshold; TAR at FAR 1e-3 is read off the few highest different-person scores (a "
        "coarse figure); refused: pairs with a photo where no face was found. The bars judge "
        "the fine-tuned network. `--quick`: the pretrained network only, calibrated on fold "
        "4's people, on fold 5's pairs."),
    Bench(
        "calibration", "calibration.py",
        "scores by photos per person; the threshold calibrated by half-split enrolment vs "
        "leave-out, applied to real probes (people s01-s20 and s21-s40); the gap between known "
        "faces and strangers before and after fine-tuning.",
        "", quick=("--draws", "2", "--no-finetune"),
        notes="ORL faces and the same people in harsh-light photos, descriptors of the "
        "pretrained network; each draw: 10 known people (7 photos in the gallery, 3 asked "
        "about) and 5 strangers. 1: a known face's score is its best match among its person's "
        "photos, so it rises with their number. 2: \"half\" calibrates with each person "
        "enrolled from half of their photos (how calibration worked before); \"leave-out\" (what "
        "the service does) scores each photo against the gallery less itself and each person "
        "as a stranger to everyone else's full set; the rule was chosen on s01-s20, s21-s40 "
        "confirm it. 3 (not with `--no-finetune`): the gap between held-out people's known "
        "scores (1st percentile) and stranger scores (99th percentile) with the pretrained and "
        "the fine-tuned network of a default job on s01-s30, also in pooled standard "
        "deviations."),
    Bench(
        "descriptor_speed", "descriptor_speed.py",
        "ms per face of facegrad's dlib_resnet (traced and frozen, as identify runs it; batch "
        "1, 8, 32) against dlib's `compute_face_descriptor`, on the same 32 aligned ORL chips; "
        "and the gallery's `flip_mean` and `fused` descriptors (the latter with SFace).",
        "", quick=("--rounds", "2"), headline="descriptor_speed: ",
        notes="Medians over interleaved rounds; \"x dlib\": dlib's time per face (one chip per "
        "call) over the variant's."),
    Bench(
        "train_throughput", "train_throughput.py",
        "images/s of the service's training step (`train_step`) and loop (`train_epoch` over "
        "`DeviceBatches`) against a bare PyTorch loop on the same model, batch 32: seed_cnn "
        "and facenet_s at 64 px, dlib_resnet at 150 px; clip mode none.",
        "service >= 0.95x bare", quick=("--steps", "12"),
        notes="bare: forward, cross-entropy, backward, step over batches already in memory; "
        "service step: `train_step` (learning rate, autocast, clipper, telemetry, finiteness "
        "check, step); service loop: `train_epoch` over a one-batch slice of "
        "`DeviceBatches.epoch` (batch assembly and running metrics too). The three share one "
        "model and optimizer and take one step each in turn; x bare: bare's median step time "
        "over the variant's. dlib_resnet runs a quarter of the steps."),
    Bench(
        "clip_overhead", "clip_overhead.py",
        "training step time per clip mode (none, value, norm global and per_tensor, threshold, "
        "agc, autoclip) relative to none, for facenet_s and seed_cnn.",
        "norm, value <= 1.05x; others <= 1.15x", full=("--threads", "1"),
        quick=("--threads", "1", "--rounds", "3", "--steps", "2"),
        notes="One model and optimizer per architecture, shared by every mode (only the clipper "
        "differs), restored to the same state before each timed run. x none (judged): median "
        "over rounds of the mode's time over mode none's in the same round; clip-only x: "
        "1 + (clipper call - none's) / none's step, from timing the clipper alone on real "
        "gradients, a less noisy estimate of the same ratio."),
    Bench(
        "data_pipeline", "data_pipeline.py",
        "a training epoch's wall time against the compute time of the same steps, "
        "`DeviceBatches` with augmentation on, facenet_s and seed_cnn.",
        "compute >= 0.90 of the epoch", full=("--threads", "1"),
        quick=("--threads", "1", "--rounds", "2"),
        notes="The script's own note under its table says how the two shares are computed; "
        "share (in epoch) is judged on the CPU."),
    Bench(
        "identify_load", "identify_load.py",
        "the real service (redis-server, API, worker): POST /v1/identify with 1, 8 and 32 "
        "concurrent clients, p50/p95/p99 latency and images/s, against `LoadedModel.embed` at "
        "batch 1, 8, 32.",
        "32 clients >= 1.5x one client and >= 0.6x forward-only at batch 32; p99 <= 1.5x one "
        "batch-32 forward",
        full=("--threads", "1"),
        quick=("--threads", "1", "--rounds", "1", "--seconds", "3", "--requests", "200",
               "--epochs", "1"),
        notes="The worker trains a small default model through the API and is then stopped; "
        "each client sends one held-out ORL PNG per request over its own keep-alive "
        "connection; the forward-only rows run in the script's process with the service's "
        "thread count."),
    Bench(
        "queue_latency", "queue_latency.py",
        "POST /v1/jobs until the job is running, idle worker on Redis.",
        "p50 < 1 s", quick=("--jobs", "4", "--idle", "0.5"),
        notes="One job at a time (seed_cnn, 32 px, 1 epoch) with the worker idle: the client "
        "polls every 10 ms until the job runs, then cancels it. Baselines in the same run: the "
        "round trip of the POST and of one GET (the resolution of the measurement)."),
    Bench(
        "worker_memory", "worker_memory.py",
        "peak RSS (VmHWM) of a 1-epoch training run in a subprocess on datasets of 1k and 10k "
        "images synthesised from the ORL faces; growth per 1k images.",
        "< 2 GB at the largest size (10k)", quick=("--sizes", "500", "1000"),
        notes="Each run is a fresh subprocess doing what a worker does for a job (load the "
        "stored dataset, `run_training_job`, default config with facenet_s); the baseline "
        "subprocess only imports and loads."),
    Bench(
        "dataset_scale", "dataset_scale.py",
        "a streaming worker's peak RSS (seed_cnn, data_loading 'stream', 250 steps, then the "
        "gallery and calibration over every image) at 10k and 100k images synthesised from the "
        "ORL faces, and one epoch's training images/s at 10k, `StreamBatches` against "
        "`DeviceBatches`.",
        "rss_ratio_100k_10k <= 1.2, throughput_ratio >= 0.95", full=("--threads", "1"),
        quick=("--threads", "1", "--sizes", "1000", "5000", "--steps", "30", "--rounds", "1"),
        long=True,
        headline="rss_ratio_100k_10k=", noise=(r"^  synthesised ",),
        notes="Each copy of the 400 ORL chips (mirrored, shifted, brightness-scaled) is 40 new "
        "people. The RSS runs hold 5 % of the people out for calibration (the job default is "
        "20 %) to keep the largest run short. The last line keeps its names "
        "(rss_ratio_100k_10k) whatever `--sizes` are."),
    Bench(
        "open_set", "open_set.py",
        "the open-set figures of the default job trained in process on 30 known ORL people, "
        "with 10 strangers.",
        "as tests/test_open_set.py: known identified >= 0.98, strangers rejected >= 0.95, "
        "enrolled >= 0.94, remaining strangers rejected >= 0.95, verify known pairs >= 0.95",
        quick=("--epochs", "1"), judge=judge_open_set,
        notes="Known: 3 held-out images per known person; 5 strangers are then enrolled from 5 "
        "images each and asked about their other 5, the other 5 strangers asked again. The "
        "oracle threshold is the best one in hindsight, for reference only. The bars are the "
        "service test's, applied here by bench/report.py (the script prints no verdict)."),
    Bench(
        "gallery_scale", "gallery_scale.py",
        "identify's search part (`Gallery.search`, one face, top 5) on synthetic galleries of "
        "10k, 100k and 1M face-like descriptors: build seconds, index MB, p50/p99 ms, recall@1 "
        "against exact search, beside the exact index, the dense scoring it replaced and IVF "
        "with nlist 4 sqrt(N); an nprobe sweep.",
        "at 1M: p50 <= 20 ms, recall@1 >= 0.99",
        quick=("--sizes", "10000,100000", "--probes", "200", "--timed", "50"),
        headline="p50_ms_1m=",
        notes="Identities of 1-9 images around a random centre (same-person cosine 0.90, "
        "different people 0.20 +- 0.07); probes are new views of enrolled people. The bar is "
        "judged only when 1M is among the sizes."),
    Bench(
        "ddp_scaling", "ddp_scaling.py",
        "one job over 1 and 2 processes (DistributedDataParallel, gloo; weak scaling) on the "
        "same synthetic faces through `train()`: the second epoch's training images/s, "
        "speed-up and efficiency against one process.",
        "", quick=("--images", "600"), headline="scaling ",
        notes="On the CPU the processes share the cores one process already uses, so this is "
        "the cost of the process group, not a speed-up."),
    Bench(
        "clip_accuracy", "clip_accuracy.py",
        "held-out ORL accuracy (3 per identity) through `LoadedModel`: (a) the default config, "
        "(b) seed_cnn with per-tensor norm clipping and SGD, (c) every clip mode at a low and a "
        "high learning rate (facenet_s, fewer epochs).",
        "(a) >= 97 %, (b) >= 90 %, each < 5 min", quick=("--parts", "a"), long=True,
        notes="Table (c) trains facenet_s for fewer epochs than the default to bound the run "
        "time: its accuracies are below what a full run reaches. \"diverged\": training "
        "stopped on non-finite values or skipped steps. `--quick`: part (a) only."),
    Bench(
        "privacy", "privacy.py",
        "private training (DP-SGD, clip mode per_example) through the library: per-example "
        "clipping and its noise against their definitions, each private run's epsilon against "
        "Google's dp-accounting, a membership-inference attack on CFP people (members vs "
        "non-members) for the non-private fine-tune and private ones at several target "
        "epsilons, their CFP fold 5 and ORL figures, and a DP step's time against a normal "
        "step's.",
        "eps within 2 % of dp-accounting's; MIA AUC at eps 8 <= 0.60 and below the "
        "non-private model's; FF at eps 8 within 0.05 of non-private; DP step <= 2.5x",
        quick=("--quick",), long=True, headline="eps_ratio=",
        notes="Run without `--out-md`: its figures go here like every other benchmark's, and "
        "`docs/privacy.md` (written by `bench/privacy.py --out-md`) is left as it is. The "
        "script also checks that per-example clipping equals a loop over single units and "
        "that the noise's sd is sigma C / expected units; its MET / MISSED lines are the "
        "verdict. MIA AUC is the stronger of the plain and the reference-calibrated attack; "
        "the pretrained network's AUC (about 0.5) is a sanity check. `--quick`: 16 people, 1 "
        "epoch, 3 timing rounds, a check that it runs (its figures mean little)."),
    # the CUDA paths (autocast bf16, or fp16 with the GradScaler; channels_last)
    Bench(
        "train_throughput_cuda", "train_throughput.py",
        "train_throughput on the CUDA device.", "service >= 0.95x bare",
        full=("--device", "cuda"), quick=("--device", "cuda", "--steps", "12"), cuda=True),
    Bench(
        "clip_overhead_cuda", "clip_overhead.py",
        "clip_overhead on the CUDA device.", "norm, value <= 1.05x; others <= 1.15x",
        full=("--device", "cuda"), quick=("--device", "cuda", "--rounds", "3", "--steps", "2"),
        cuda=True),
    Bench(
        "data_pipeline_cuda", "data_pipeline.py",
        "data_pipeline on the CUDA device (share across passes judged).",
        "compute >= 0.90 of the epoch",
        full=("--device", "cuda"), quick=("--device", "cuda", "--rounds", "2"), cuda=True),
    Bench(
        "descriptor_speed_cuda", "descriptor_speed.py",
        "descriptor_speed with facegrad's network on the CUDA device.", "",
        full=("--device", "cuda"), quick=("--device", "cuda", "--rounds", "2"), cuda=True,
        headline="descriptor_speed: "),
    Bench(
        "cuda_check", "cuda_check.py",
        "every clip mode on the same gradients on the GPU and the CPU; the default job and a "
        "private job trained on the GPU, their models identifying ORL photos as identify "
        "loads them; dlib's CNN face detector on the GPU and the CPU.",
        "clip modes agree; jobs name and reject >= 0.95; epsilon <= target; detector boxes agree",
        full=(), quick=("--skip-cpu-job",), cuda=True),
    Bench(
        "ddp_scaling_cuda", "ddp_scaling.py",
        "ddp_scaling over 1, 2, 4, ... up to every GPU (NCCL; dlib_resnet by default).", "",
        full=("--device", "cuda"), quick=("--device", "cuda", "--images", "1000"), cuda=True,
        headline="scaling "),
]
NAMES = {b.name: b for b in BENCHMARKS}


# --- the machine and the code -----------------------------------------------------------------

def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def code_state() -> dict:
    changed = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no")
               .splitlines() if ln.strip()]
    return {"commit": git("rev-parse", "HEAD").strip(),
            "committed": git("log", "-1", "--format=%cd", "--date=iso").strip(),
            "changed": changed,
            "diff": hash(git("diff", "HEAD")) if changed else 0}


def changed_between(start: str, end: dict) -> list[str]:
    """Tracked files that differ between commit ``start`` and the working tree at the end."""
    names = set(git("diff", "--name-only", start, end["commit"]).split())
    return sorted(names | set(end["changed"]))


def is_doc(path: str) -> bool:
    """Prose only: a Markdown file, or anything under docs/ (no benchmark reads them)."""
    return path.endswith(".md") or path.startswith("docs/")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2 ** 20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def fmt_load(load) -> str:
    return " ".join(f"{v:.2f}" for v in load) if load else "n/a"


TORCH_PROBE = """
import json, torch
cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
    if torch.cuda.is_available() else []
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "cuda_version": torch.version.cuda, "cuda": cuda}))
"""


def machine() -> dict:
    """CPU, memory and torch as the benchmarks see them; torch is asked in a child process, so
    that this one holds no CUDA context while the benchmarks run."""
    out = subprocess.run([sys.executable, "-c", TORCH_PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    info = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {
        "torch": "unknown", "threads": "?", "cuda_version": None, "cuda": []}
    info.update(cpu=cpu_model(), cores=os.cpu_count(), memory=memory_gib(),
                python=platform.python_version(), system=f"{platform.system()} "
                f"{platform.release()}")
    return info


# --- running ----------------------------------------------------------------------------------

@dataclass
class Result:
    bench: Bench
    args: list[str]
    status: str = "run"  # run, failed, not run
    why: str = ""  # for not run
    rc: int | None = None
    seconds: float = 0.0
    out: str = ""
    err: str = ""
    verdict: str = ""
    detail: str = ""
    meta: dict = field(default_factory=dict)


def display_python() -> str:
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(ROOT))
    except ValueError:
        return str(exe)


def command(b: Bench, args: list[str]) -> str:
    return shlex.join([display_python(), f"bench/{b.script}", *args])


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_one(b: Bench, args: list[str], echo: bool) -> Result:
    """Run the script, its stdout read line by line (echoed to stderr with ``echo``), its
    stderr kept in a file; the child gets a session of its own so that an interrupt stops
    everything it started."""
    r = Result(b, args)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(BENCH / b.script), *args], cwd=ROOT,
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, text=True,
                                start_new_session=True)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if echo:
                    sys.stderr.write(f"    {line}")
            proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        err.seek(0)
        r.err = err.read()
    r.seconds = time.perf_counter() - t0
    r.out = "".join(lines)
    r.rc = proc.returncode
    r.meta = script_meta(r.out)
    if r.rc != 0:
        r.status, r.verdict = "failed", f"failed (exit status {r.rc})"
        return r
    r.verdict, r.detail = verdict_of(b, r.out)
    return r


def verdict_of(b: Bench, out: str) -> Judgement:
    tokens = re.findall(r"\b(MET|MISSED)\b", out)
    if tokens:
        if "MISSED" not in tokens:
            return "MET", ""
        missed = [" ".join(ln.split()) for ln in out.splitlines() if re.search(r"\bMISSED\b", ln)]
        rows = [ln for ln in missed if not re.match(r"(all bars|bars of|bar \()", ln)]
        return "MISSED", "; ".join((rows or missed)[:4])
    if b.judge:
        return b.judge(out)
    return "recorded", ("" if not b.bar else "no verdict printed at these options")


def script_meta(out: str) -> dict:
    """torch threads and load average from the lines every script prints at its start and end
    (bench/_common.py's header and footer)."""
    meta = {}
    m = re.search(r"^cpu: .*?torch threads: (\d+).*?load average: ([\d.]+)", out, re.M)
    if m:
        meta["threads"], meta["load_start"] = m.group(1), m.group(2)
    m = re.search(r"^load average at the end: ([\d.]+)", out, re.M)
    if m:
        meta["load_end"] = m.group(1)
    return meta


HEADER_LINES = (r"^== .* ==$", r"^date: \d{4}-\d\d-\d\d ", r"^cpu: .*load average: ",
                r"^load average at the end: ")


def figures(b: Bench, out: str) -> str:
    """The script's output without the header and footer lines (summed up above the block) and
    its progress lines; runs of blank lines squeezed."""
    drop = [re.compile(p) for p in HEADER_LINES + b.noise]
    keep: list[str] = []
    for line in out.splitlines():
        line = line.rstrip()
        if any(p.search(line) for p in drop):
            continue
        if not line and (not keep or not keep[-1]):
            continue
        keep.append(line)
    while keep and not keep[-1]:
        keep.pop()
    return "\n".join(keep)


def headline(b: Bench, out: str) -> str:
    if not b.headline:
        return ""
    lines = [ln.strip() for ln in out.splitlines() if ln.startswith(b.headline)]
    if not lines:
        return ""
    text = lines[-1]
    name = f"{b.script[:-3]}: "
    return text[len(name):] if text.startswith(name) else text


# --- writing ----------------------------------------------------------------------------------

def minutes(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def fence(text: str) -> list[str]:
    ticks = "```" if "```" not in text else "````"
    return [ticks + "text", text, ticks]


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def bold(verdict: str) -> str:
    return f"**{verdict}**" if verdict in ("MET", "MISSED") or verdict.startswith("failed") \
        else verdict


def tail(text: str, n: int) -> str:
    lines = text.rstrip().splitlines()
    return "\n".join(lines[-n:]) if lines else "(nothing)"


def render(a: argparse.Namespace, argv: list[str], code: dict, code_end: dict, mach: dict,
           results: list[Result], started: str, ended: str, total: float, load0, load1) -> str:
    sha = code["commit"]
    state = f"`{sha}`"
    if code["changed"]:
        n = len(code["changed"])
        state += (f" plus uncommitted changes to {n} tracked file{'s' if n > 1 else ''} ("
                  + ", ".join(f"`{f}`" for f in code["changed"]) + ")")
    gpu = (", ".join(mach["cuda"]) + f" (CUDA {mach['cuda_version']})" if mach["cuda"]
           else "no GPU")
    md = [
        "# Benchmarks",
        "",
        "Generated by `bench/report.py`: every figure below was printed by a script of `bench/` "
        "in the one run this header describes; nothing was added by hand. What each script "
        "does and its options: `bench/README.md`. To regenerate, at a commit with no "
        "uncommitted changes: `.venv/bin/python bench/report.py`.",
        "",
        f"- command: `{shlex.join([display_python(), 'bench/report.py', *argv])}`",
        f"- code: commit {state} (committed {code['committed']})",
        f"- date: {started} to {ended}; total wall time {minutes(total)}",
        f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory']} memory; "
        f"{mach['system']}; Python {mach['python']}, torch {mach['torch']} with "
        f"{mach['threads']} intra-op threads by default; {gpu}",
        f"- load average (1, 5, 15 min): {fmt_load(load0)} at the start, {fmt_load(load1)} at "
        f"the end; above {mach['cores']} means other processes shared the CPUs",
    ]
    if code_end["commit"] != code["commit"] or code_end["diff"] != code["diff"]:
        moved = changed_between(code["commit"], code_end)
        what = (f"`{code_end['commit']}` at the end, {len(code_end['changed'])} changed tracked "
                f"files; changed since the start: {', '.join(moved) or 'none named'}")
        if moved and all(is_doc(f) for f in moved):
            md.append(f"- only documentation changed during the run ({what}): every benchmark "
                      "measured the same code")
        else:
            md.append(f"- **the code changed during the run** ({what}): the benchmarks did "
                      "not all measure the same code")
    if a.quick:
        md.append("- **quick run** (`--quick`): every script with its cheapest options "
                  "(fewer rounds, sizes, epochs): a check that the benchmarks run; its figures "
                  "and verdicts are not those of a full run")
    md += [
        "",
        "Timings are compared as ratios against a baseline measured in the same run, with "
        "interleaved repetitions and medians, because the CPUs may be shared and timings "
        "drift. Each section gives the script's command, its wall time, its torch threads and "
        "the 1-minute load average at its start and end, then its output (without the lines "
        "that repeat those, and without progress lines).",
        "",
        "## Summary",
        "",
        "| benchmark | bar | verdict | figures | wall time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        ran = r.status != "not run"
        line = headline(r.bench, r.out) if r.status == "run" else ""
        fig = f"`{md_cell(line)}`" if line else md_cell(r.detail)
        cells = [f"[{r.bench.name}](#{r.bench.name})" if ran else r.bench.name,
                 md_cell(r.bench.bar or "none (recorded)"),
                 md_cell(bold(r.verdict) if ran else f"not run: {r.why}"), fig,
                 minutes(r.seconds) if ran else ""]
        md.append("| " + " | ".join(cells) + " |")
    for r in results:
        if r.status == "not run":
            continue
        b = r.bench
        md += ["", f"## {b.name}", "", f"Measures: {b.measures}", ""]
        meta = r.meta
        when = f"{minutes(r.seconds)}, exit status {r.rc}"
        if "threads" in meta:
            when += f"; torch threads {meta['threads']}"
        if "load_start" in meta:
            when += f"; load average {meta['load_start']} at its start"
            if "load_end" in meta:
                when += f", {meta['load_end']} at its end"
        md += [f"Command: `{command(b, r.args)}` ({when}).", ""]
        if b.bar:
            line = f"Bar: {b.bar}. Verdict: {bold(r.verdict)}"
            md += [line + (f" ({r.detail})." if r.detail else "."), ""]
        elif r.status == "failed":
            md += [f"Verdict: {bold(r.verdict)}.", ""]
        if b.notes:
            md += [b.notes, ""]
        if r.status == "failed":
            md += ["Last lines of its output:", "", *fence(tail(r.out, 25)), "",
                   "Last lines of its error output:", "", *fence(tail(r.err, 25))]
        else:
            md += fence(figures(b, r.out) or "(no output)")
    skipped = [r for r in results if r.status == "not run"]
    if skipped:
        md += ["", "## Not run", ""]
        md += [f"- {r.bench.name} ({r.why}): `{command(r.bench, r.args)}`" for r in skipped]
    return "\n".join(md) + "\n"


# --- main -------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="benchmarks: " + ", ".join(NAMES))
    ap.add_argument("--only", nargs="+", metavar="NAME", default=[],
                    help="run these benchmarks only")
    ap.add_argument("--skip", nargs="+", metavar="NAME", default=[],
                    help="do not run these benchmarks")
    ap.add_argument("--quick", action="store_true",
                    help="each script's cheapest options: a check that they run")
    ap.add_argument("--no-long", action="store_true",
                    help="skip the benchmarks that take ten minutes or more at full options")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="run on a working tree with uncommitted changes to tracked files")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--list", action="store_true", help="print the registry and exit")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="echo each script's output to stderr as it runs")
    argv = sys.argv[1:]
    a = ap.parse_args(argv)
    unknown = [n for n in a.only + a.skip if n not in NAMES]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(NAMES)}")
    if a.list:
        for b in BENCHMARKS:
            flags = ", ".join(f for f, on in (("needs CUDA", b.cuda), ("long", b.long)) if on)
            print(f"{b.name}{f' ({flags})' if flags else ''}\n  full:  {command(b, b.args(False))}"
                  f"\n  quick: {command(b, b.args(True))}\n  bar:   {b.bar or 'none'}")
        return 0

    code = code_state()
    if code["changed"] and not a.allow_dirty:
        print("bench/report.py: uncommitted changes to tracked files ("
              + ", ".join(code["changed"]) + "); commit them, or pass --allow-dirty (the "
              "report then says so)", file=sys.stderr)
        return 2
    load0 = loadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.perf_counter()
    mach = machine()
    progress(f"commit {code['commit'][:12]}" + (" plus uncommitted changes" if code["changed"]
                                                else "")
             + f"; {mach['cpu']} x{mach['cores']}; "
             f"{', '.join(mach['cuda']) or 'no GPU'}; load average {fmt_load(load0)}")

    plan = []
    for b in BENCHMARKS:
        r = Result(b, b.args(a.quick))
        if a.only and b.name not in a.only:
            r.status, r.why = "not run", "not selected"
        elif b.name in a.skip:
            r.status, r.why = "not run", "--skip"
        elif b.cuda and not mach["cuda"]:
            r.status, r.why = "not run", "no CUDA device"
        elif b.long and a.no_long:
            r.status, r.why = "not run", "--no-long"
        plan.append(r)
    todo = [r for r in plan if r.status != "not run"]
    results = []
    for r in plan:
        if r.status == "not run":
            results.append(r)
            continue
        k = todo.index(r) + 1
        progress(f"[{k}/{len(todo)}] {r.bench.name}: {command(r.bench, r.args)}")
        done = run_one(r.bench, r.args, a.verbose)
        results.append(done)
        progress(f"[{k}/{len(todo)}] {r.bench.name}: {done.verdict} in {minutes(done.seconds)}"
                 + (f"; last error line: {tail(done.err, 1)}" if done.status == "failed"
                    else ""))
    total = time.perf_counter() - t0
    load1 = loadavg()
    ended = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    text = render(a, argv, code, code_state(), mach, results, started, ended, total, load0,
                  load1)
    out = a.out if a.out.is_absolute() else Path.cwd() / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    failed = [r.bench.name for r in results if r.status == "failed"]
    progress(f"wrote {out} in {minutes(total)}"
             + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
