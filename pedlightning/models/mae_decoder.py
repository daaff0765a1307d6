"""The PersonMAE decoder: predicts every patch of RegionB from the visible tokens of RegionA.

PersonMAE (arXiv 2311.04496) "aims to predict the whole RegionB at both pixel level and semantic feature
level". The paper gives no decoder details; ours is MAE's decoder (He et al., CVPR 2022, Sec. 3) with the
mask tokens replaced by *query* tokens placed at RegionB's patch centres in RegionA's coordinate frame.

Assumptions (each a constructor argument):
- Position embeddings are evaluated at continuous positions: the 2D sin-cos embedding (MAE) by default, or a
  learned grid interpolated bilinearly (clamped at the border) outside and between integer positions.
- Visible RegionA tokens get the embedding of their integer patch position; prefix tokens (CLS) get none,
  as in MAE's decoder where the CLS position embedding is zero.
- Queries and visible tokens attend to each other (MAE's full self-attention), pre-norm timm blocks.
- One linear head per target; PersonMAE's pixel and feature targets use one decoder each by default
  (BootMAE, Dong et al. 2022), or share one (``PersonMAEModule(separate_decoders=False)``).
- A query's position says where RegionB's patch centre lies in RegionA, not how large RegionB's patch is there
  (RegionB is resized from a crop of another size, so one RegionB patch covers ``scale`` RegionA patches per
  side). With ``query_scale`` the log of that scale (rows, cols) is added to every query through a linear map
  initialised to zero (it starts as a no-op); without it the decoder can only infer the zoom from the spacing
  of the query positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

PosEmbedType = Literal["sincos", "learned"]


def sincos_pos_embed_2d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """2D sin-cos embedding of continuous ``(row, col)`` positions ``(..., 2)`` -> ``(..., dim)``.

    MAE / "Attention is all you need" frequencies, one half of the channels for the row and one for the
    column: ``[sin(r w), cos(r w), sin(c w), cos(c w)]`` with ``w_k = temperature ** (-k / (dim / 4))``.
    At integer positions it equals the fixed grid embedding used for the encoder.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = temperature ** (-torch.arange(quarter, dtype=torch.float32, device=positions.device) / quarter)
    angles = positions.float().unsqueeze(-1) * omega  # (..., 2, dim/4)
    row, col = angles.unbind(-2)
    return torch.cat([row.sin(), row.cos(), col.sin(), col.cos()], dim=-1)


def grid_positions(grid: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Integer ``(row, col)`` positions of a patch grid in row-major (token) order: ``(gh * gw, 2)``."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device),
                                indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1).float()


class LearnedPosEmbed2d(nn.Module):
    """A learned ``grid`` of embeddings read at continuous positions by bilinear interpolation."""

    def __init__(self, grid: Sequence[int], dim: int):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.weight = nn.Parameter(sincos_pos_embed_2d(grid_positions(self.grid), dim)
                                   .T.reshape(1, dim, *self.grid).clone())

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        lead = positions.shape[:-2]
        pos = positions.reshape(1, -1, 1, 2).to(self.weight.dtype)
        # grid_sample's (x, y) in [-1, 1]; align_corners=True puts -1 / +1 on the first / last patch centre
        scale = pos.new_tensor([max(self.grid[1] - 1, 1), max(self.grid[0] - 1, 1)])
        xy = pos.flip(-1) / scale * 2 - 1
        out = F.grid_sample(self.weight, xy, mode="bilinear", padding_mode="border", align_corners=True)
        return out[0, :, :, 0].T.reshape(*lead, positions.shape[-2], -1)


class RegionDecoder(nn.Module):
    """MAE-style decoder whose queries sit at arbitrary (continuous) positions of RegionA's patch frame.

    Args:
        embed_dim: width of the encoder tokens.
        out_dim: per-query prediction size (``patch * patch * 3`` pixels, or the teacher's feature width).
        grid: RegionA's patch grid ``(rows, cols)`` (used by the learned position embedding).
        decoder_dim, depth, num_heads, mlp_ratio: transformer size (MAE: 512, 8, 16, 4).
        pos_embed: ``sincos`` (fixed) or ``learned`` (interpolated), see the module docstring.
        num_prefix_tokens: leading encoder tokens without a position (CLS: 1).
        query_scale: add RegionB's per-sample scale in RegionA's frame to the queries (see the module docstring).

    The query token is named ``mask_token`` (its role in MAE) so the optimizer's no-weight-decay rule for MAE's
    mask token (:func:`pedlightning.optim.param_groups`) exempts it too.
    """

    def __init__(self, embed_dim: int, out_dim: int, grid: Sequence[int], decoder_dim: int = 512, depth: int = 4,
                 num_heads: int = 16, mlp_ratio: float = 4.0, pos_embed: PosEmbedType = "sincos",
                 num_prefix_tokens: int = 1, query_scale: bool = False):
        super().__init__()
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        self.decoder_dim = decoder_dim
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.scale_embed = nn.Linear(2, decoder_dim) if query_scale else None
        self.pos_embed = LearnedPosEmbed2d(grid, decoder_dim) if pos_embed == "learned" else None
        self.blocks = nn.Sequential(*[Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, out_dim)
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)
        if self.scale_embed is not None:
            nn.init.zeros_(self.scale_embed.weight)
            nn.init.zeros_(self.scale_embed.bias)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """MAE's initialisation: xavier-uniform linear layers, zero biases, unit LayerNorms."""
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def position_embedding(self, positions: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            return self.pos_embed(positions)
        return sincos_pos_embed_2d(positions, self.decoder_dim)

    def forward(self, tokens: torch.Tensor, visible_pos: torch.Tensor, query_pos: torch.Tensor,
                query_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions ``(B, Q, out_dim)`` for queries at ``query_pos`` ``(B, Q, 2)``.

        ``tokens``: encoder output ``(B, prefix + K, embed_dim)`` for the ``K`` visible patches, whose
        positions are ``visible_pos`` ``(B, K, 2)``. ``query_scale`` ``(B, 2)``: size of one query patch in
        RegionA patches (rows, cols); required when the decoder was built with ``query_scale=True``.
        """
        x = self.embed(tokens)
        p = self.num_prefix_tokens
        visible = x[:, p:] + self.position_embedding(visible_pos).to(x.dtype)
        queries = self.mask_token.expand(x.shape[0], query_pos.shape[1], -1)
        queries = queries + self.position_embedding(query_pos).to(x.dtype)
        if self.scale_embed is not None:
            if query_scale is None:
                raise ValueError("this decoder was built with query_scale=True: pass query_scale (B, 2)")
            queries = queries + self.scale_embed(query_scale.log().to(x.dtype)).unsqueeze(1)
        x = self.blocks(torch.cat([x[:, :p], visible, queries], dim=1))
        return self.head(self.norm(x[:, -query_pos.shape[1]:]))
