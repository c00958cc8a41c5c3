"""A small, strict reader of dlib's serialization format, enough for dlib's face recognition
ResNet (``dlib_face_recognition_resnet_model_v1.dat``, the ``anet_type`` network of dlib's
``examples/dnn_face_recognition_ex.cpp``).

References are to files of https://github.com/davisking/dlib:

- ``dlib/serialize.h``: integers are a control byte (0x80: negative, low 4 bits: how many
  little-endian magnitude bytes follow), strings are a length then bytes, bools are ASCII
  '0'/'1', floats are ``float_details``: the integer mantissa then the integer exponent,
  value = mantissa * 2**exponent (``dlib/float_details.h``; serialize.h's header comment says
  exponent first, but its code writes the mantissa first).
- ``dlib/cuda/tensor.h``: a tensor is version 2, num_samples, k, nr, nc, then the values as
  little-endian IEEE float32 (version 1 used dlib floats instead); an ``alias_tensor`` is
  version 1 and the four dimensions only.
- ``dlib/dnn/core.h``: a network serializes from the loss end. ``add_loss_layer`` writes its
  version, the loss details, then the subnetwork; ``add_layer`` writes its version, its
  subnetwork, then its own details and state; tag and skip layers write a version and their
  subnetwork. So the file holds the versions of every layer from the loss end down, then the
  input layer, then each layer's details from the input side up.
- ``dlib/dnn/layers.h``, ``dlib/dnn/input.h``, ``dlib/dnn/loss.h``: each layer's details,
  opened by a version string such as ``"con_4"``.

Tags and skips carry no identity in the file, so the reader checks the file against the known
``anet_type`` layout (:func:`anet_layout`) and rejects anything else: a malformed file raises
:class:`DlibFormatError` naming what was being read and the byte offset, never half a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DlibFormatError(ValueError):
    """The bytes are not a dlib face recognition ResNet as this reader understands it."""


# float_details' special exponents (dlib/float_details.h).
_EXP_INF, _EXP_NINF, _EXP_NAN = 32000, 32001, 32002


class Reader:
    """Reads dlib-serialized values from ``data``, tracking the byte offset for errors."""

    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.pos = 0

    def error(self, what: str, problem: str, at: int | None = None) -> DlibFormatError:
        return DlibFormatError(f"{what} at byte {self.pos if at is None else at}: {problem}")

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise self.error(what, f"truncated: needs {n} bytes, "
                                   f"{len(self.data) - self.pos} left")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self, what: str, *, unsigned: bool = False) -> int:
        """An integer (serialize.h pack_int): control byte, then little-endian magnitude."""
        at = self.pos
        control = self.take(1, what)[0]
        size = control & 0x0F
        if control & 0x70 or size > 8 or (unsigned and control & 0x80):
            raise self.error(what, f"invalid integer control byte 0x{control:02x}", at)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def float(self, what: str) -> float:
        """A float_details: mantissa then exponent, both dlib integers (serialize.h)."""
        at = self.pos
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            # serialize.h: a byte with bits 0x70 set starts dlib's old ASCII float format
            raise self.error(what, "old text float format is not supported", at)
        mantissa = self.int(what)
        exponent = self.int(what)
        if not -(2**63) <= mantissa < 2**63 or not -(2**15) <= exponent < 2**15:
            raise self.error(what, f"float mantissa/exponent out of range "
                                   f"({mantissa}, {exponent})", at)
        if exponent >= _EXP_INF:
            return {_EXP_INF: math.inf, _EXP_NINF: -math.inf}.get(exponent, math.nan)
        try:
            return math.ldexp(mantissa, exponent)
        except OverflowError:
            raise self.error(what, f"float overflows: {mantissa} * 2**{exponent}", at)

    def bool(self, what: str) -> bool:
        at = self.pos
        ch = self.take(1, what)
        if ch not in (b"0", b"1"):
            raise self.error(what, f"expected bool '0' or '1', found {ch!r}", at)
        return ch == b"1"

    def string(self, what: str) -> str:
        at = self.pos
        n = self.int(what, unsigned=True)
        if n > len(self.data) - self.pos:
            raise self.error(what, f"truncated: string of {n} bytes, "
                                   f"{len(self.data) - self.pos} left", at)
        return self.take(n, what).decode("latin-1")

    def expect_string(self, expected: str | tuple[str, ...], what: str) -> str:
        at = self.pos
        found = self.string(what)
        options = (expected,) if isinstance(expected, str) else expected
        if found not in options:
            raise self.error(what, f"expected {' or '.join(map(repr, options))}, "
                                   f"found {found!r}", at)
        return found

    def expect_int(self, expected: int | tuple[int, ...], what: str,
                   unsigned: bool = False) -> int:
        at = self.pos
        found = self.int(what, unsigned=unsigned)
        options = (expected,) if isinstance(expected, int) else expected
        if found not in options:
            raise self.error(what, f"expected {' or '.join(map(str, options))}, found {found}", at)
        return found

    def dims(self, what: str) -> tuple[int, int, int, int]:
        at = self.pos
        shape = tuple(self.int(what) for _ in range(4))
        if min(shape) < 0:
            raise self.error(what, f"negative tensor dimension in {shape}", at)
        return shape  # type: ignore[return-value]

    def tensor(self, what: str) -> np.ndarray:
        """A resizable_tensor (dlib/cuda/tensor.h) as a float32 (n, k, nr, nc) array."""
        version = self.expect_int((1, 2), f"{what}: tensor version")
        at = self.pos
        shape = self.dims(f"{what}: tensor shape")
        count = math.prod(shape)
        left = len(self.data) - self.pos
        # version 2: 4 bytes a value; version 1: a dlib float, at least 2 bytes a value
        if count * (4 if version == 2 else 2) > left:
            raise self.error(what, f"truncated: tensor {shape} needs more than the {left} "
                                   "bytes left", at)
        if version == 2:
            values = np.frombuffer(self.take(4 * count, what), dtype="<f4").astype(np.float32)
        else:
            values = np.array([self.float(what) for _ in range(count)], dtype=np.float32)
        return values.reshape(shape)

    def params(self, count: int, layout: str, what: str) -> np.ndarray:
        """A layer's parameter tensor, which must hold ``count`` finite values, flattened."""
        at = self.pos
        values = self.tensor(what).reshape(-1)
        if values.size != count:
            raise self.error(what, f"expected {count} values ({layout}), found {values.size}", at)
        if not np.isfinite(values).all():
            raise self.error(what, "non-finite parameter values", at)
        return values

    def alias(self, what: str) -> tuple[int, int, int, int]:
        """An alias_tensor (dlib/cuda/tensor.h): a version and four dimensions, no data."""
        self.expect_int(1, f"{what}: alias_tensor version")
        return self.dims(f"{what}: alias_tensor shape")

    def expect_alias(self, shape: tuple[int, ...], what: str) -> None:
        at = self.pos
        found = self.alias(what)
        if found != shape:
            raise self.error(what, f"expected shape {shape}, found {found}", at)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.error("end of network", f"{len(self.data) - self.pos} trailing bytes")


