"""dlib's CNN face detector in PyTorch: ``mmod_human_face_detector`` (King 2015, "Max-Margin
Object Detection", arXiv:1502.00046), read from its ``.dat`` file by
:mod:`facegrad.recognition.dlib_serialize` and run as dlib runs it, so that it batches pictures
of one size and runs on GPUs. dlib-bin's own CNN runs one picture at a time on one CPU thread.

References are to files of https://github.com/davisking/dlib:

- input (``dlib/dnn/input.h`` input_rgb_image_pyramid<pyramid_down<6>>): each picture's
  channels minus the mean colour, over 256, tiled with its image pyramid into one image
  (``dlib/image_transforms/image_pyramid.h`` compute_tiled_image_pyramid_details): each level
  5/6 the size of the one before, made from it by bilinear resizing with corners aligned
  (``tt::resize_bilinear``), down to 5 rows, in a column below the picture and back up its
  right side, ``padding`` pixels apart and ``outer_padding`` from the edge;
- network: three 5x5 stride-2 convolutions, three 5x5 convolutions, each followed by its
  batch norm's inference form (dlib's affine_) and ReLU, then a 9x9 convolution to a score map;
- output (``dlib/dnn/loss.h`` loss_mmod_::to_label): every score above 0 is a detection window
  (80x80 pixels of the tiled image) centred where the network maps that output back onto its
  input, carried to the picture through the pyramid level nearest its centre
  (tiled_pyramid_to_image: x 6/5 + 0.3 per level) and rounded to whole pixels; windows are kept
  from the highest score down unless they overlap a kept one (``test_box_overlap``: the
  intersection over the pair's bounding box above the file's 0.338, or either box wholly
  covered).

Boxes are dlib's ``rectangle``: (left, top, right, bottom), inclusive, in the picture's pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facegrad.recognition.dlib_serialize import DlibDetector, read_detector

__all__ = ["Detection", "MMODDetector", "pyramid_layout"]

PYRAMID_N = 6            # pyramid_down<6>: each level (N-1)/N the size of the one before
MIN_LEVEL_ROWS = 5       # compute_tiled_image_pyramid_details' min_height

Rect = tuple[int, int, int, int]


@dataclass(frozen=True)
class Detection:
    """One face: dlib's inclusive (left, top, right, bottom) box and the window's score."""

    rect: Rect
    confidence: float


def pyramid_layout(rows: int, cols: int, padding: int, outer: int
                   ) -> tuple[list[Rect], int, int]:
    """Where each pyramid level of a rows x cols picture lies in the tiled image, as inclusive
    (left, top, right, bottom), and the tiled image's (rows, cols)
    (``impl::compute_tiled_image_pyramid_details``)."""
    rate = (PYRAMID_N - 1.0) / PYRAMID_N
    sizes = [(cols, rows)]
    nr, nc = rows, cols
    while True:
        nr, nc = math.floor(rate * nr), math.floor(rate * nc)
        if nr * nc == 0 or nr < MIN_LEVEL_ROWS:
            break
        sizes.append((nc, nr))
    total = sum(h + padding for _, h in sizes) - 2 * padding
    height = prev_width = 0
    for w, h in sizes:  # the first column goes on until the rest fit beside it going back up
        if w <= cols - prev_width - padding and (height - rows) * 2 >= total - rows:
            break
        height += h + padding
        prev_width = w
    height -= padding
    out_rows, out_cols = height + 2 * outer, cols + 2 * outer
    rects: list[Rect] = []
    y = outer
    while y < height + outer and len(rects) < len(sizes):
        w, h = sizes[len(rects)]
        rects.append((outer, y, outer + w - 1, y + h - 1))
        y += h + padding
    y -= padding
    while len(rects) < len(sizes):  # back up the right side, bottom first
        w, h = sizes[len(rects)]
        x1, y1 = outer + cols - 1, y - 1
        rect = (x1 - (w - 1), y1 - (h - 1), x1, y1)
        first = rects[0]
        if not (rect[2] < first[0] or rect[0] > first[2] or rect[3] < first[1]
                or rect[1] > first[3]):
            break  # it would overlap the picture itself
        rects.append(rect)
        y -= h + padding
    return rects, out_rows, out_cols


def _nearest(rects: list[Rect], x: float, y: float) -> int:
    """nearest_rect: the first level containing the point, else the closest one."""
    best, best_d = 0, math.inf
    for i, (left, top, right, bottom) in enumerate(rects):
        if left <= x <= right and top <= y <= bottom:
            return i
        dx = min(max(x, left), right) - x
        dy = min(max(y, top), bottom) - y
        d = math.hypot(dx, dy)
        if d < best_d:
            best, best_d = i, d
    return best


def _overlaps(a: Rect, b: Rect, iou: float, covered: float) -> bool:
    """test_box_overlap on dlib's inclusive integer rectangles; its "union" is the pair's
    bounding box (``(a+b).area()``)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return False
    inner = iw * ih

    def area(r: Rect) -> int:
        return (r[2] - r[0] + 1) * (r[3] - r[1] + 1)

    outer = (max(a[2], b[2]) - min(a[0], b[0]) + 1) * (max(a[3], b[3]) - min(a[1], b[1]) + 1)
    return inner / outer > iou or inner / area(a) > covered or inner / area(b) > covered


def _round(v: float) -> int:
    return math.floor(v + 0.5)  # drectangle -> rectangle


