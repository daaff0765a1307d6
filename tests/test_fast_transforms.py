"""The fast paths of the batched training transforms: CHW resize with the flip folded in, the multiply-add
normalisation, and decoded uint8 batches resized and finished after the transfer (``finish_on_device``)."""

from __future__ import annotations

import random

import lightning as L
import pytest
import torch
from torchvision.transforms.v2 import functional as F2

from pedlightning.data.datamodules import LUPersonDataModule, ReIDDataModule
from pedlightning.data.datamodules.common import finishes_on_device
from pedlightning.data.synthetic import write_luperson_shards
from pedlightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_train_transform
from pedlightning.data.transforms.batched import (
    FINISH_KEY,
    PlacedImage,
    collate_deferred,
    erase_masked,
    finish_batch,
    finish_images,
    pack_images,
    resize,
    resize_batch,
)
from pedlightning.data.transforms.regions import RegionPairTransform

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = (32, 16)
BICUBIC = F2.InterpolationMode.BICUBIC


def _pixels(height: int, width: int, channels_last: bool, seed: int) -> torch.Tensor:
    """Random uint8 CHW pixels, laid out as decode_image returns them (channels last) or contiguous (PIL's)."""
    g = torch.Generator().manual_seed(seed)
    if channels_last:
        return torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)