# ---------------------------------------------------------------------------------------------
# The anet_type layout


@dataclass(frozen=True)
class LayerSpec:
    """One layer of anet_type, from the input side: ``kind`` is con, affine, relu, max_pool,
    avg_pool, add_prev, fc (computational, i.e. add_layer) or tag, skip (structural)."""

    kind: str
    channels: int = 0  # con/fc: outputs; affine: channels
    inputs: int = 0  # con/fc: input channels/features
    size: int = 0  # con/pool window (0: the whole image)
    stride: int = 1

    @property
    def computational(self) -> bool:
        return self.kind not in ("tag", "skip")

    @property
    def padding(self) -> int:
        # layers.h: con_/max_pool_/avg_pool_ default padding is 0 if stride != 1 else size/2
        return 0 if self.stride != 1 else self.size // 2


def anet_layout() -> list[LayerSpec]:
    """anet_type of dnn_face_recognition_ex.cpp, from the input up to the fc layer."""

    def block(n: int, k: int, stride: int) -> list[LayerSpec]:
        # block = affine<con<N,3,3,1,1,relu<affine<con<N,3,3,stride,stride,SUBNET>>>>>
        return [LayerSpec("con", n, k, 3, stride), LayerSpec("affine", n), LayerSpec("relu"),
                LayerSpec("con", n, n, 3, 1), LayerSpec("affine", n)]

    def ares(n: int) -> list[LayerSpec]:
        # relu<add_prev1<block<N,affine,1,tag1<SUBNET>>>>
        return [LayerSpec("tag"), *block(n, n, 1), LayerSpec("add_prev"), LayerSpec("relu")]

    def ares_down(n: int, k: int) -> list[LayerSpec]:
        # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,affine,2,tag1<SUBNET>>>>>>>
        return [LayerSpec("tag"), *block(n, k, 2), LayerSpec("tag"), LayerSpec("skip"),
                LayerSpec("avg_pool", size=2, stride=2), LayerSpec("add_prev"), LayerSpec("relu")]

    layers = [LayerSpec("con", 32, 3, 7, 2), LayerSpec("affine", 32), LayerSpec("relu"),
              LayerSpec("max_pool", size=3, stride=2)]
    layers += ares(32) * 3  # alevel4
    layers += ares_down(64, 32) + ares(64) * 3  # alevel3
    layers += ares_down(128, 64) + ares(128) * 2  # alevel2
    layers += ares_down(256, 128) + ares(256) * 2  # alevel1
    layers += ares_down(256, 256)  # alevel0
    layers += [LayerSpec("avg_pool", size=0, stride=1),  # avg_pool_everything
               LayerSpec("fc", 128, 256)]  # fc_no_bias<128>
    return layers