class MMODDetector(nn.Module):
    """The network and the decoding around it (module doc). ``detect`` takes pictures of one
    size as an (N, H, W, 3) uint8 array (RGB) and returns each picture's detections."""

    def __init__(self, spec: DlibDetector):
        super().__init__()
        self.spec = spec
        convs = []
        self.maps: list[tuple[int, int, int]] = []  # (stride, padding, size) from the input up
        layers = spec.layers
        i = 0
        while i < len(layers):
            con = layers[i]
            assert con.spec.kind == "con"
            weight = torch.from_numpy(con.params["weight"].copy())
            bias = torch.from_numpy(con.params["bias"].copy())
            if i + 1 < len(layers) and layers[i + 1].spec.kind == "bn_con":
                # the per-channel scale and shift folded into the convolution
                g = torch.from_numpy(layers[i + 1].params["gamma"])
                b = torch.from_numpy(layers[i + 1].params["beta"])
                weight, bias = weight * g[:, None, None, None], bias * g + b
                i += 1
            conv = nn.Conv2d(con.spec.inputs, con.spec.channels, con.spec.size,
                             stride=con.spec.stride, padding=con.spec.padding)
            conv.weight.data.copy_(weight)
            conv.bias.data.copy_(bias)
            conv.requires_grad_(False)
            convs.append(conv)
            self.maps.append((con.spec.stride, con.spec.padding, con.spec.size))
            i += 1
            if i < len(layers) and layers[i].spec.kind == "relu":
                convs.append(nn.ReLU(inplace=True))
                i += 1
        self.net = nn.Sequential(*convs)
        self.register_buffer("mean", torch.tensor(spec.input_mean_rgb).view(1, 3, 1, 1))

    @classmethod
    def from_file(cls, path: str | Path) -> MMODDetector:
        """The detector of a ``mmod_human_face_detector.dat`` file, ready for inference."""
        return cls(read_detector(path)).eval()

    def _input_point(self, x: float, y: float) -> tuple[float, float]:
        """output_tensor_to_input_tensor: each con_ maps p to p*stride - padding + size/2."""
        for stride, padding, size in reversed(self.maps):
            x, y = x * stride - padding + size // 2, y * stride - padding + size // 2
        return x, y

    def tiled(self, pictures: torch.Tensor) -> tuple[torch.Tensor, list[Rect]]:
        """The input tensor (N, 3, rows, cols) of (N, H, W, 3) uint8 pictures, and the levels'
        rectangles in it."""
        n, h, w, _ = pictures.shape
        rects, rows, cols = pyramid_layout(h, w, self.spec.pyramid_padding,
                                           self.spec.pyramid_outer_padding)
        out = pictures.new_zeros((n, 3, rows, cols), dtype=torch.float32)
        if not rects:
            return out, rects
        x = (pictures.permute(0, 3, 1, 2).float() - self.mean) / 256.0
        prev = rects[0]
        out[:, :, prev[1]:prev[3] + 1, prev[0]:prev[2] + 1] = x
        for r in rects[1:]:
            x = F.interpolate(x, size=(r[3] - r[1] + 1, r[2] - r[0] + 1), mode="bilinear",
                              align_corners=True)
            out[:, :, r[1]:r[3] + 1, r[0]:r[2] + 1] = x
        return out, rects

    @torch.no_grad()
    def scores(self, tensor: torch.Tensor) -> torch.Tensor:
        """The score map (N, 1, rows', cols') of a tiled input."""
        return self.net(tensor)

    def decode(self, scores: np.ndarray, rects: list[Rect], adjust_threshold: float = 0.0
               ) -> list[Detection]:
        """One picture's detections from its (rows', cols') score map (module doc)."""
        width, height = self.spec.window
        ratio = PYRAMID_N / (PYRAMID_N - 1.0)
        rs, cs = np.nonzero(scores > adjust_threshold)
        found = []
        for r, c in zip(rs.tolist(), cs.tolist()):
            px, py = self._input_point(c, r)
            level = _nearest(rects, px, py)
            ox, oy = rects[level][0], rects[level][1]
            corners = []
            for x, y in ((px - (width - 1) / 2, py - (height - 1) / 2),
                         (px + (width - 1) / 2, py + (height - 1) / 2)):
                x, y = x - ox, y - oy
                for _ in range(level):  # pyramid_down<6>::point_up, in dlib's order
                    x, y = x * ratio + 0.3, y * ratio + 0.3
                corners.append((x, y))
            (x0, y0), (x1, y1) = corners
            found.append((float(scores[r, c]), (_round(x0), _round(y0), _round(x1), _round(y1))))
        found.sort(key=lambda d: -d[0])
        kept: list[Detection] = []
        for score, rect in found:
            if any(_overlaps(k.rect, rect, self.spec.nms_iou, self.spec.nms_covered)
                   for k in kept):
                continue
            kept.append(Detection(rect, score))
        return kept

    def detect(self, pictures: np.ndarray, adjust_threshold: float = 0.0
               ) -> list[list[Detection]]:
        """Each picture's faces, highest score first; ``pictures`` (N, H, W, 3) uint8 RGB of
        one size, or one (H, W, 3) picture (a one-element list comes back)."""
        arr = np.asarray(pictures)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
            raise ValueError(f"expected (N, H, W, 3) uint8 pictures, got {arr.dtype} "
                             f"{arr.shape}")
        device = self.mean.device
        tensor, rects = self.tiled(torch.from_numpy(np.ascontiguousarray(arr)).to(device))
        if not rects or min(tensor.shape[2:]) < self._min_side():
            return [[] for _ in range(len(arr))]
        maps = self.scores(tensor)[:, 0].float().cpu().numpy()
        return [self.decode(m, rects, adjust_threshold) for m in maps]

    def _min_side(self) -> int:
        """The smallest tiled image the network gives an output for."""
        side = 1
        for stride, padding, size in reversed(self.maps):
            side = (side - 1) * stride + size - 2 * padding
        return side
