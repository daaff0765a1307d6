"""Rank-list images: each query (an image or a caption) next to its top-k gallery images."""

from __future__ import annotations

import os
import textwrap

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from pedlightning.callbacks.reconstruction import log_image
from pedlightning.metrics.records import RankListInputs

QUERY_COLOUR = (40, 90, 220)
MATCH_COLOUR = (0, 170, 0)
OTHER_COLOUR = (220, 0, 0)


class RankListCallback(L.Callback):
    """Writes PNG grids at test end: each query, then its top-``top_k`` gallery images by cosine similarity.

    Every PNG starts with a legend band (:meth:`legend`): query border (blue), same identity (green), other
    identity (red).
    Under each image a caption band gives the rank and similarity score (gallery) and the pid and camera
    (camera as in the file names, 1-based). Gallery items that the reID protocol ignores for a query (same
    identity and camera) are left out, as the metric leaves them out. The PNGs go to
    ``<default_root_dir>/<dirname>/ranklist_NNN.png`` and, with a TensorBoard logger, to TensorBoard
    (``add_image``, tag ``ranklist/NNN``; loggers with a ``log_image`` method get them too).

    Args:
        num_queries: how many queries to draw (evenly spaced over the query set, so runs are comparable).
        top_k: gallery images per query.
        rows_per_image: queries per PNG file.
        dirname: output folder, relative to the trainer's ``default_root_dir``.
        cell_size: ``[height, width]`` of each thumbnail.
        font_size: caption text height in pixels (Pillow's built-in font; a bitmap font without FreeType).
    """

    pad, border = 4, 3

    def __init__(self, num_queries: int = 16, top_k: int = 10, rows_per_image: int = 8, dirname: str = "ranklists",
                 cell_size: tuple[int, int] = (128, 64), font_size: int = 10):
        self.num_queries, self.top_k, self.rows_per_image = num_queries, top_k, rows_per_image
        self.dirname, self.cell = dirname, tuple(cell_size)
        self.font = ImageFont.load_default(size=font_size)
        self.line_height = font_size + 2
        self.caption_height = 2 * self.line_height + 2
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
            legend = self.legend(chunk[0].width)
            grid = Image.new("RGB", (chunk[0].width, legend.height + sum(r.height for r in chunk)), "white")
            grid.paste(legend, (0, 0))
            for i, row in enumerate(chunk):
                grid.paste(row, (0, legend.height + i * row.height))
            number = start // self.rows_per_image
            path = os.path.join(out_dir, f"ranklist_{number:03d}.png")
            grid.save(path)
            self.written.append(path)
            log_image(trainer, f"ranklist/{number:03d}", torch.from_numpy(np.asarray(grid).copy()).permute(2, 0, 1))

    def _chosen(self, num: int) -> list[int]:
        n = min(self.num_queries, num)
        return torch.linspace(0, num - 1, n).round().long().tolist() if n > 0 else []

    def top_k_scores(self, inputs: RankListInputs, q: int) -> tuple[list[int], list[float]]:
        """Indices and cosine similarities of the top-k gallery items for query ``q`` under the protocol's
        exclusions, best first."""
        scores = F.normalize(inputs.gallery_feats.float(), dim=1) @ F.normalize(inputs.query_feats[q].float(), dim=0)
        if inputs.query_camids is not None and inputs.gallery_camids is not None:
            junk = (inputs.gallery_pids == inputs.query_pids[q]) & (inputs.gallery_camids == inputs.query_camids[q])
            scores = scores.masked_fill(junk, float("-inf"))
        k = min(self.top_k, int(torch.isfinite(scores).sum()))
        top = scores.topk(k)
        return top.indices.tolist(), top.values.tolist()

    def top_k_gallery(self, inputs: RankListInputs, q: int) -> list[int]:
        """Indices of the top-k gallery items for query ``q`` under the protocol's exclusions."""
        return self.top_k_scores(inputs, q)[0]

    def query_width(self, inputs: RankListInputs) -> int:
        """Width of the query cell: a caption panel is three thumbnails wide."""
        return 3 * self.cell[1] if inputs.query_is_text else self.cell[1]

    def row_size(self, inputs: RankListInputs) -> tuple[int, int]:
        """(width, height) of one query's row: query cell, a gap, ``top_k`` gallery cells, captions below."""
        h, w = self.cell
        return (self.query_width(inputs) + 3 * self.pad + self.top_k * (w + self.pad),
                h + self.caption_height + 2 * self.pad)

    def legend(self, width: int) -> Image.Image:
        """The legend band of a PNG ``width`` pixels wide: colour swatches, then how to read the captions; items
        that do not fit on a line go to the next one."""
        swatch = self.line_height - 2
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        items = [(colour, text, swatch + 3 + int(probe.textlength(text, font=self.font))) for colour, text in
                 ((QUERY_COLOUR, "query"), (MATCH_COLOUR, "same identity"), (OTHER_COLOUR, "other identity"),
                  (None, "under each image: #rank: cosine score, then pid and camera"))]
        places, x, line = [], self.pad, 0
        for colour, text, item_width in items:
            if x > self.pad and x + item_width > width - self.pad:
                x, line = self.pad, line + 1
            places.append((colour, text, x, self.pad + line * self.line_height))
            x += item_width + 3 * self.pad
        band = Image.new("RGB", (width, (line + 1) * self.line_height + 2 * self.pad), (245, 245, 245))
        draw = ImageDraw.Draw(band)
        for colour, text, x, y in places:
            if colour is None:
                draw.text((x, y), text, fill=(90, 90, 90), font=self.font)
                continue
            draw.rectangle((x, y + 1, x + swatch, y + 1 + swatch), fill=colour)
            draw.text((x + swatch + 3, y), text, fill="black", font=self.font)
        return band

    def _label(self, inputs: RankListInputs, pids: torch.Tensor, camids: torch.Tensor | None, i: int) -> str:
        pid = f"pid {int(pids[i])}"
        return pid if camids is None else f"{pid} c{int(camids[i]) + 1}"

    def _cell(self, image: Image.Image, colour: tuple[int, int, int], lines: tuple[str, str], width: int
              ) -> Image.Image:
        h, b = self.cell[0], self.border
        cell = Image.new("RGB", (width, h + self.caption_height), "white")
        framed = Image.new("RGB", (width, h), colour)
        framed.paste(image.resize((width - 2 * b, h - 2 * b)), (b, b))
        cell.paste(framed, (0, 0))
        draw = ImageDraw.Draw(cell)
        for n, line in enumerate(lines):
            draw.text((1, h + 1 + n * self.line_height), line, fill="black", font=self.font)
        return cell

    def _row(self, inputs: RankListInputs, q: int) -> Image.Image:
        w, pad = self.cell[1], self.pad
        row = Image.new("RGB", self.row_size(inputs), "white")
        query_label = ("query", self._label(inputs, inputs.query_pids, inputs.query_camids, q))
        if inputs.query_is_text:
            size = (self.query_width(inputs) - 2 * self.border, self.cell[0] - 2 * self.border)
            panel = Image.new("RGB", size, (235, 235, 235))
            ImageDraw.Draw(panel).multiline_text((3, 3), textwrap.fill(inputs.query_items[q], 30), fill="black",
                                                 font=self.font)
        else:
            panel = Image.open(inputs.query_items[q]).convert("RGB")
        row.paste(self._cell(panel, QUERY_COLOUR, query_label, self.query_width(inputs)), (pad, pad))
        x = self.query_width(inputs) + pad * 3
        indices, scores = self.top_k_scores(inputs, q)
        for rank, (g, score) in enumerate(zip(indices, scores), start=1):
            same = int(inputs.gallery_pids[g]) == int(inputs.query_pids[q])
            label = (f"#{rank}: {score:.3f}", self._label(inputs, inputs.gallery_pids, inputs.gallery_camids, g))
            thumb = Image.open(inputs.gallery_paths[g]).convert("RGB")
            row.paste(self._cell(thumb, MATCH_COLOUR if same else OTHER_COLOUR, label, w), (x, pad))
            x += w + pad
        return row
