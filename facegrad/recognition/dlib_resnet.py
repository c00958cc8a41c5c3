"""dlib's face recognition ResNet (``dlib_face_recognition_resnet_model_v1``) in PyTorch.

The architecture is ``anet_type`` of dlib's ``examples/dnn_face_recognition_ex.cpp``; the
weights come from the ``.dat`` file shipped by the ``face-recognition-models`` package, read by
:mod:`facegrad.recognition.dlib_serialize` (not by dlib) and cached as safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from facegrad.recognition.dlib_serialize import read_network

CACHE_NAME = "dlib_resnet_v1"
FORMAT_VERSION = 1  # bump when the tensor names or layouts written to the cache change
SOURCE_NAME = "dlib_face_recognition_resnet_model_v1.dat"


class Affine(nn.Module):
    """Per-channel scale and shift: dlib's ``affine_`` in CONV_MODE (dlib/dnn/layers.h),
    which dlib uses in place of batch norm at inference. Trainable, unlike frozen BN stats."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev_: the sum has the larger of each dimension and the smaller tensor is
    zero-padded at the end (tt::add in dlib/cuda/cpu_dlib.cpp). Needed where the shortcut has
    fewer channels than the block, or (8x8 -> 3x3 conv vs 4x4 avg pool) more rows/columns."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class ResBlock(nn.Module):
    """``ares``/``ares_down``: relu(block(x) + shortcut(x)), where block is
    conv3x3 -> affine -> relu -> conv3x3 -> affine and, when downsampling, the first conv has
    stride 2 (padding 0, dlib's default for stride != 1) and the shortcut is a 2x2 avg pool."""

    def __init__(self, in_channels: int, channels: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=2 if down else 1,
                               padding=0 if down else 1)
        self.affine1 = Affine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.affine2 = Affine(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_zero_padded(y, shortcut))


def _stage(in_channels: int, channels: int, downs: list[bool]) -> nn.Sequential:
    blocks = []
    for down in downs:
        blocks.append(ResBlock(in_channels, channels, down))
        in_channels = channels
    return nn.Sequential(*blocks)


class DlibResNet(nn.Module):
    """anet_type: 150x150 RGB in, 128-d face descriptor out (the same values as dlib's
    ``compute_face_descriptor``, not re-normalised).

    Submodules in forward order: ``stem`` (7x7/2 conv 32, affine, relu, 3x3/2 max pool),
    ``stages`` (4 stages at 32, 64, 128 and 256 channels; the last holds dlib's alevel1 and
    alevel0, both 256 wide), then a global average pool and ``fc`` (256 -> 128, no bias).
    Freeze early stages with e.g. ``net.stem.requires_grad_(False)``.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 7, stride=2), Affine(32), nn.ReLU(),
                                  nn.MaxPool2d(3, 2))
        self.stages = nn.ModuleList([
            _stage(32, 32, [False] * 3),  # alevel4
            _stage(32, 64, [True] + [False] * 3),  # alevel3
            _stage(64, 128, [True] + [False] * 2),  # alevel2
            _stage(128, 256, [True] + [False] * 2 + [True]),  # alevel1, alevel0
        ])
        self.fc = nn.Linear(256, 128, bias=False)
        # input_rgb_image_sized (dlib/dnn/input.h): (pixel - mean) / 256, pixels in 0..255.
        # Overwritten by the means stored in the model file.
        self.register_buffer("input_mean", torch.tensor([122.782, 117.001, 104.298]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, 3, 150, 150) RGB in [0, 1]. Returns (N, 128) descriptors."""
        if x.ndim != 4 or x.shape[1:] != (3, 150, 150):
            raise ValueError(f"expected (N, 3, 150, 150) RGB, got {tuple(x.shape)}")
        x = (x * 255.0 - self.input_mean[:, None, None]) / 256.0
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.fc(x.mean(dim=(2, 3)))  # avg_pool_everything, then fc_no_bias


def dlib_model_path() -> Path:
    """The ``.dat`` file of the face-recognition-models package (located without importing
    the package, whose ``__init__`` needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "face_recognition_models is not installed: pip install face-recognition-models")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / SOURCE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the face_recognition_models package")
    return path


def state_dict_from_dlib(path: str | Path) -> dict[str, torch.Tensor]:
    """Read dlib's model file into a :class:`DlibResNet` state dict."""
    network = read_network(path)
    with torch.device("meta"):
        names = [name for name, module in DlibResNet().named_modules()
                 if isinstance(module, (nn.Conv2d, Affine, nn.Linear))]
    layers = [layer for layer in network.layers if layer.params]
    if len(layers) != len(names):  # the reader already checked the layout; belt and braces
        raise AssertionError(f"{len(layers)} dlib layers with weights for {len(names)} modules")
    state: dict[str, torch.Tensor] = {"input_mean": torch.tensor(network.input_mean_rgb)}
    for name, layer in zip(names, layers):
        p = layer.params
        if layer.spec.kind == "con":
            state[f"{name}.weight"], state[f"{name}.bias"] = (torch.from_numpy(p["weight"]),
                                                              torch.from_numpy(p["bias"]))
        elif layer.spec.kind == "affine":
            state[f"{name}.weight"], state[f"{name}.bias"] = (torch.from_numpy(p["gamma"]),
                                                              torch.from_numpy(p["beta"]))
        else:  # fc: dlib computes x @ W with W (inputs, outputs); nn.Linear holds W.T
            state[f"{name}.weight"] = torch.from_numpy(p["weight"].T.copy())
    return {k: v.to(torch.float32).contiguous() for k, v in state.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomically(path: Path, write) -> None:
    """``write(tmp_path)``, then rename over ``path`` so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cache_matches(weights: Path, meta: Path, source_sha256: str) -> bool:
    try:
        info = json.loads(meta.read_text())
        return (isinstance(info, dict) and info.get("format_version") == FORMAT_VERSION
                and info.get("source_sha256") == source_sha256
                and info.get("safetensors_sha256") == _sha256(weights))
    except (OSError, ValueError):
        return False


def pretrained_weights(cache_dir: Path, source: Path | None = None) -> Path:
    """``cache_dir/dlib_resnet_v1.safetensors``, converted from dlib's model file (``source``,
    default :func:`dlib_model_path`) on first use and reused while the JSON beside it matches
    both the source and the safetensors file by sha256; reconverted otherwise."""
    source = Path(source) if source is not None else dlib_model_path()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    weights = cache_dir / f"{CACHE_NAME}.safetensors"
    meta = cache_dir / f"{CACHE_NAME}.json"
    source_sha256 = _sha256(source)
    if _cache_matches(weights, meta, source_sha256):
        return weights
    state = state_dict_from_dlib(source)
    # One metadata entry only: safetensors writes several in random (hash map) order, and the
    # file should be byte-for-byte reproducible.
    _write_atomically(weights, lambda tmp: save_file(
        state, str(tmp), metadata={"source_sha256": source_sha256}))
    info = {"format_version": FORMAT_VERSION, "source_file": source.name,
            "source_sha256": source_sha256, "safetensors_sha256": _sha256(weights)}
    _write_atomically(meta, lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
    return weights


def load_pretrained(cache_dir: Path, device: str | torch.device = "cpu") -> DlibResNet:
    """A :class:`DlibResNet` with dlib's pretrained weights, in eval mode on ``device``."""
    net = DlibResNet()
    net.load_state_dict(load_file(str(pretrained_weights(cache_dir)), device="cpu"))
    return net.to(device).eval()
