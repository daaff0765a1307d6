"""Rank-list images: each query (an image or a caption) next to its top-k gallery images."""

from __future__ import annotations

import os
import textwrap

import lightning as L
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from pedlightning.metrics.records import RankListInputs


class RankListCallback(L.Callback):
    """Writes PNG grids at test end: query, then its top-``top_k`` gallery images with green (same identity)
    or red (different identity) borders. Gallery items that the reID protocol ignores for a query (same
    identity and camera) are left out, as the metric leaves them out.

    Args:
        num_queries: how many queries to draw (evenly spaced over the query set, so runs are comparable).
        top_k: gallery images per query.
        rows_per_image: queries per PNG file.
        dirname: output folder, relative to the trainer's ``default_root_dir``.
        cell_size: ``[height, width]`` of each thumbnail.
    """

    def __init__(self, num_queries: int = 16, top_k: int = 10, rows_per_image: int = 8, dirname: str = "ranklists",
                 cell_size: tuple[int, int] = (128, 64)):
        self.num_queries, self.top_k, self.rows_per_image = num_queries, top_k, rows_per_image
        self.dirname, self.cell = dirname, tuple(cell_size)
        self.written: list[str] = []

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_test_end, not on_test_epoch_end: Lightning runs callbacks' epoch-end hooks before the module's,
        # where tasks compute their metrics and these inputs.
        inputs = pl_module.ranklist_inputs() if hasattr(pl_module, "ranklist_inputs") else None
        if not trainer.is_global_zero or inputs is None or not inputs.query_items or not inputs.gallery_paths:
            return
        out_dir = os.path.join(trainer.default_root_dir, self.dirname)
        os.makedirs(out_dir, exist_ok=True)
        rows = [self._row(inputs, q) for q in self._chosen(len(inputs.query_items))]
        self.written = []
        for start in range(0, len(rows), self.rows_per_image):
            chunk = rows[start:start + self.rows_per_image]
            grid = Image.new("RGB", (chunk[0].width, sum(r.height for r in chunk)), "white")
            for i, row in enumerate(chunk):
                grid.paste(row, (0, i * row.height))
            path = os.path.join(out_dir, f"ranklist_{start // self.rows_per_image:03d}.png")
            grid.save(path)
            self.written.append(path)

    def _chosen(self, num: int) -> list[int]:
        n = min(self.num_queries, num)
        return torch.linspace(0, num - 1, n).round().long().tolist() if n > 0 else []

    def top_k_gallery(self, inputs: RankListInputs, q: int) -> list[int]:
        """Indices of the top-k gallery items for query ``q`` under the protocol's exclusions."""
        scores = F.normalize(inputs.gallery_feats.float(), dim=1) @ F.normalize(inputs.query_feats[q].float(), dim=0)
        if inputs.query_camids is not None and inputs.gallery_camids is not None:
            junk = (inputs.gallery_pids == inputs.query_pids[q]) & (inputs.gallery_camids == inputs.query_camids[q])
            scores = scores.masked_fill(junk, float("-inf"))
        k = min(self.top_k, int(torch.isfinite(scores).sum()))
        return scores.topk(k).indices.tolist()

    def _row(self, inputs: RankListInputs, q: int) -> Image.Image:
        h, w = self.cell
        pad, border = 4, 3
        query_w = 3 * w if inputs.query_is_text else w
        row = Image.new("RGB", (query_w + pad * 3 + self.top_k * (w + pad), h + 2 * pad), "white")
        if inputs.query_is_text:
            panel = Image.new("RGB", (query_w, h), (235, 235, 235))
            ImageDraw.Draw(panel).multiline_text((3, 3), textwrap.fill(inputs.query_items[q], 30), fill="black")
            row.paste(panel, (pad, pad))
        else:
            row.paste(Image.open(inputs.query_items[q]).convert("RGB").resize((w, h)), (pad, pad))
        x = query_w + pad * 3
        for g in self.top_k_gallery(inputs, q):
            colour = (0, 170, 0) if int(inputs.gallery_pids[g]) == int(inputs.query_pids[q]) else (220, 0, 0)
            thumb = Image.open(inputs.gallery_paths[g]).convert("RGB").resize((w - 2 * border, h - 2 * border))
            cell = Image.new("RGB", (w, h), colour)
            cell.paste(thumb, (border, border))
            row.paste(cell, (x, pad))
            x += w + pad
        return row
