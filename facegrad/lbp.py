"""Local binary pattern (LBP) histograms: a hand-made face texture descriptor, in batched torch ops.

Each pixel of the grey image gets an 8-bit code (is each of its 8 neighbours at radius 1 at
least as bright?), mapped to one of the 58 "uniform" patterns (at most two 0/1 transitions
around the circle: edges, corners, spots) or a 59th bin for the rest. The image is cut into a
``grid`` x ``grid`` mesh of cells and each cell's code histogram is taken; the descriptor is the
square root of the normalised histograms (so that a dot product is the Bhattacharyya
coefficient), L2-normalised. Codes only compare neighbours, so they do not change with any
monotonic change of brightness: what a face's texture looks like under harsh or flat light.

This is Ahonen, Hadid and Pietikäinen's face descriptor (ECCV 2004). It knows nothing about the
people a model was trained on, so it describes a stranger as well as a trained identity, where
a network trained on a few dozen people mostly describes how someone resembles them; see
:func:`facegrad.models.describe`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))
GRID = 8


def _uniform_table() -> tuple[torch.Tensor, int]:
    """(256,) code → bin (58 uniform patterns, then one bin for all others), and the bin count."""
    table, nxt = [], 0
    for code in range(256):
        bits = [(code >> i) & 1 for i in range(8)]
        if sum(bits[i] != bits[(i + 1) % 8] for i in range(8)) <= 2:
            table.append(nxt)
            nxt += 1
        else:
            table.append(-1)
    return torch.tensor([nxt if b < 0 else b for b in table]), nxt + 1


UNIFORM, BINS = _uniform_table()


def lbp_codes(grey: torch.Tensor) -> torch.Tensor:
    """(N, H, W) float → (N, H-2, W-2) uniform-pattern bin of every inner pixel (long)."""
    _, h, w = grey.shape
    centre = grey[:, 1:h - 1, 1:w - 1]
    code = torch.zeros(centre.shape, dtype=torch.long, device=grey.device)
    for bit, (dy, dx) in enumerate(NEIGHBOURS):
        neighbour = grey[:, 1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx]
        code |= (neighbour >= centre).long() << bit
    return UNIFORM.to(grey.device)[code]


def lbp_histograms(images: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """(N, C, H, W) images → (N, grid * grid * 59) L2-normalised LBP descriptor (float32)."""
    grey = images.float().mean(1)
    codes = lbp_codes(grey)
    n, h, w = codes.shape
    cell = (torch.arange(h, device=codes.device) * grid // h).view(-1, 1) * grid \
        + (torch.arange(w, device=codes.device) * grid // w).view(1, -1)
    index = (cell.view(1, h, w) * BINS + codes).view(n, -1)
    hist = torch.zeros(n, grid * grid * BINS, device=codes.device)
    hist.scatter_add_(1, index, torch.ones_like(index, dtype=hist.dtype))
    hist = hist.view(n, grid * grid, BINS)
    hist = hist / hist.sum(2, keepdim=True).clamp(min=1)
    return F.normalize(hist.sqrt().flatten(1), dim=1)
