"""RankListCallback: top-k order under the reID exclusions, borders by identity, legend and captions, TensorBoard;
the val mAP on the progress bar of a retrieval task."""

import glob
import io

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pedlightning.callbacks import RankListCallback, RankListInputs
from pedlightning.callbacks.ranklist import MATCH_COLOUR, OTHER_COLOUR, QUERY_COLOUR
from pedlightning.data.datamodules import ReIDDataModule
from pedlightning.metrics import reid_evaluate
from pedlightning.models.encoders import ImageEncoderConfig
from pedlightning.tasks import ReIDModule

pytestmark = pytest.mark.usefixtures("one_thread")


class _Trainer:
    is_global_zero = True
    global_step = 0

    def __init__(self, root, loggers=()):
        self.default_root_dir = str(root)
        self.loggers = list(loggers)


class _Task:
    def __init__(self, inputs):
        self.inputs = inputs

    def ranklist_inputs(self):
        return self.inputs


def _images(tmp_path, n, prefix):
    paths = []
    for i in range(n):
        path = tmp_path / f"{prefix}{i}.png"
        Image.new("RGB", (32, 64), (120, 120, 120)).save(path)
        paths.append(str(path))
    return paths


def _reid_inputs(tmp_path):
    # Gallery 0 is the query's own identity and camera (excluded by the protocol), gallery 1 the same identity
    # from another camera, gallery 2 and 3 other identities; similarity decreases with the gallery index.
    gallery = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.7, 0.3], [0.1, 0.9]])
    return RankListInputs(torch.tensor([[1.0, 0.0]]), gallery, torch.tensor([5]), torch.tensor([5, 5, 7, 8]),
                          torch.tensor([0]), torch.tensor([0, 1, 0, 2]), _images(tmp_path, 1, "q"),
                          _images(tmp_path, 4, "g"))


def _dark_pixels(region):
    return int((np.asarray(region).astype(int).sum(-1) < 300).sum())


def test_top_k_excludes_same_identity_same_camera_and_colours_borders(tmp_path):
    inputs = _reid_inputs(tmp_path)
    callback = RankListCallback(num_queries=1, top_k=3, cell_size=(64, 32))
    assert callback.top_k_gallery(inputs, 0) == [1, 2, 3]
    indices, scores = callback.top_k_scores(inputs, 0)
    expected = torch.nn.functional.normalize(inputs.gallery_feats, dim=1)[[1, 2, 3]] @ torch.tensor([1.0, 0.0])
    assert indices == [1, 2, 3] and scores == pytest.approx(expected.tolist())
    callback.on_test_end(_Trainer(tmp_path / "run"), _Task(inputs))
    assert callback.written == [str(tmp_path / "run" / "ranklists" / "ranklist_000.png")]
    grid = np.asarray(Image.open(callback.written[0]))
    pad, w = 4, 32
    row_w, row_h = callback.row_size(inputs)
    assert (row_w, row_h) == (w + 3 * pad + 3 * (w + pad), 64 + callback.caption_height + 2 * pad)
    legend_h = callback.legend(row_w).height
    assert legend_h > 3 * callback.line_height  # 152 pixels wide: the legend wraps onto several lines
    assert grid.shape == (legend_h + row_h, row_w, 3)
    top = legend_h + pad  # the row's first pixel line inside the padding
    assert tuple(grid[top, pad]) == QUERY_COLOUR
    first_cell_x = w + 3 * pad
    corners = [tuple(grid[top, first_cell_x + k * (w + pad)]) for k in range(3)]
    assert corners == [MATCH_COLOUR, OTHER_COLOUR, OTHER_COLOUR]
    # Rank, score, pid and camera are written under every image, in the caption band; the thumbnails are plain.
    captions = grid[top + 64: top + 64 + callback.caption_height]
    for x in [pad] + [first_cell_x + k * (w + pad) for k in range(3)]:
        assert _dark_pixels(captions[:, x: x + w]) > 20
    assert _dark_pixels(grid[top + 3: top + 61, first_cell_x + 3: first_cell_x + w - 3]) == 0
    # The legend shows the three border colours as swatches, followed by their names.
    legend = grid[:legend_h]
    for colour in (QUERY_COLOUR, MATCH_COLOUR, OTHER_COLOUR):
        assert (legend == colour).all(-1).sum() >= 25, colour
    assert _dark_pixels(legend) > 100


