"""LCR²S support-set fusion: each sample attends over itself and other samples of its identity in the batch.

LCR²S (Yan et al., "Learning Comprehensive Representations with Richer Self for Text-to-Image Person
Re-Identification", ACM MM 2023) builds, for every image (caption), a support set of other images
(captions) of the same person and fuses the sample with it by multi-head attention, so the "richer" teacher
sees several views of a person at once. Here the support sets are rows of a boolean ``(B, B)`` mask over an
identity batch (P identities x K samples), and one masked attention over the whole batch fuses every sample
at once; the mask keeps a sample's fused feature a function of its own identity's samples only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pedlightning.errors import ConfigError

__all__ = ["FusionBlock", "SupportFusion", "support_mask"]


def support_mask(pids: Tensor, support_size: int | None = None, generator: torch.Generator | None = None,
                 distinct: Tensor | None = None) -> Tensor:
    """Boolean ``(B, B)`` mask: ``mask[i, j]`` is True when sample ``i`` attends to sample ``j``.

    Row ``i`` holds ``i`` itself (LCR²S fuses the sample with its support set) and its support set:
    ``support_size`` samples drawn uniformly without replacement from the candidates, the other samples
    ``j != i`` with ``pids[j] == pids[i]`` (and ``distinct[j] != distinct[i]`` when ``distinct`` is given,
    e.g. the image index, so that an image's support set holds other images rather than a second caption of
    the same image). ``support_size=None`` takes every candidate (K - 1 in a P x K batch, Assumption: the
    paper draws the support set at random but does not give its size); ``0`` leaves the sample alone
    (a fusion without support, the self-distillation control). Rows with fewer candidates take them all.
    The draw uses ``generator`` (CPU), so a seeded generator gives the same support sets on every run.
    """
    if pids.ndim != 1:
        raise ConfigError(f"support_mask expects a 1-D tensor of identity labels, got shape {tuple(pids.shape)}")
    if support_size is not None and support_size < 0:
        raise ConfigError(f"support_size must be >= 0 or None (every same-identity sample), got {support_size}")
    n = len(pids)
    eye = torch.eye(n, dtype=torch.bool, device=pids.device)
    candidates = (pids[:, None] == pids[None, :]) & ~eye
    if distinct is not None:
        candidates &= distinct[:, None] != distinct[None, :]
    if support_size is None or n == 0:
        return candidates | eye
    if support_size == 0:
        return eye
    # A random score per pair, -1 outside the candidates: the top `support_size` candidates of a row are a
    # uniform random subset of its candidates.
    scores = torch.rand(n, n, generator=generator).to(pids.device)
    scores = scores.masked_fill(~candidates, -1.0)
    k = min(support_size, n)
    top = scores.topk(k, dim=1)
    chosen = torch.zeros_like(candidates).scatter_(1, top.indices, top.values >= 0)
    return chosen | eye


class FusionBlock(nn.Module):
    """One fusion layer: masked multi-head attention (sample as query, ``[sample; support]`` as keys and values)
    + residual, LayerNorm, then an MLP + residual, LayerNorm (LCR²S's multi-head attentional fusion;
    Assumption: the MLP's residual and second LayerNorm, i.e. a post-norm transformer layer)."""

    def __init__(self, dim: int, num_heads: int = 8, mlp_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"fusion: the feature width {dim} must be divisible by num_heads={num_heads}")
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        hidden = mlp_dim or 4 * dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, feats: Tensor, mask: Tensor) -> Tensor:
        x = feats[None]  # the batch as one sequence; the mask decides who sees whom
        attended, _ = self.attn(x, x, x, attn_mask=~mask, need_weights=False)
        h = self.norm1(x + attended)
        return self.norm2(h + self.mlp(h))[0]


class SupportFusion(nn.Module):
    """``depth`` :class:`FusionBlock` layers over a batch of global features ``(B, dim)`` -> ``(B, dim)``.

    Every layer fuses every sample with its support set (the rows of ``mask``, see :func:`support_mask`);
    in layer 2 and beyond the keys are the support samples' fused features of the layer before, which are
    themselves fused from their own identity only, so identity isolation holds at every depth.

    Args:
        dim: feature width (the joint embedding width; fused features keep it).
        num_heads: attention heads. Assumption: 8 (the paper does not give it).
        depth: fusion layers. Assumption: 1.
        mlp_dim: MLP hidden width; ``None`` = 4 x ``dim`` (transformer convention, Assumption).
        dropout: attention and MLP dropout. Assumption: 0.
    """

    def __init__(self, dim: int, num_heads: int = 8, depth: int = 1, mlp_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if depth < 1:
            raise ConfigError(f"fusion depth must be >= 1, got {depth}")
        self.blocks = nn.ModuleList(FusionBlock(dim, num_heads, mlp_dim, dropout) for _ in range(depth))

    def forward(self, feats: Tensor, mask: Tensor) -> Tensor:
        if mask.shape != (len(feats), len(feats)) or mask.dtype != torch.bool:
            raise ConfigError(f"fusion mask must be a bool ({len(feats)}, {len(feats)}) tensor, got "
                              f"{mask.dtype} {tuple(mask.shape)}")
        for block in self.blocks:
            feats = block(feats, mask)
        return feats