# ---------------------------------------------------------------------------------------------
# The parsed network


@dataclass
class DlibLayer:
    """A computational layer as read: ``params`` holds its float32 arrays (con: ``weight``
    (out, in, kh, kw) and ``bias`` (out,); affine: ``gamma`` and ``beta`` (channels,);
    fc: ``weight`` in dlib's (inputs, outputs) layout, y = x @ weight)."""

    spec: LayerSpec
    offset: int
    params: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class DlibNetwork:
    """dlib_face_recognition_resnet_model_v1 as read from its file."""

    loss_margin: float
    loss_distance_threshold: float
    input_mean_rgb: tuple[float, float, float]  # subtracted from 0..255 pixels, then / 256
    input_size: tuple[int, int]  # (rows, columns)
    layers: list[DlibLayer]  # computational layers, from the input side

    def arrays(self) -> dict[str, np.ndarray]:
        """All parameters by name, ``layer{index:02d}.{kind}.{param}``, from the input side."""
        return {f"layer{i:02d}.{layer.spec.kind}.{name}": value
                for i, layer in enumerate(self.layers) for name, value in layer.params.items()}


_MULTIPLIERS = ("learning_rate", "weight_decay", "bias_learning_rate", "bias_weight_decay")


def _read_details(r: Reader, spec: LayerSpec, what: str) -> dict[str, np.ndarray]:
    """One layer's details (layers.h ``serialize(const xxx_&, ...)``)."""
    if spec.kind == "con":
        r.expect_string("con_4", f"{what}: version")
        n, k, s = spec.channels, spec.inputs, spec.size
        size = n * k * s * s
        params = r.params(size + n, f"{n}x{k}x{s}x{s} filters + {n} biases", f"{what}: params")
        r.expect_int(n, f"{what}: num_filters")
        r.expect_int(s, f"{what}: nr")
        r.expect_int(s, f"{what}: nc")
        r.expect_int(spec.stride, f"{what}: stride_y")
        r.expect_int(spec.stride, f"{what}: stride_x")
        r.expect_int(spec.padding, f"{what}: padding_y")
        r.expect_int(spec.padding, f"{what}: padding_x")
        r.expect_alias((n, k, s, s), f"{what}: filters")
        r.expect_alias((1, n, 1, 1), f"{what}: biases")
        for name in _MULTIPLIERS:
            r.float(f"{what}: {name} multiplier")
        return {"weight": params[:size].reshape(n, k, s, s), "bias": params[size:]}
    if spec.kind in ("affine", "bn_con"):
        # affine_, or bn_<CONV_MODE>, which dlib's affine_ reads in its place at inference
        r.expect_string("affine_" if spec.kind == "affine" else "bn_con2", f"{what}: version")
        c = spec.channels
        params = r.params(2 * c, f"{c} gamma + {c} beta", f"{what}: params")
        r.expect_alias((1, c, 1, 1), f"{what}: gamma")
        r.expect_alias((1, c, 1, 1), f"{what}: beta")
        if spec.kind == "affine":
            r.expect_int(0, f"{what}: mode (0: CONV_MODE)")
            return {"gamma": params[:c], "beta": params[c:]}
        # bn_: gamma / sqrt(running variance + eps) and beta - that * running mean
        r.tensor(f"{what}: means")
        r.tensor(f"{what}: invstds")
        mean = r.params(c, f"{c} running means", f"{what}: running_means")
        var = r.params(c, f"{c} running variances", f"{what}: running_variances")
        r.int(f"{what}: num_updates", unsigned=True)
        r.int(f"{what}: running_stats_window_size", unsigned=True)
        for name in _MULTIPLIERS:
            r.float(f"{what}: {name} multiplier")
        eps = r.float(f"{what}: eps")
        if not eps > 0 or (var < 0).any():
            raise r.error(what, f"invalid batch-norm statistics (eps {eps})")
        gamma = (params[:c] / np.sqrt(var + np.float32(eps))).astype(np.float32)
        return {"gamma": gamma, "beta": (params[c:] - gamma * mean).astype(np.float32)}
    if spec.kind in ("max_pool", "avg_pool"):
        r.expect_string(f"{spec.kind}_2", f"{what}: version")
        for name, value in (("nr", spec.size), ("nc", spec.size), ("stride_y", spec.stride),
                            ("stride_x", spec.stride), ("padding_y", spec.padding),
                            ("padding_x", spec.padding)):
            r.expect_int(value, f"{what}: {name}")
        return {}
    if spec.kind in ("relu", "add_prev"):
        r.expect_string(f"{spec.kind}_", f"{what}: version")
        return {}
    if spec.kind == "fc":
        r.expect_string("fc_2", f"{what}: version")
        outputs, inputs = spec.channels, spec.inputs
        r.expect_int(outputs, f"{what}: num_outputs", unsigned=True)
        r.expect_int(inputs, f"{what}: num_inputs", unsigned=True)
        params = r.params(inputs * outputs, f"{inputs}x{outputs} weights", f"{what}: params")
        r.expect_alias((inputs, outputs, 1, 1), f"{what}: weights")
        r.alias(f"{what}: biases")  # unused: fc_no_bias
        r.expect_int(1, f"{what}: bias_mode (1: FC_NO_BIAS)")
        for name in _MULTIPLIERS:
            r.float(f"{what}: {name} multiplier")
        return {"weight": params.reshape(inputs, outputs)}
    raise AssertionError(spec.kind)


