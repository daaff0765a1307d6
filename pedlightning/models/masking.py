"""Patch masks for masked image modelling, and running a timm ViT on the visible patches only.

PersonMAE (arXiv 2311.04496) corrupts RegionA with *block-wise* masking "to mimic common occlusion in ReID".
The paper gives no generator details; we follow BEiT's block generator (Bao et al., ICLR 2022, Sec. 2.5 /
Algorithm 1) as BEiT's and BootMAE's public code configure it: blocks of 16 to 60 patches, aspect ratio
log-uniform in [0.3, 1/0.3], then uniformly random patches up to the ratio. On the rectangular patch grid of
person images (16 x 8 for 256 x 128 inputs with 16-pixel patches) every mask has *exactly*
``round(ratio * N)`` masked patches, so a batch of visible tokens is a dense tensor and the encoder cost is the
same for every image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from timm.models import checkpoint_seq
from torch import nn

from pedlightning.errors import ConfigError

MaskType = Literal["block", "random"]
Seed = int | Sequence[int] | np.random.Generator | None
Block = tuple[int, int, int, int]  # (top, left, height, width) in patches


def num_masked_patches(num_patches: int, ratio: float) -> int:
    """``round(ratio * num_patches)`` with Python's round-half-even, kept inside ``[0, num_patches - 1]``.

    At least one patch stays visible: the encoder needs an input token and the decoder a context.
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"mask ratio must be in [0, 1), got {ratio}")
    return min(int(round(ratio * num_patches)), num_patches - 1)


