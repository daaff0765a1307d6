"""RankListCallback: top-k order under the reID exclusions, and green/red borders by identity."""

import numpy as np
import torch
from PIL import Image

from pedlightning.callbacks import RankListCallback, RankListInputs


class _Trainer:
    is_global_zero = True

    def __init__(self, root):
        self.default_root_dir = str(root)


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


def test_top_k_excludes_same_identity_same_camera_and_colours_borders(tmp_path):
    # Gallery 0 is the query's own identity and camera (excluded by the protocol), gallery 1 the same identity
    # from another camera, gallery 2 and 3 other identities; similarity decreases with the gallery index.
    gallery = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.7, 0.3], [0.1, 0.9]])
    inputs = RankListInputs(torch.tensor([[1.0, 0.0]]), gallery, torch.tensor([5]), torch.tensor([5, 5, 7, 8]),
                            torch.tensor([0]), torch.tensor([0, 1, 0, 2]), _images(tmp_path, 1, "q"),
                            _images(tmp_path, 4, "g"))
    callback = RankListCallback(num_queries=1, top_k=3, cell_size=(64, 32))
    assert callback.top_k_gallery(inputs, 0) == [1, 2, 3]
    callback.on_test_end(_Trainer(tmp_path / "run"), _Task(inputs))
    assert len(callback.written) == 1
    grid = np.asarray(Image.open(callback.written[0]))
    assert grid.shape[0] == 64 + 8
    pad, w = 4, 32
    first_cell_x = w + 3 * pad
    corners = [tuple(grid[pad, first_cell_x + k * (w + pad)]) for k in range(3)]
    assert corners == [(0, 170, 0), (220, 0, 0), (220, 0, 0)]


def test_text_queries_get_a_caption_panel(tmp_path):
    inputs = RankListInputs(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), torch.tensor([0, 1]), None, None,
                            ["a man in a red shirt", "a woman with a backpack"], _images(tmp_path, 2, "g"),
                            query_is_text=True)
    callback = RankListCallback(num_queries=2, top_k=2, cell_size=(64, 32))
    assert callback.top_k_gallery(inputs, 1) == [1, 0]
    callback.on_test_end(_Trainer(tmp_path / "run"), _Task(inputs))
    grid = np.asarray(Image.open(callback.written[0]))
    assert grid.shape == (2 * 72, 3 * 32 + 3 * 4 + 2 * 36, 3)
    assert tuple(grid[4, 3 * 32 + 12]) == (0, 170, 0)  # the first hit of each caption is its own identity
