"""ReconstructionGrid: labelled rows (input / target / prediction), the images themselves, TensorBoard logging."""

import numpy as np
import torch
from PIL import Image

from pedlightning.callbacks.reconstruction import ROW_LABELS, ReconstructionGrid
from pedlightning.data.transforms.reid import denormalize

H, W, N = 32, 16, 3


class _Logger:
    def __init__(self):
        self.experiment = self
        self.images = []

    def add_image(self, tag, image, step):
        self.images.append((tag, tuple(image.shape), step))


class _Trainer:
    is_global_zero = True
    current_epoch = 0
    global_step = 7

    def __init__(self, root):
        self.default_root_dir = str(root)
        self.loggers = [_Logger()]


class _MAE(torch.nn.Module):
    """Stands in for PersonMAEModule: each output row is a constant shade, so rows are told apart by colour."""

    out_dims = {"pixel": 3 * 8 * 8}
    device = torch.device("cpu")

    def reconstruct(self, batch):
        a = batch["region_a"]
        return {"masked_a": torch.full_like(a, -1.5), "region_b": batch["region_b"], "prediction": torch.zeros_like(a)}


def test_rows_are_labelled_and_show_the_images(tmp_path):
    torch.manual_seed(0)
    batch = {"region_a": torch.randn(N + 2, 3, H, W), "region_b": torch.randn(N + 2, 3, H, W),
             "box_a": torch.zeros(N + 2, 4), "box_b": torch.zeros(N + 2, 4)}
    callback, trainer, module = ReconstructionGrid(num_images=N), _Trainer(tmp_path), _MAE()
    callback.on_fit_start(trainer, module)
    callback.on_train_batch_end(trainer, module, None, batch, 0)
    callback.on_train_epoch_end(trainer, module)
    assert callback.last_path == str(tmp_path / "reconstructions" / "epoch=000.png")
    grid = np.asarray(Image.open(callback.last_path).convert("RGB")).astype(int)
    band = callback.label_width
    assert list(ROW_LABELS) == ["masked_a", "region_b", "prediction"]
    assert grid.shape == (3 * (H + 2) + 2, band + N * (W + 2) + 2, 3)
    # The band is white except for the text of each row's label, written on that row's height.
    labels = grid[:, :band]
    dark = labels.sum(-1) < 300
    for row in range(3):
        top = 2 + row * (H + 2)
        assert dark[top: top + H].sum() > 30, row
    assert not dark[:2].any() and not dark[-2:].any()
    assert (labels.max(-1) == labels.min(-1)).all()  # black text on white: no (coloured) image pixel in the band
    # Right of the band: RegionB in row 1, image for image.
    target = (denormalize(batch["region_b"][1]).permute(1, 2, 0).numpy() * 255).round()
    cell = grid[2 + (H + 2): 2 + (H + 2) + H, band + 2 + (W + 2): band + 2 + (W + 2) + W]
    assert np.abs(cell - target).max() <= 1
    # TensorBoard got the same grid (float CHW in [0, 1]) at the trainer's step.
    assert trainer.loggers[0].images == [("reconstruction", (3, *grid.shape[:2]), 7)]