def sample_block(grid: tuple[int, int], max_patches: float, rng: np.random.Generator, min_patches: int = 16,
                 aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> Block | None:
    """One BEiT block ``(top, left, height, width)``, or ``None`` when the drawn shape does not fit the grid.

    The target area is uniform in ``[min_patches, max_patches]`` and the aspect ratio (height / width)
    log-uniform in ``aspect``; height and width are the rounded square roots, so the block's area can differ
    from the target by rounding (the caller enforces its cap on ``height * width``).

    Assumption: BEiT requires blocks strictly smaller than the grid; on an 8-wide grid that forbids
    full-width blocks (a person's legs hidden by a car), so here a block may span the whole grid side.
    """
    gh, gw = grid
    min_patches = min(min_patches, max_patches)
    area = rng.uniform(min_patches, max_patches)
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    h = int(round(math.sqrt(area * ratio)))
    w = int(round(math.sqrt(area / ratio)))
    if not (1 <= h <= gh and 1 <= w <= gw):
        return None
    return int(rng.integers(0, gh - h + 1)), int(rng.integers(0, gw - w + 1)), h, w


@dataclass
class BlockLayout:
    """A block-wise mask and how it was made: the accepted ``blocks`` and the ``num_random`` fill patches."""

    mask: np.ndarray
    blocks: list[Block]
    num_random: int


def block_layout(grid: tuple[int, int], num_masked: int, rng: np.random.Generator, min_patches: int = 16,
                 max_patches: int | None = 60, aspect: tuple[float, float] = (0.3, 1 / 0.3),
                 max_attempts: int = 10) -> BlockLayout:
    """A BEiT block-wise mask of shape ``grid`` with exactly ``num_masked`` True entries, and its blocks.

    BEiT's loop: each block's target area is drawn up to ``min(remaining, max_patches)``; a block is
    accepted when its area is at most ``max_patches`` and it adds ``0 < new <= remaining`` patches
    (``max_attempts`` draws per block; overlapping earlier blocks is allowed). When no block is accepted
    any more, the rest of the ratio is filled with patches drawn uniformly among the unmasked ones
    (BootMAE's completion to the exact ratio). ``max_patches=None`` is the uncapped generator, where one
    block may take all remaining patches.

    Assumption: BEiT caps the *new* patches of a block at the maximum, so a block overlapping earlier ones may
    be larger; here the block's own area is capped, so no occluder is larger than ``max_patches``.
    """
    cap = num_masked if max_patches is None else max_patches
    mask = np.zeros(grid, dtype=bool)
    blocks: list[Block] = []
    while (remaining := num_masked - int(mask.sum())) > 0:
        accepted = None
        for _ in range(max_attempts):
            block = sample_block(grid, min(remaining, cap), rng, min_patches, aspect)
            if block is None:
                continue
            top, left, h, w = block
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if h * w <= cap and 0 < new <= remaining:
                accepted = block
                break
        if accepted is None:
            break
        top, left, h, w = accepted
        mask[top:top + h, left:left + w] = True
        blocks.append(accepted)
    remaining = num_masked - int(mask.sum())
    if remaining > 0:
        pick = rng.choice(np.flatnonzero(~mask), size=remaining, replace=False)
        mask.flat[pick] = True
    return BlockLayout(mask, blocks, remaining)


def block_mask(grid: tuple[int, int], num_masked: int, rng: np.random.Generator, min_patches: int = 16,
               max_patches: int | None = 60, aspect: tuple[float, float] = (0.3, 1 / 0.3),
               max_attempts: int = 10) -> np.ndarray:
    """The mask of :func:`block_layout`."""
    return block_layout(grid, num_masked, rng, min_patches, max_patches, aspect, max_attempts).mask


def random_mask(grid: tuple[int, int], num_masked: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random patches (MAE's masking), exactly ``num_masked`` of them."""
    n = grid[0] * grid[1]
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[:num_masked]] = True
    return mask.reshape(grid)


class MaskGenerator:
    """Draws masks of a fixed patch grid, ``True`` = masked (hidden from the encoder).

    Args:
        grid: ``(rows, cols)`` of the patch grid, e.g. ``(16, 8)`` for 256 x 128 images and 16-pixel patches.
        ratio: fraction of masked patches; every mask has exactly ``round(ratio * N)`` of them.
        mask_type: ``block`` (BEiT block-wise, PersonMAE's occlusion-like masking) or ``random`` (MAE, ablation).
        min_block_patches: smallest block target area in patches (BEiT, BootMAE: 16).
        max_block_patches: largest block area in patches (BEiT, BootMAE: 60); ``None`` = uncapped (one block may
            take every remaining patch).
        block_aspect: range of block height / width (BEiT: 0.3 to 1/0.3).

    Masks depend only on the seed passed to :meth:`__call__`, so a run is reproducible and a resumed run
    draws the same masks as an uninterrupted one when the seed is derived from the global step.
    """

    def __init__(self, grid: tuple[int, int], ratio: float = 0.75, mask_type: MaskType = "block",
                 min_block_patches: int = 16, max_block_patches: int | None = 60,
                 block_aspect: tuple[float, float] = (0.3, 1 / 0.3)):
        if mask_type not in ("block", "random"):
            raise ConfigError(f"mask_type must be 'block' or 'random', got {mask_type!r}")
        if min_block_patches < 1 or not 0 < block_aspect[0] <= block_aspect[1]:
            raise ConfigError(f"need min_block_patches >= 1 and 0 < block_aspect[0] <= block_aspect[1], got "
                              f"{min_block_patches}, {tuple(block_aspect)}")
        if max_block_patches is not None and max_block_patches < min_block_patches:
            raise ConfigError(f"max_block_patches must be None or >= min_block_patches ({min_block_patches}), got "
                              f"{max_block_patches}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = num_masked_patches(self.num_patches, ratio)
        self.mask_type = mask_type
        self.min_block_patches = min_block_patches
        self.max_block_patches = max_block_patches
        self.block_aspect = (float(block_aspect[0]), float(block_aspect[1]))

    @property
    def num_visible(self) -> int:
        return self.num_patches - self.num_masked

    def __call__(self, batch_size: int | None = None, seed: Seed = None) -> torch.Tensor:
        """A bool mask of shape ``(N,)``, or ``(batch_size, N)``; patches in row-major order."""
        masks = [layout.mask for layout in self.layouts(1 if batch_size is None else batch_size, seed)]
        out = torch.from_numpy(np.stack(masks).reshape(len(masks), -1))
        return out[0] if batch_size is None else out

    def layouts(self, batch_size: int, seed: Seed = None) -> list[BlockLayout]:
        """The masks of ``self(batch_size, seed)`` with their blocks (none for ``random`` masks)."""
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        return [self._one(rng) for _ in range(batch_size)]

    def _one(self, rng: np.random.Generator) -> BlockLayout:
        if self.mask_type == "random":
            return BlockLayout(random_mask(self.grid, self.num_masked, rng), [], self.num_masked)
        return block_layout(self.grid, self.num_masked, rng, self.min_block_patches, self.max_block_patches,
                            self.block_aspect)


def visible_indices(mask: torch.Tensor) -> torch.Tensor:
    """Indices ``(B, N_visible)`` of the unmasked patches of a ``(B, N)`` mask with equal counts per row."""
    counts = (~mask).sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"every mask of a batch needs the same number of visible patches, got {counts.tolist()}")
    # a stable sort puts visible (False) patches first, in their original order
    return torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices[:, : int(counts[0])]


def forward_visible(vit: nn.Module, images: torch.Tensor, keep: torch.Tensor | None = None,
                    final_norm: bool = True) -> torch.Tensor:
    """Run a timm ``VisionTransformer`` on the patches ``keep`` (B, K) only; returns ``(B, prefix + K, D)``.

    Position embeddings are added before dropping tokens (as in MAE), so each kept token knows where it
    is. The cost of the transformer blocks scales with ``prefix + K`` instead of ``prefix + N``.
    ``keep=None`` keeps every patch; ``final_norm=False`` returns the last block's tokens before the ViT's
    final LayerNorm (BootMAE's feature target).
    """
    x = vit.patch_embed(images)
    if x.ndim == 4:  # dynamic-size patch embeds return NHWC
        x = x.flatten(1, 2)
    x = vit._pos_embed(x)
    if keep is not None:
        prefix = vit.num_prefix_tokens
        patches = torch.gather(x[:, prefix:], 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :prefix], patches], dim=1)
    x = vit.norm_pre(x)
    if getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled():
        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    return vit.norm(x) if final_norm else x