def _read_versions(r: Reader, layout: list[LayerSpec]) -> dict[int, int]:
    """core.h: the versions of every layer come first, from the loss end down to the input."""
    versions: dict[int, int] = {}
    for i in reversed(range(len(layout))):
        spec = layout[i]
        what = f"layer {i} ({spec.kind}) version"
        if not spec.computational:
            versions[i] = r.expect_int(1, what)  # add_tag_layer / add_skip_layer
        elif i == 0:
            versions[i] = r.expect_int((2, 3), what)  # add_layer on the input layer
        else:
            versions[i] = r.expect_int((1, 2), what)
    return versions


def _read_layers(r: Reader, layout: list[LayerSpec], versions: dict[int, int]
                 ) -> list[DlibLayer]:
    """Each computational layer's details and add_layer state, from the input side up."""
    layers = []
    for i, spec in enumerate(layout):
        if not spec.computational:
            continue
        what = f"layer {i} ({spec.kind})"
        at = r.pos
        params = _read_details(r, spec, what)
        # core.h add_layer state after the details: three bools and state tensors
        for name in ("this_layer_setup_called", "gradient_input_is_stale",
                     "get_output_and_gradient_input_disabled"):
            r.bool(f"{what}: {name}")
        r.tensor(f"{what}: x_grad")
        r.tensor(f"{what}: cached_output")
        if i == 0:
            r.tensor(f"{what}: grad_final")
            if versions[i] >= 3:
                r.int(f"{what}: sample_expansion_factor", unsigned=True)
        elif versions[i] >= 2:
            r.tensor(f"{what}: params_grad")
        layers.append(DlibLayer(spec, at, params))
    r.end()
    return layers


def _read_mean(r: Reader) -> tuple[float, float, float]:
    mean = tuple(r.float(f"input layer avg_{c}") for c in ("red", "green", "blue"))
    if not all(0.0 <= m <= 255.0 for m in mean):
        raise r.error("input layer", f"channel means {mean} outside 0..255")
    return mean  # type: ignore[return-value]


def _open(data: bytes, loss: str) -> Reader:
    """A reader past the loss layer's version string (core.h add_loss_layer, version 1)."""
    if not data:
        raise DlibFormatError("empty input: expected a serialized dlib network")
    r = Reader(data)
    r.expect_int(1, "add_loss_layer version")
    r.expect_string(loss, "loss layer version")
    return r