def test_text_queries_get_a_caption_panel(tmp_path):
    inputs = RankListInputs(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), torch.tensor([0, 1]), None, None,
                            ["a man in a red shirt", "a woman with a backpack"], _images(tmp_path, 2, "g"),
                            query_is_text=True)
    callback = RankListCallback(num_queries=2, top_k=2, cell_size=(64, 32))
    assert callback.top_k_gallery(inputs, 1) == [1, 0]
    callback.on_test_end(_Trainer(tmp_path / "run"), _Task(inputs))
    grid = np.asarray(Image.open(callback.written[0]))
    row_h = 64 + callback.caption_height + 8
    width = 3 * 32 + 3 * 4 + 2 * 36
    legend_h = callback.legend(width).height
    assert grid.shape == (legend_h + 2 * row_h, width, 3)
    for q in range(2):  # the first hit of each caption is its own identity
        assert tuple(grid[legend_h + q * row_h + 4, 3 * 32 + 12]) == MATCH_COLOUR


def test_pngs_are_logged_to_tensorboard(tmp_path):
    inputs = _reid_inputs(tmp_path)
    logger = TensorBoardLogger(str(tmp_path / "tb"), name="logs")
    callback = RankListCallback(num_queries=1, top_k=3, cell_size=(64, 32))
    callback.on_test_end(_Trainer(tmp_path / "run", [logger]), _Task(inputs))
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert events.Tags()["images"] == ["ranklist/000"]
    (image,) = events.Images("ranklist/000")
    png = Image.open(callback.written[0])
    assert (image.width, image.height) == png.size
    with Image.open(io.BytesIO(image.encoded_image_string)) as logged:
        assert np.array_equal(np.asarray(logged.convert("RGB")), np.asarray(png.convert("RGB")))


def test_fit_shows_val_mAP_on_the_progress_bar_and_test_writes_rank_lists(tmp_path, synthetic_market):
    L.seed_everything(0)
    data = ReIDDataModule("market1501", synthetic_market, img_size=(64, 32), batch_size=16, num_workers=0)
    model = ReIDModule(ImageEncoderConfig("resnet_tiny_test", (64, 32), drop_path_rate=0.0))
    callback = RankListCallback(num_queries=3, top_k=4, rows_per_image=2, cell_size=(64, 32))
    logger = TensorBoardLogger(str(tmp_path), name="logs")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        use_distributed_sampler=False, default_root_dir=str(tmp_path), logger=logger,
                        callbacks=[callback])
    trainer.fit(model, data)
    assert set(trainer.progress_bar_metrics) == {"train/loss", "train/id_loss", "train/triplet_loss", "train/acc",
                                                 "val/mAP"}
    model.eval()
    feats = {}
    with torch.no_grad():
        for batch in data.val_dataloader():
            feats.setdefault(int(batch["part"][0]), []).append((model(batch["image"]), batch["pid"], batch["camid"]))
    q, g = ([torch.cat(c) for c in zip(*feats[p])] for p in (0, 1))
    expected = reid_evaluate(q[0], g[0], q[1], g[1], q[2], g[2])["mAP"]
    assert trainer.progress_bar_metrics["val/mAP"] == pytest.approx(expected, abs=1e-5)

    trainer.test(model, data, verbose=False)
    assert [p.rsplit("/", 1)[1] for p in sorted(glob.glob(str(tmp_path / "ranklists" / "*.png")))] == [
        "ranklist_000.png", "ranklist_001.png"]  # 3 queries, 2 per file
    row_w, row_h = callback.row_size(model.ranklist_inputs())
    assert Image.open(callback.written[1]).size == (row_w, callback.legend(row_w).height + row_h)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert events.Tags()["images"] == ["ranklist/000", "ranklist/001"]
