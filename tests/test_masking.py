"""Capped BEiT block masking: block sizes, exact ratio, seeding, and what the cap does to torso occlusion."""

import math

import numpy as np
import pytest
import torch

from pedlightning.errors import ConfigError
from pedlightning.models.masking import MaskGenerator, block_layout
from tests.support.scripted_rng import ScriptedRng

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = (16, 8)  # 256 x 128 input, 16-pixel patches


def _union(blocks, grid=GRID) -> np.ndarray:
    union = np.zeros(grid, dtype=bool)
    for top, left, h, w in blocks:
        union[top:top + h, left:left + w] = True
    return union


@pytest.mark.parametrize("ratio", [0.4, 0.75, 0.9])
def test_no_block_exceeds_its_cap_and_blocks_plus_fill_make_the_mask(ratio):
    gen = MaskGenerator(GRID, ratio, "block", min_block_patches=16, max_block_patches=60)
    layouts = gen.layouts(300, seed=7)
    masks = gen(300, seed=7)
    expected = int(round(ratio * 128))
    for layout, mask in zip(layouts, masks):
        assert np.array_equal(layout.mask.reshape(-1), mask.numpy())
        assert layout.blocks, "a 16 x 8 grid always takes at least one block"
        for top, left, h, w in layout.blocks:
            assert h * w <= 60 and 0 <= top and top + h <= 16 and 0 <= left and left + w <= 8
        union = _union(layout.blocks)
        assert not (union & ~layout.mask).any()
        assert int(union.sum()) + layout.num_random == expected == int(layout.mask.sum())


def test_uncapped_blocks_do_exceed_sixty_patches():
    blocks = [b for layout in MaskGenerator(GRID, 0.75, "block", max_block_patches=None).layouts(300, seed=7)
              for b in layout.blocks]
    assert max(h * w for _, _, h, w in blocks) > 60


def test_an_oversized_draw_is_rejected_by_construction():
    # area 60 at aspect 1 rounds to an 8 x 8 block = 64 patches: over the 60 cap, so with one attempt no block is
    # taken and all 64 patches come from the random fill; uncapped, the same draw is the whole mask
    capped = block_layout(GRID, 64, ScriptedRng([60.0, 0.0], [0, 0]), max_patches=60, max_attempts=1)
    assert capped.blocks == [] and capped.num_random == 64 and capped.mask.sum() == 64
    uncapped = block_layout(GRID, 64, ScriptedRng([60.0, 0.0], [0, 0]), max_patches=None, max_attempts=1)
    assert uncapped.blocks == [(0, 0, 8, 8)] and uncapped.num_random == 0
    assert uncapped.mask[:8].all() and not uncapped.mask[8:].any()


@pytest.mark.parametrize("cap", [60, None])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
def test_ratio_is_exact_with_and_without_the_cap(ratio, cap):
    masks = MaskGenerator(GRID, ratio, "block", max_block_patches=cap)(64, seed=3)
    assert masks.sum(1).tolist() == [int(round(ratio * 128))] * 64


def test_masks_and_blocks_are_deterministic_per_seed():
    gen = MaskGenerator(GRID, 0.75, "block")
    a, b = gen.layouts(16, seed=[0, 1, 2]), gen.layouts(16, seed=[0, 1, 2])
    assert all(x.blocks == y.blocks and np.array_equal(x.mask, y.mask) for x, y in zip(a, b))
    assert torch.equal(gen(16, seed=[0, 1, 2]), gen(16, seed=[0, 1, 2]))
    assert not torch.equal(gen(16, seed=[0, 1, 2]), gen(16, seed=[0, 1, 3]))
    assert gen.layouts(1, seed=5)[0].blocks == gen.layouts(1, seed=np.random.default_rng(5))[0].blocks


def test_cap_lowers_the_share_of_masks_that_hide_the_whole_torso():
    """Rows 3..7 of the 16 x 8 grid (the torso band) fully masked: 12.6% uncapped, 10.8% capped (20,000 masks)."""
    def torso_share(cap):
        masks = MaskGenerator(GRID, 0.75, "block", max_block_patches=cap)(4000, seed=11).view(-1, *GRID)
        return float(masks[:, 3:8].flatten(1).all(1).float().mean())

    capped, uncapped = torso_share(60), torso_share(None)
    half_width = 1.96 * math.sqrt(0.12 * 0.88 / 4000)  # binomial 95% half-width, about 1 point
    assert abs(uncapped - 0.126) < half_width and abs(capped - 0.108) < half_width
    assert capped < uncapped


def test_bad_block_range_is_a_config_error():
    with pytest.raises(ConfigError, match="max_block_patches"):
        MaskGenerator(GRID, 0.75, "block", min_block_patches=16, max_block_patches=8)