def parse_network(data: bytes) -> DlibNetwork:
    """Parse the bytes of ``dlib_face_recognition_resnet_model_v1.dat``."""
    r = _open(data, "loss_metric_2")  # loss.h loss_metric_: margin and distance threshold
    margin = r.float("loss_metric_ margin")
    threshold = r.float("loss_metric_ dist_thresh")
    layout = anet_layout()
    versions = _read_versions(r, layout)
    # input.h input_rgb_image_sized<150>
    r.expect_string("input_rgb_image_sized", "input layer version")
    mean = _read_mean(r)
    rows = r.expect_int(150, "input layer NR", unsigned=True)
    cols = r.expect_int(150, "input layer NC", unsigned=True)
    layers = _read_layers(r, layout, versions)
    return DlibNetwork(margin, threshold, mean, (rows, cols), layers)


# ---------------------------------------------------------------------------------------------
# dlib's CNN face detector (MMOD)


def mmod_layout() -> list[LayerSpec]:
    """``net_type`` of dlib's ``examples/dnn_mmod_face_detection_ex.cpp`` (as trained, with
    bn_con where the example's inference type has affine), from the input up: a downsampler of
    three 5x5 stride-2 convolutions (16, 32, 32 filters), three 5x5 convolutions of 45, and a
    9x9 convolution to one score map."""
    layers: list[LayerSpec] = []
    for n, k in ((16, 3), (32, 16), (32, 32)):  # downsampler: relu<bn<con5d<N>>>
        layers += [LayerSpec("con", n, k, 5, 2), LayerSpec("bn_con", n), LayerSpec("relu")]
    for _ in range(3):  # rcon5: relu<bn<con5<45>>>
        layers += [LayerSpec("con", 45, layers[-3].channels, 5, 1), LayerSpec("bn_con", 45),
                   LayerSpec("relu")]
    return layers + [LayerSpec("con", 1, 45, 9, 1)]


@dataclass
class DlibDetector:
    """``mmod_human_face_detector`` as read from its file: loss_mmod's options (loss.h
    mmod_options) and the network after input_rgb_image_pyramid<pyramid_down<6>>."""

    window: tuple[int, int]  # the detector window (width, height) in pyramid pixels
    nms_iou: float  # test_box_overlap: two boxes overlap when IoU (over their bounding box)
    nms_covered: float  # ... or the share of either one covered exceeds these
    input_mean_rgb: tuple[float, float, float]
    pyramid_padding: int
    pyramid_outer_padding: int
    layers: list[DlibLayer]  # computational layers, from the input side


def parse_detector(data: bytes) -> DlibDetector:
    """Parse the bytes of ``mmod_human_face_detector.dat``."""
    r = _open(data, "loss_mmod_")
    version = r.expect_int((1, 2, 3, 4), "mmod_options version")
    if version != 1:  # later versions hold a list of windows, each with a label
        raise r.error("mmod_options", f"version {version}: only one detector window "
                                      "(version 1) is supported")
    window = (r.int("mmod_options detector_width", unsigned=True),
              r.int("mmod_options detector_height", unsigned=True))
    for name in ("loss_per_false_alarm", "loss_per_missed_target", "truth_match_iou_threshold"):
        r.float(f"mmod_options {name}")
    nms_iou, nms_covered = r.float("overlaps_nms iou"), r.float("overlaps_nms covered")
    r.float("overlaps_ignore iou")
    r.float("overlaps_ignore covered")
    if min(window) < 1 or not (0 <= nms_iou <= 1 and 0 <= nms_covered <= 1):
        raise r.error("mmod_options", f"invalid window {window} or NMS ({nms_iou}, "
                                      f"{nms_covered})")
    layout = mmod_layout()
    versions = _read_versions(r, layout)
    found = r.expect_string(("input_rgb_image_pyramid", "input_rgb_image_pyramid2"),
                            "input layer version")
    mean = _read_mean(r)
    padding, outer = 10, 11  # input.h: the defaults, written only from the second version on
    if found.endswith("2"):
        padding = r.int("input layer pyramid_padding", unsigned=True)
        outer = r.int("input layer pyramid_outer_padding", unsigned=True)
    layers = _read_layers(r, layout, versions)
    return DlibDetector(window, nms_iou, nms_covered, mean, padding, outer, layers)


def read_detector(path: str | Path) -> DlibDetector:
    """Read and parse a ``mmod_human_face_detector.dat`` file."""
    return parse_detector(Path(path).read_bytes())


def read_network(path: str | Path) -> DlibNetwork:
    """Read and parse a ``dlib_face_recognition_resnet_model_v1.dat`` file."""
    return parse_network(Path(path).read_bytes())