def test_resize_gives_torchvision_pixels_in_chw_order_and_flips_exactly():
    """Enlarging, shrinking, crops, both input layouts: exactly F2.resize's pixels (then flipped), contiguous."""
    rng = random.Random(0)
    for case in range(40):
        height, width = rng.randint(20, 300), rng.randint(10, 150)
        size = rng.choice([(256, 128), (64, 32), (17, 9)])
        image = _pixels(height, width, channels_last=case % 2 == 0, seed=case)
        top, left = rng.randint(0, height // 3), rng.randint(0, width // 3)
        box = (top, left, rng.randint(1, height - top), rng.randint(1, width - left))
        for crop in (None, box):
            source = image if crop is None else image[:, box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
            expected = F2.resize(source.contiguous(), list(size), interpolation=BICUBIC, antialias=True)
            out = resize(image, size, crop)
            assert out.is_contiguous() and torch.equal(out, expected), (case, crop)
            assert torch.equal(resize(image, size, crop, flip=True), expected.flip(-1)), (case, crop)
    same = _pixels(*SIZE, channels_last=True, seed=99)
    assert torch.equal(resize(same, SIZE), same) and resize(same, SIZE).is_contiguous()
    assert torch.equal(resize(same, SIZE, flip=True), same.flip(-1))
    bilinear = resize(_pixels(50, 20, True, 1), SIZE, interpolation=F2.InterpolationMode.BILINEAR)
    assert bilinear.is_contiguous() and bilinear.shape == (3, *SIZE)


def _random_image(rng: random.Random, size: tuple[int, int], interpolation: F2.InterpolationMode,
                  shift_range: int = 12) -> PlacedImage:
    """A decoded image of random size with a random crop (or none), flip and shift, to be resized to ``size``."""
    height, width = rng.randint(20, 300), rng.randint(10, 150)
    pixels = _pixels(height, width, channels_last=rng.random() < 0.7, seed=rng.randrange(10**6))
    top, left = rng.randint(0, height // 3), rng.randint(0, width // 3)
    box = rng.choice([None, (top, left, rng.randint(1, height - top), rng.randint(1, width - left))])
    shift = (rng.randint(-shift_range, shift_range), rng.randint(-shift_range, shift_range))
    return PlacedImage(pixels, shift, None, box, size, rng.random() < 0.5, interpolation)


def test_resize_batch_gives_exactly_the_worker_pixels_for_mixed_sizes_crops_flips_and_shifts():
    """The device resize reproduces torch's uint8 kernels bit for bit: enlarging and shrinking, both filters,
    images of different sizes in one canvas, identity spans, flips, shifts and shifted-out images."""
    rng = random.Random(0)
    for trial in range(24):
        size = rng.choice([(256, 128), (64, 32), (17, 9)])
        mode = (BICUBIC, F2.InterpolationMode.BILINEAR)[trial % 2]
        images = [_random_image(rng, size, mode) for _ in range(5)]
        images.append(PlacedImage(_pixels(*size, channels_last=True, seed=trial), (0, 0), None, None, size,
                                  interpolation=mode))  # already at the output size
        images.append(PlacedImage(images[0].pixels, (-400, 3), None, images[0].box, size, True, mode))  # out of frame
        canvas, params = pack_images(images, IMAGENET_MEAN, IMAGENET_STD)
        assert canvas.dtype == torch.uint8 and canvas.shape[-2:] == (max(i.pixels.shape[-2] for i in images),
                                                                    max(i.pixels.shape[-1] for i in images))
        out = resize_batch(canvas, params["box"], params["flip"], params["shift"], size, params["interpolation"])
        expected = finish_images(images, (0, 0, 0), (1 / 255,) * 3)  # mean 0, std 1/255: the pixels as floats
        assert torch.equal(out.float(), expected), trial
        assert not out[-1].any()  # shifted out: all padding
        finished = finish_batch({"image": canvas, FINISH_KEY: {"image": params}})["image"]
        assert torch.equal(finished, finish_images(images, IMAGENET_MEAN, IMAGENET_STD)), trial
    nearest = [_random_image(rng, (32, 16), F2.InterpolationMode.NEAREST) for _ in range(3)]
    canvas, params = pack_images(nearest, IMAGENET_MEAN, IMAGENET_STD)  # no device filter: resized in the worker
    assert canvas.shape == (3, 3, 32, 16) and params["interpolation"] == "bicubic" and not params["flip"].any()
    finished = finish_batch({"image": canvas, FINISH_KEY: {"image": params}})["image"]
    assert torch.equal(finished, finish_images(nearest, IMAGENET_MEAN, IMAGENET_STD))
    with pytest.raises(ValueError, match="share an output size"):
        pack_images([_random_image(rng, (32, 16), BICUBIC), _random_image(rng, (16, 8), BICUBIC)], (0,) * 3, (1,) * 3)


def _placed(seed: int, shift: tuple[int, int], erase: tuple[int, int, int, int] | None) -> PlacedImage:
    return PlacedImage(_pixels(*SIZE, channels_last=False, seed=seed), shift, erase)


def test_finish_images_normalises_like_torchvision_and_pads_with_black():
    images = [_placed(0, (0, 0), None), _placed(1, (3, -2), None), _placed(2, (-40, 5), None)]
    batch = finish_images(images, IMAGENET_MEAN, IMAGENET_STD)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    black = (0 - mean) / std
    expected = [(images[0].pixels / 255 - mean) / std]
    shifted = torch.zeros(3, *SIZE, dtype=torch.uint8)
    shifted[:, :SIZE[0] - 3, 2:] = images[1].pixels[:, 3:, :SIZE[1] - 2]  # output (y, x) shows input (y + 3, x - 2)
    expected.append((shifted / 255 - mean) / std)
    expected.append(black.expand(3, *SIZE))  # shifted out of the frame entirely: all padding
    torch.testing.assert_close(batch, torch.stack(expected), rtol=0, atol=1e-5)
    assert torch.allclose(batch[1, :, -3:], black.expand(3, 3, SIZE[1]), atol=1e-6)


def test_packed_batches_finish_to_the_float_batch_outside_the_erased_regions():
    boxes = [None, (2, 3, 10, 5), (0, 0, 4, 16), None]
    shifts = [(0, 0), (1, -1), (-7, 10), (-40, 5)]  # the last: shifted out of the frame, all padding
    images = [_placed(i, shift, box) for i, (shift, box) in enumerate(zip(shifts, boxes))]
    torch.manual_seed(0)
    expected = finish_images(images, IMAGENET_MEAN, IMAGENET_STD)
    pixels, params = pack_images(images, IMAGENET_MEAN, IMAGENET_STD)
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, *SIZE)
    assert all(torch.equal(p, image.pixels) for p, image in zip(pixels, images))  # whole: shifted on the device
    assert params["shift"].tolist() == [list(s) for s in shifts]
    assert params["erase"].tolist() == [[0, 0, 0, 0], [2, 3, 10, 5], [0, 0, 4, 16], [0, 0, 0, 0]]
    erased = torch.zeros(4, 1, *SIZE, dtype=torch.bool)
    for i, box in enumerate(boxes):
        if box is not None:
            top, left, h, w = box
            erased[i, :, top:top + h, left:left + w] = True
    for finished in (finish_batch({"image": pixels.clone(), FINISH_KEY: {"image": params}})["image"],  # CPU path
                     erase_masked(finish_batch({"image": pixels.clone(), FINISH_KEY: {
                         "image": {**params, "erase": torch.zeros(4, 4, dtype=torch.int64)}}})["image"],
                         params["erase"])):  # the GPU path's select, run on the CPU
        assert finished.dtype == torch.float32
        keep = ~erased.expand_as(finished)
        torch.testing.assert_close(finished[keep], expected[keep], rtol=0, atol=1e-5)
        assert not torch.isclose(finished[~keep], expected[~keep]).all()  # fresh noise, not the float path's
    noise = erase_masked(torch.zeros(64, 3, *SIZE), torch.tensor([[4, 2, 20, 10]] * 64))
    inside = noise[:, :, 4:24, 2:12]
    assert abs(inside.mean().item()) < 0.03 and abs(inside.std().item() - 1) < 0.03
    outside = noise.clone()
    outside[:, :, 4:24, 2:12] = 0
    assert not outside.any() and inside.all()  # noise exactly in the box
    plain = {"image": torch.ones(2, 3, *SIZE), "pid": torch.tensor([1, 2])}
    assert finish_batch(plain) is plain and finish_batch([1, 2]) == [1, 2]  # other batches pass through


def test_collate_packs_for_a_transform_that_finishes_on_device():
    image = _pixels(64, 30, channels_last=True, seed=3)
    packed_t = build_train_transform(SIZE, erasing_prob=1.0, defer=True, finish_on_device=True)
    float_t = build_train_transform(SIZE, erasing_prob=1.0, defer=True)
    random.seed(0)
    packed = collate_deferred([{"image": packed_t(image), "pid": 1} for _ in range(4)])
    random.seed(0)
    floats = collate_deferred([{"image": float_t(image), "pid": 1} for _ in range(4)])
    assert packed["image"].dtype == torch.uint8 and set(packed) == {"image", "pid", FINISH_KEY}
    assert (packed[FINISH_KEY]["image"]["erase"][:, 2:] > 0).all()  # the same draws: every image was erased
    finished = finish_batch(packed)
    assert set(finished) == {"image", "pid"} and finished["image"].dtype == torch.float32
    same = (finished["image"] - floats["image"]).abs() < 1e-5
    assert 0.4 < same.float().mean().item() < 0.995  # equal outside the erased regions (same seed, same boxes)
    regions = RegionPairTransform(SIZE, defer=True, finish_on_device=True, rng=random.Random(0))
    reference = RegionPairTransform(SIZE, defer=True, rng=random.Random(0))
    batch = finish_batch(collate_deferred([regions(image) for _ in range(3)]))
    expected = collate_deferred([reference(image) for _ in range(3)])
    for key in ("region_a", "region_b", "box_a", "box_b"):
        torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=1e-5)


class _Recorder(L.LightningModule):
    """Records what the training step receives."""

    def __init__(self, key: str):
        super().__init__()
        self.key, self.seen = key, []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        self.seen.append((batch[self.key].dtype, FINISH_KEY in batch, float(batch[self.key].abs().max())))
        return (self.weight * batch[self.key].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(model: L.LightningModule, data: L.LightningDataModule, tmp_path) -> None:
    L.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_steps=2, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=0).fit(model, data)


def test_datamodules_finish_on_device_in_on_after_batch_transfer(synthetic_market, tmp_path):
    """With ``finish_on_device`` the loader yields uint8, and the step still gets normalised float batches."""
    reid = ReIDDataModule(root=synthetic_market, img_size=SIZE, batch_size=8, num_instances=4, num_workers=0,
                          finish_on_device=True)
    reid.setup("fit")
    assert next(iter(reid.train_dataloader()))["image"].dtype == torch.uint8
    model = _Recorder("image")
    _fit(model, reid, tmp_path / "reid")
    assert [s[:2] for s in model.seen] == [(torch.float32, False)] * 2 and max(s[2] for s in model.seen) > 1.5
    shards = write_luperson_shards(str(tmp_path / "shards"), num_images=16, shard_size=8, size=(64, 32))
    lup = LUPersonDataModule(root=shards, img_size=SIZE, batch_size=4, num_workers=0, shuffle_buffer=1,
                             finish_on_device=True)
    model = _Recorder("region_a")
    _fit(model, lup, tmp_path / "lup")
    assert [s[:2] for s in model.seen] == [(torch.float32, False)] * 2
    default = ReIDDataModule(root=synthetic_market, img_size=SIZE, batch_size=8, num_instances=4, num_workers=0)
    default.setup("fit")
    assert next(iter(default.train_dataloader()))["image"].dtype == torch.float32  # no trainer on a GPU: float


def test_finish_on_device_defaults_to_whether_the_trainer_runs_on_a_gpu():
    cpu = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert not finishes_on_device(None, None) and not finishes_on_device(None, cpu)
    assert finishes_on_device(True, None) and not finishes_on_device(False, cpu)


class _Decoded(torch.utils.data.Dataset):
    """Decoded images of two sizes through the reID transform (no random draws), with integer and string keys."""

    def __init__(self, transform):
        self.transform = transform

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        pixels = _pixels(40 + 8 * (index % 2), 20, channels_last=True, seed=index)
        return {"image": self.transform(pixels), "pid": index // 2, "camid": index % 3, "path": f"{index}.jpg"}


def test_a_worker_hands_over_the_packed_batch_in_two_storages_with_default_collate_values():
    """Canvas and per-image numbers share one storage, the integer keys another (a worker passes each storage on its
    own); through a real worker process the batch finishes to exactly what the in-process loader gives."""
    transform = build_train_transform(SIZE, flip_prob=0.0, padding=0, erasing_prob=0.0, defer=True,
                                      finish_on_device=True)
    items = [_Decoded(transform)[i] for i in range(4)]
    batch = collate_deferred(items)
    params = batch[FINISH_KEY]["image"]
    storage = batch["image"].untyped_storage().data_ptr()
    assert all(params[k].untyped_storage().data_ptr() == storage for k in ("box", "flip", "shift", "erase"))
    assert batch["pid"].untyped_storage().data_ptr() == batch["camid"].untyped_storage().data_ptr()
    expected = torch.utils.data.default_collate([{k: item[k] for k in ("pid", "camid", "path")} for item in items])
    for key in ("pid", "camid"):
        assert batch[key].dtype == expected[key].dtype and torch.equal(batch[key], expected[key])
    assert batch["path"] == expected["path"] and list(batch) == ["image", "pid", "camid", "path", FINISH_KEY]
    loaders = [torch.utils.data.DataLoader(_Decoded(transform), batch_size=4, num_workers=workers,
                                           collate_fn=collate_deferred) for workers in (0, 1)]
    (in_process, _), (from_worker, _) = (list(loader) for loader in loaders)
    assert from_worker["image"].shape == (4, 3, 48, 20)  # the canvas: the largest decoded size
    for key in ("box", "flip", "shift", "erase"):
        assert torch.equal(from_worker[FINISH_KEY]["image"][key], in_process[FINISH_KEY]["image"][key])
    finished = finish_batch(from_worker)["image"]
    assert finished.shape == (4, 3, *SIZE) and torch.equal(finished, finish_batch(in_process)["image"])
    float_transform = build_train_transform(SIZE, flip_prob=0.0, padding=0, erasing_prob=0.0, defer=True)
    assert torch.equal(finished, collate_deferred([_Decoded(float_transform)[i] for i in range(4)])["image"])
