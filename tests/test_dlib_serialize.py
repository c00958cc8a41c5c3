"""The strict reader of dlib's serialization format: known encodings, and malformed files."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest

from facegrad.recognition.dlib_resnet import dlib_model_path
from facegrad.recognition.dlib_serialize import (
    DlibFormatError,
    Reader,
    parse_detector,
    parse_network,
)


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return dlib_model_path().read_bytes()


def _raises(data: bytes, *patterns: str) -> str:
    """Parsing ``data`` fails with a DlibFormatError whose message matches every pattern."""
    with pytest.raises(DlibFormatError) as info:
        parse_network(data)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), message
    return message


def _replace_once(data: bytes, old: bytes, new: bytes, start: int = 0) -> bytes:
    at = data.index(old, start)
    return data[:at] + new + data[at + len(old):]


# --- values ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "value"), [
    (b"\x03\x0a\xd7\xa3", 10737418),
    (b"\x81\x1c", -28),
    (b"\x01\x00", 0),
    (b"\x00", 0),  # no magnitude bytes: dlib reads zero
    (b"\x02\x80\x12", 4736),
    (b"\x81\x05", -5),
    (b"\x08" + b"\xff" * 7 + b"\x7f", 2**63 - 1),
])
def test_int_decoding(raw, value):
    r = Reader(raw)
    assert r.int("x") == value
    r.end()


@pytest.mark.parametrize(("raw", "problem"), [
    (b"\x09" + b"\x00" * 9, "control byte 0x09"),  # more than 8 bytes
    (b"\x11\x00", "control byte 0x11"),  # reserved bits set
    (b"\x03\x01\x02", "truncated"),
    (b"", "truncated"),
])
def test_bad_ints(raw, problem):
    with pytest.raises(DlibFormatError, match=problem):
        Reader(raw).int("some count")


def test_unsigned_rejects_sign():
    with pytest.raises(DlibFormatError, match="control byte 0x81"):
        Reader(b"\x81\x05").int("NR", unsigned=True)


@pytest.mark.parametrize(("raw", "value"), [
    (b"\x03\x0a\xd7\xa3\x81\x1c", 0.04),  # 10737418 * 2**-28, loss_metric_'s margin
    (b"\x03\x9a\x99\x99\x81\x18", 0.6),  # its distance threshold
    (b"\x03\x62\x90\xf5\x81\x11", 122.782),  # input_rgb_image_sized's avg_red
    (b"\x01\x00\x01\x00", 0.0),
    (b"\x81\x03\x01\x00", -3.0),
])
def test_float_decoding(raw, value):
    r = Reader(raw)
    assert np.float32(r.float("x")) == np.float32(value)
    r.end()


def test_float_specials_and_errors():
    assert Reader(b"\x01\x00\x02\x00\x7d").float("x") == math.inf  # exponent 32000
    assert Reader(b"\x01\x00\x02\x01\x7d").float("x") == -math.inf  # 32001
    assert math.isnan(Reader(b"\x01\x00\x02\x02\x7d").float("x"))  # 32002
    with pytest.raises(DlibFormatError, match="old text float"):
        Reader(b"1.5 ").float("x")
    with pytest.raises(DlibFormatError, match="out of range"):
        Reader(b"\x01\x01\x03\x00\x00\x01").float("x")  # exponent beyond int16
    with pytest.raises(DlibFormatError, match="overflows"):
        Reader(b"\x01\x01\x02\x00\x7c").float("x")  # 2**31744
    with pytest.raises(DlibFormatError, match="truncated"):
        Reader(b"\x03\x0a\xd7\xa3").float("x")


def test_strings_bools_tensors():
    r = Reader(b"\x01\x05relu_" + b"1" + b"0")
    assert r.string("s") == "relu_" and r.bool("b") is True and r.bool("b") is False
    with pytest.raises(DlibFormatError, match=r"expected bool '0' or '1', found b'x'"):
        Reader(b"x").bool("flag")
    with pytest.raises(DlibFormatError, match="string of 9 bytes, 3 left"):
        Reader(b"\x01\x09abc").string("name")

    values = np.arange(6, dtype="<f4")
    raw = b"\x01\x02" + b"\x01\x01\x01\x02\x01\x03\x01\x01" + values.tobytes()
    np.testing.assert_array_equal(Reader(raw).tensor("t"), values.reshape(1, 2, 3, 1))
    # version 1 tensors hold dlib floats
    v1 = Reader(b"\x01\x01" + b"\x01\x01" * 4 + b"\x03\x0a\xd7\xa3\x81\x1c").tensor("t")
    assert v1.shape == (1, 1, 1, 1) and v1[0, 0, 0, 0] == np.float32(0.04)
    with pytest.raises(DlibFormatError, match="tensor version.*expected 1 or 2, found 3"):
        Reader(b"\x01\x03").tensor("t")
    with pytest.raises(DlibFormatError, match="negative tensor dimension"):
        Reader(b"\x01\x02\x81\x01\x01\x01\x01\x01\x01\x01").tensor("t")
    # a huge claimed size fails before anything is allocated
    with pytest.raises(DlibFormatError, match="truncated: tensor"):
        Reader(b"\x01\x02" + b"\x04\xff\xff\xff\x7f" * 4).tensor("t")


# --- whole files -----------------------------------------------------------------------------

def test_real_file_parses(model_bytes):
    net = parse_network(model_bytes)
    assert np.float32(net.loss_margin) == np.float32(0.04)
    assert np.float32(net.loss_distance_threshold) == np.float32(0.6)
    assert np.allclose(net.input_mean_rgb, (122.782, 117.001, 104.298))
    assert net.input_size == (150, 150)
    arrays = net.arrays()
    assert arrays["layer00.con.weight"].shape == (32, 3, 7, 7)
    assert arrays[f"layer{len(net.layers) - 1}.fc.weight"].shape == (256, 128)
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert sum(a.size for a in arrays.values()) == 5_614_592


def test_empty_file():
    _raises(b"", "empty")


def test_truncated_everywhere(model_bytes):
    con = model_bytes.index(b"con_4")
    fc = model_bytes.rindex(b"fc_2")
    cuts = [1, 2, 10, 20, 0x100, con - 3, con + 10, con + 5000, len(model_bytes) // 2, fc + 100,
            len(model_bytes) - 1]
    for cut in cuts:
        _raises(model_bytes[:cut], "truncated", r"at byte \d+")


def test_random_truncation_and_corruption_only_raise_format_errors(model_bytes):
    rng = random.Random(0)
    for cut in rng.sample(range(1, len(model_bytes)), 40):
        _raises(model_bytes[:cut], "truncated")
    # flipped bytes in the structure (versions, layer names, sizes) rather than in weights
    header_end = model_bytes.index(b"con_4") + 20
    for _ in range(40):
        data = bytearray(model_bytes)
        at = rng.randrange(header_end)
        data[at] ^= 1 << rng.randrange(8)
        try:
            parse_network(bytes(data))
        except DlibFormatError:
            pass  # any other exception fails the test


def test_wrong_layer_names_and_versions(model_bytes):
    _raises(_replace_once(model_bytes, b"loss_metric_2", b"loss_metric_3"),
            "loss layer version", "expected 'loss_metric_2', found 'loss_metric_3'")
    _raises(b"\x01\x02" + model_bytes[2:], "add_loss_layer version", "expected 1, found 2",
            "at byte 0")
    _raises(_replace_once(model_bytes, b"con_4", b"con_5"),
            r"layer 0 \(con\): version", "expected 'con_4', found 'con_5'")
    _raises(_replace_once(model_bytes, b"affine_", b"affin3_"), r"layer 1 \(affine\)")
    _raises(_replace_once(model_bytes, b"\x05relu_", b"\x05sig__"), "expected 'relu_'")
    _raises(_replace_once(model_bytes, b"input_rgb_image_sized", b"input_rgb_image_sizeD"),
            "input layer version")
    # the first layer version after the loss (fc_no_bias's add_layer) set to 7
    at = model_bytes.index(b"\x03\x9a\x99\x99\x81\x18") + 6
    _raises(model_bytes[:at] + b"\x01\x07" + model_bytes[at + 2:],
            r"layer 129 \(fc\) version", "found 7", f"at byte {at}")


def test_wrong_sizes(model_bytes):
    con = model_bytes.index(b"con_4") + len(b"con_4")
    # the stem's params tensor claims one value fewer: 4735 instead of 32*3*7*7 + 32
    tensor = b"\x01\x02\x02\x80\x12\x01\x01\x01\x01\x01\x01"
    assert model_bytes[con:con + len(tensor)] == tensor
    short = model_bytes[:con] + tensor.replace(b"\x80\x12", b"\x7f\x12") + model_bytes[
        con + len(tensor) + 4:]
    _raises(short, r"layer 0 \(con\): params", "expected 4736 values", "found 4735")
    # num_filters 33 instead of 32, after the 4736 values
    after = con + len(tensor) + 4 * 4736
    assert model_bytes[after:after + 2] == b"\x01\x20"
    _raises(model_bytes[:after] + b"\x01\x21" + model_bytes[after + 2:],
            "num_filters", "expected 32, found 33", f"at byte {after}")
    # the filters alias_tensor says 32x3x7x6
    alias = b"\x01\x01\x01\x20\x01\x03\x01\x07\x01\x07"
    at = model_bytes.index(alias, after)
    _raises(_replace_once(model_bytes, alias, alias[:-1] + b"\x06", at),
            "filters", r"expected shape \(32, 3, 7, 7\), found \(32, 3, 7, 6\)")
    # the input layer is locked to 150x150
    size = b"\x01\x96\x01\x96"
    _raises(_replace_once(model_bytes, size, b"\x01\x95\x01\x96"), "input layer NR",
            "expected 150, found 149")


def test_trailing_bytes(model_bytes):
    _raises(model_bytes + b"\x00", "1 trailing bytes", f"at byte {len(model_bytes)}")
    _raises(model_bytes + model_bytes[:100], "100 trailing bytes")


def test_non_finite_weights(model_bytes):
    con = model_bytes.index(b"con_4") + len(b"con_4") + 11
    nan = np.array([np.nan], dtype="<f4").tobytes()
    _raises(model_bytes[:con] + nan + model_bytes[con + 4:], "non-finite")


# --- dlib's CNN face detector ----------------------------------------------------------------

@pytest.fixture(scope="module")
def detector_bytes() -> bytes:
    from facegrad.recognition.detect import CNN_FILE, predictor_path

    return predictor_path(CNN_FILE).read_bytes()


def test_detector_file_parses(detector_bytes):
    det = parse_detector(detector_bytes)
    assert det.window == (80, 80)
    assert 0 < det.nms_iou < 1 and det.nms_covered == 1.0
    assert np.allclose(det.input_mean_rgb, (122.782, 117.001, 104.298))
    assert (det.pyramid_padding, det.pyramid_outer_padding) == (10, 11)  # input.h's defaults
    kinds = [layer.spec.kind for layer in det.layers]
    assert kinds == ["con", "bn_con", "relu"] * 6 + ["con"]
    assert det.layers[-1].params["weight"].shape == (1, 45, 9, 9)
    for layer in det.layers:
        assert all(np.isfinite(a).all() and a.dtype == np.float32 for a in layer.params.values())


def test_detector_truncated_or_renamed(detector_bytes):
    rng = random.Random(1)
    cuts = [1, 5, 60, 100, detector_bytes.index(b"bn_con2") + 40, len(detector_bytes) - 1]
    for cut in cuts + rng.sample(range(1, len(detector_bytes)), 20):
        with pytest.raises(DlibFormatError, match="truncated"):
            parse_detector(detector_bytes[:cut])
    with pytest.raises(DlibFormatError, match="expected 'bn_con2', found 'bn_con3'"):
        parse_detector(_replace_once(detector_bytes, b"bn_con2", b"bn_con3"))
    with pytest.raises(DlibFormatError, match="loss layer version"):
        parse_network(detector_bytes)  # the face network's reader refuses the detector
