"""MGN, the Multiple Granularity Network (Wang et al. 2018, "Learning Discriminative Features with Multiple
Granularities for Person Re-Identification", ACM MM), as fast-reid builds it on a ResNet: VAL-PAT's
downstream reID model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pedlightning.errors import ConfigError
from pedlightning.losses import TripletLoss
from pedlightning.models.encoders import set_last_stride
from pedlightning.models.heads import BNNeck

__all__ = ["MGN", "mgn_losses"]

Pool = Literal["max", "avg"]


class MGN(nn.Module):
    """MGN on a timm ResNet :class:`~pedlightning.models.encoders.ImageEncoder` (Wang et al. 2018, Sec. 3.1).

    The encoder up to the first block of ``layer3`` is shared; MGN keeps a reference to it, not a copy, and does not
    register it (the caller owns and moves it, as :class:`~pedlightning.tasks.ReIDModule` does). Then three branches each run their own copy of
    ``layer3[1:]`` and ``layer4``: the global branch (the encoder's own layers, so its keys stay
    ``encoder.model.layer3/4.*`` and a checkpoint's layers go where they were trained), and one branch per entry
    of ``parts`` (2 and 3 horizontal stripes) whose ``layer4`` has stride 1 (the paper: no down-sampling in the
    part branches' ``res_conv5_1``). The part branches are copies of the encoder's layers taken at
    construction, so a pretrained encoder (VAL-PAT, LUP, ImageNet) initialises all three branches.

    Every branch pools its whole map (its global feature); a part branch also pools each of its stripes. Each
    pooled feature gets its own BNNeck-style head (fast-reid's ``EmbeddingHead`` with ``EMBEDDING_DIM 256``): a
    bias-free linear reduction to ``reduction_dim`` (the triplet feature), a BatchNorm and a bias-free ID
    classifier (:class:`~pedlightning.models.heads.BNNeck`). The evaluation feature is the concatenation of every
    BN feature: ``(1 + sum(p + 1 for p in parts)) * reduction_dim`` = 8 x 256 = 2048 by default.

    Args:
        encoder: a ResNet-style encoder (``layer3``, ``layer4`` stages), e.g. ``resnet50`` or ``resnet_tiny_test``.
            The global branch keeps the encoder's ``last_stride``: MGN's paper down-samples there (build the
            encoder with ``last_stride: 2``); fast-reid's configs keep stride 1 (``last_stride: 1``).
        num_classes: training identities of every ID classifier.
        reduction_dim: width of each branch feature (MGN and fast-reid: 256).
        parts: stripes of each part branch (MGN: 2 and 3).
        pool: ``max`` (the paper's global max pooling) or ``avg``.

    Assumption: stripes are adaptive pooling bins over the height (``adaptive_*_pool2d(x, (p, 1))``): equal
    stripes when the map height divides by ``p`` (384x128 input: 24 rows), else equal-length stripes that overlap
    by a row (256x128: 16 rows into 3 stripes of 6); fast-reid's ``torch.chunk`` makes 6/6/4 there.
    Reduction weights: Kaiming normal (fan out), as fast-reid's heads.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, reduction_dim: int = 256, parts: Sequence[int] = (2, 3),
                 pool: Pool = "max"):
        super().__init__()
        model = getattr(encoder, "model", None)
        if getattr(encoder, "is_vit", False) or not all(
                isinstance(getattr(model, name, None), nn.Sequential) for name in ("layer1", "layer3", "layer4")):
            raise ConfigError(f"MGN needs a ResNet-style encoder (a timm model with layer1..layer4 stages), got "
                              f"{type(model).__name__}")
        if pool not in ("max", "avg"):
            raise ConfigError(f"MGN pool must be 'max' or 'avg', got {pool!r}")
        if any(p < 2 for p in parts):
            raise ConfigError(f"MGN part branches need at least 2 stripes each, got parts={list(parts)}")
        # A reference, not a submodule: the encoder belongs to the task (its keys stay `encoder.model.*`, stored once).
        object.__setattr__(self, "encoder", encoder)
        self.num_classes, self.reduction_dim, self.parts, self.pool = num_classes, reduction_dim, tuple(parts), pool
        self.part_branches = nn.ModuleList()
        for _ in self.parts:
            branch = nn.Sequential(copy.deepcopy(model.layer3[1:]), copy.deepcopy(model.layer4))
            set_last_stride(nn.ModuleDict({"layer4": branch[1]}), 1, "an MGN part branch")
            self.part_branches.append(branch)
        channels = encoder.embed_dim
        self.reductions = nn.ModuleList(nn.Linear(channels, reduction_dim, bias=False)
                                        for _ in range(self.num_features))
        for layer in self.reductions:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out")
        self.necks = nn.ModuleList(BNNeck(reduction_dim, num_classes) for _ in range(self.num_features))

    @property
    def num_features(self) -> int:
        """Pooled features: one global per branch plus one per stripe (8 by default)."""
        return 1 + sum(1 + p for p in self.parts)

    @property
    def embed_dim(self) -> int:
        """Width of the evaluation feature."""
        return self.num_features * self.reduction_dim

    def _trunk(self, images: Tensor) -> Tensor:
        m = self.encoder.model
        x = m.maxpool(m.act1(m.bn1(m.conv1(images))))
        return m.layer3[0](m.layer2(m.layer1(x)))

    def _pooled(self, images: Tensor) -> list[Tensor]:
        """Every pooled ``(B, C)`` feature: global branch, then per part branch its global and its stripes."""
        pool = F.adaptive_max_pool2d if self.pool == "max" else F.adaptive_avg_pool2d
        shared = self._trunk(images)
        m = self.encoder.model
        maps = [m.layer4(m.layer3[1:](shared))] + [branch(shared) for branch in self.part_branches]
        feats = [pool(maps[0], 1).flatten(1)]
        for fmap, p in zip(maps[1:], self.parts):
            feats.append(pool(fmap, 1).flatten(1))
            feats.extend(pool(fmap, (p, 1)).flatten(2).unbind(2))
        return feats

    def forward_train(self, images: Tensor) -> dict[str, list[Tensor]]:
        """``logits``: one ``(B, num_classes)`` per pooled feature (8); ``triplet_feats``: the reduced global feature
        of each branch (3), before the BN; ``bn_feats``: every BN feature (8)."""
        reduced = [r(f) for r, f in zip(self.reductions, self._pooled(images))]
        outs = [neck(f) for neck, f in zip(self.necks, reduced)]
        globals_at = [0] + [1 + sum(1 + q for q in self.parts[:i]) for i in range(len(self.parts))]
        return {"logits": [logits for _, logits in outs], "triplet_feats": [reduced[i] for i in globals_at],
                "bn_feats": [bn for bn, _ in outs]}

    def forward(self, images: Tensor) -> Tensor:
        """The evaluation feature ``(B, embed_dim)``: every BN feature concatenated (fast-reid's MGN test feature)."""
        reduced = [r(f) for r, f in zip(self.reductions, self._pooled(images))]
        return torch.cat([neck.bn(f) for neck, f in zip(self.necks, reduced)], dim=1)


def mgn_losses(out: dict[str, list[Tensor]], pids: Tensor, triplet: TripletLoss,
               label_smoothing: float = 0.1) -> tuple[Tensor, Tensor]:
    """MGN's ``(ID loss, triplet loss)``: label-smoothed cross-entropy averaged over every classifier, batch-hard
    triplet averaged over the branch global features (Wang et al. 2018, Sec. 3.3: softmax on all features,
    triplet on the global ones).

    Assumption: each kind is averaged (not summed) over its heads, so ``id_loss_weight`` and
    ``triplet_loss_weight`` keep the scale they have for the one-head BNNeck model.
    """
    id_loss = torch.stack([F.cross_entropy(logits, pids, label_smoothing=label_smoothing)
                           for logits in out["logits"]]).mean()
    tri_loss = torch.stack([triplet(f, pids).loss for f in out["triplet_feats"]]).mean()
    return id_loss, tri_loss
