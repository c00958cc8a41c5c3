"""A toy architecture for tests/test_registry.py: what a new architecture is, its network and
one registry entry (``register(TOY_ARCH)``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from facegrad.recognition.architectures import Architecture
from facegrad.recognition.models import EMBED_DIM


class TinyNet(nn.Module):
    """One convolution, pooled, projected to a normalised 128-d embedding."""

    def __init__(self, num_classes: int, image_size: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.embed = nn.Linear(8 * 4 * 4, EMBED_DIM)
        self.classifier = nn.Linear(EMBED_DIM, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 4).flatten(1)
        h = F.relu(self.embed(h))
        return F.normalize(h, dim=1), self.classifier(h)


TOY_ARCH = Architecture(
    "tiny", TinyNet, "per_image_standardise", False,
    {"epochs": 1, "learning_rate": 3e-3, "image_size": 32, "optimizer": "adamw"},
    "one convolution (a test's toy)")
