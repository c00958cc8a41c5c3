"""Face models. Every model maps an image batch to (embedding, logits); the embedding is
normalised, and identification compares it by cosine similarity.

- ``dlib_resnet``: the default, dlib's face-recognition ResNet pretrained on about 3 million
  faces (:mod:`facegrad.recognition.dlib_resnet`), its normalised 128-d descriptor the embedding,
  with a CosFace head for fine-tuning (:class:`PretrainedFace`).
- ``seed_cnn``: the origin document's CNN, Conv(32,3x3)-ReLU-MaxPool-Conv(64,3x3)-ReLU-MaxPool-
  Flatten-Dense(128)-Dense(classes); its 128-d hidden layer is the embedding.
- ``facenet_s``: a small residual net with batch norm, a normalised 128-d embedding and a
  cosine-margin (CosFace) classifier, trained from scratch.

Each is registered, with its defaults and normalisation, in
:mod:`facegrad.recognition.architectures`, whose ``build_model`` builds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EMBED_DIM = 128


class SeedCNN(nn.Module):
    output_layer_names = ["classifier."]

    def __init__(self, num_classes: int, image_size: int = 64, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = ((image_size - 2) // 2 - 2) // 2
        self.hidden = nn.Linear(64 * side * side, EMBED_DIM)
        self.classifier = nn.Linear(EMBED_DIM, num_classes)
        for m in self.modules():  # Keras defaults, as the origin model had: Glorot, zero bias
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.hidden(self.features(x)))  # the embedding is the Dense(128) layer
        return F.normalize(h, dim=1), self.classifier(h)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.short is None else self.short(x)), inplace=True)


class CosineClassifier(nn.Module):
    """Logits = s * (cos(theta) - m * onehot) (CosFace). The margin applies only in training."""

    def __init__(self, dim: int, num_classes: int, scale: float = 16.0, margin: float = 0.2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, emb: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        cos = emb @ F.normalize(self.weight, dim=1).t()
        if target is not None and self.margin:
            cos = cos - self.margin * F.one_hot(target, cos.shape[1]).to(cos.dtype)
        return self.scale * cos

    @torch.no_grad()
    def imprint(self, sums: torch.Tensor) -> None:
        """Each class with embeddings in ``sums`` (one row per class: the sum of its training
        embeddings) gets their mean direction as its weight (weight imprinting, Qi et al. 2018):
        fine-tuning then starts from a head that already separates the classes, and the
        pretrained network is not pushed around by a random one. Classes with none keep theirs."""
        seen = sums.norm(dim=1) > 0
        self.weight[seen] = F.normalize(sums[seen].to(self.weight.dtype), dim=1)

    def without_margin(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training logits (margin taken off the target's) back to the plain s * cos(theta)."""
        if not self.margin:
            return logits
        return logits + self.scale * self.margin * F.one_hot(target, logits.shape[1]).to(
            logits.dtype)


class FaceNetS(nn.Module):
    output_layer_names = ["classifier."]

    def __init__(self, num_classes: int, image_size: int = 64, in_channels: int = 3,
                 widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.embed = nn.Sequential(nn.Dropout(0.2), nn.Linear(cin, EMBED_DIM, bias=False),
                                   nn.BatchNorm1d(EMBED_DIM))
        self.classifier = CosineClassifier(EMBED_DIM, num_classes)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None):
        h = self.blocks(self.stem(x))
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        emb = F.normalize(self.embed(h), dim=1)
        return emb, self.classifier(emb, target)


class PretrainedFace(nn.Module):
    """A pretrained face network fine-tuned with a CosFace head (Wang et al. 2018, "CosFace:
    Large Margin Cosine Loss", s = 30, m = 0.35 as there). Input: RGB in [0, 1]
    (:func:`facegrad.data.preprocess.to_unit`); the network applies its own normalisation."""

    output_layer_names = ["classifier."]

    def __init__(self, num_classes: int):
        super().__init__()
        from facegrad.recognition.dlib_resnet import DlibResNet

        self.backbone = DlibResNet()
        self.classifier = CosineClassifier(EMBED_DIM, num_classes, scale=30.0, margin=0.35)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None):
        emb = F.normalize(self.backbone(x), dim=1)
        return emb, self.classifier(emb, target)

    def freeze(self, stages: int) -> None:
        """Keep the backbone's first ``stages`` parts as they are: its stem, its four residual
        stages and its final projection, in that order (6 or more: the whole backbone)."""
        b = self.backbone
        for i, part in enumerate([b.stem, *b.stages, b.fc]):
            part.requires_grad_(i >= stages)


def forward_logits(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None):
    """(embedding, logits); passes the target where the model's head uses a training margin."""
    if isinstance(model, (FaceNetS, PretrainedFace)):
        return model(x, target)
    return model(x)


def plain_logits(model: nn.Module, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``forward_logits``' training logits without the head's margin: what the classifier
    predicts, so that training accuracy reads like validation accuracy."""
    head = getattr(model, "classifier", None)
    if isinstance(head, CosineClassifier):
        return head.without_margin(logits, target)
    return logits
