"""Preprocessing shared by dataset building, training and identification.

A face image becomes a square uint8 crop of STORE_SIZE pixels (stored once per dataset); a model
then sees it resized to its ``image_size`` and standardised per image, on its own device. The same
functions run at identify time, so what the model saw in training is what it sees in service.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

STORE_SIZE = 150
PREPROCESSING_VERSION = 2  # 2: chips aligned by 5 landmarks, 150 px; 1: cascade crops, 128 px


def square_crop(rgb: np.ndarray, box: tuple[int, int, int, int] | None = None,
                margin: float = 0.0) -> np.ndarray:
    """The largest centred square of ``rgb`` or of ``box`` (x, y, w, h) grown by ``margin``.

    Parts of a grown box that fall outside the image are filled by edge replication, so a face
    near the border keeps its proportions.
    """
    h, w = rgb.shape[:2]
    if box is None:
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        return rgb[y0:y0 + side, x0:x0 + side]
    bx, by, bw, bh = box
    side = int(round(max(bw, bh) * (1 + 2 * margin)))
    cx, cy = bx + bw / 2, by + bh / 2
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    pad = max(0, -x0, -y0, x0 + side - w, y0 + side - h)
    if pad:
        rgb = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        x0, y0 = x0 + pad, y0 + pad
    return rgb[y0:y0 + side, x0:x0 + side]


def to_store(rgb: np.ndarray, size: int = STORE_SIZE) -> np.ndarray:
    """Resize a square RGB crop to the stored size (area-averaging when shrinking)."""
    img = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BOX if img.width > size
                         else Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def prepare_face(rgb: np.ndarray, box=None, margin: float = 0.0) -> np.ndarray:
    """Decoded RGB image (and optional face box) → stored uint8 crop (STORE_SIZE², 3)."""
    return to_store(square_crop(rgb, box, margin))


def resize_uint8(batch: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N, S, S, 3) uint8 → (N, 3, image_size, image_size) uint8, antialiased, on batch's device."""
    x = batch.permute(0, 3, 1, 2)
    if x.shape[-1] == image_size:
        return x.contiguous()
    out = []
    for chunk in x.split(1024):
        out.append(F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear",
                                 antialias=True, align_corners=False)
                   .round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """uint8/float (N, 3, H, W) → float, each image to zero mean and unit variance.

    Per-image standardisation takes out global brightness and contrast, which matters more for
    faces shot under other lighting than anything learnt from one dataset's mean.
    """
    # one float copy, centred and scaled in place: the same arithmetic with two fewer
    # batch-sized tensors to allocate and fault in (32 × 3 × 150 × 150: 3.3 ms against 5.9 ms
    # on one Intel Xeon thread; bit-identical results)
    d = x.to(torch.float32, copy=True)
    d -= d.mean(dim=(1, 2, 3), keepdim=True)
    # the sample std (as Tensor.std) from the L2 norm of the centred image: torch's std
    # reduction over several dims is not vectorised on the CPU (3x slower, bench/data_pipeline.py)
    n = x.shape[1] * x.shape[2] * x.shape[3]
    std = torch.linalg.vector_norm(d, dim=(1, 2, 3), keepdim=True) / math.sqrt(max(1, n - 1))
    return d.div_(std.clamp_min(1.0))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8/float (N, 3, H, W) in [0, 255] → float in [0, 1]: the input of a pretrained network,
    which applies the normalisation it was trained with itself."""
    return x.to(torch.float32, copy=True).div_(255.0)  # one fresh tensor, as standardise


# a model's ``preprocessing.normalisation`` → the function that prepares its input
NORMALISERS = {"per_image_standardise": standardise, "rgb_unit": to_unit}


def normaliser(name: str):
    try:
        return NORMALISERS[name]
    except KeyError:
        raise ValueError(f"unknown normalisation {name!r}; known: {sorted(NORMALISERS)}")

