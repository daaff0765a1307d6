"""Classification heads on top of an image encoder."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["AttributeHead", "BNNeck"]


class BNNeck(nn.Module):
    """BNNeck of Luo et al. 2019, "Bag of Tricks and a Strong Baseline for Deep Person Re-ID" (Sec. 3.5).

    The triplet loss acts on the feature before the BatchNorm, the ID loss on the normalised feature, so the
    two losses no longer pull one embedding space in different directions; at test time the BN feature is
    used. The BN bias is fixed at zero (not trained) and the classifier has no bias, as in the paper; init as
    the paper's code and fast-reid: BN weight 1, bias 0; classifier weights N(0, 0.001^2).

    `forward(feat)` returns `(bn_feat, logits)`.
    """

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.bn = nn.BatchNorm1d(in_dim)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(in_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        bn_feat = self.bn(feat)
        return bn_feat, self.classifier(bn_feat)


class AttributeHead(nn.Module):
    """One logit per attribute from the pooled feature: Linear, then BatchNorm1d with ``batch_norm`` (Jia et al.'s
    classifier in their paper; their released PA-100K config turns the BN off)."""

    def __init__(self, in_dim: int, num_attributes: int, batch_norm: bool = True):
        super().__init__()
        self.num_attributes = num_attributes
        self.fc = nn.Linear(in_dim, num_attributes)
        self.bn = nn.BatchNorm1d(num_attributes) if batch_norm else nn.Identity()

    def forward(self, feats: Tensor) -> Tensor:
        return self.bn(self.fc(feats))
