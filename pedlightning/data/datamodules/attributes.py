"""AttributeDataModule: pedestrian attribute recognition (PA-100K)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from pedlightning.data.datamodules.common import (
    SourceDataModule,
    as_size,
    eval_loader,
    finishes_on_device,
    require_own_sampling,
    shuffled_loader,
)
from pedlightning.data.faults import OnError
from pedlightning.data.sources import build_attribute_source
from pedlightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_test_transform,
    build_train_transform,
)


class AttributeDataModule(SourceDataModule):
    """Pedestrian attribute recognition data: images with a binary label vector.

    Protocol switch ``train_split`` (PA-100K: 80,000 train / 10,000 val / 10,000 test images):

    - ``train`` (default): train on the train split, validate (select checkpoints) on the val split,
      report the test split.
    - ``trainval``: train on train + val, as the strong baseline of Jia et al. ("Rethinking of Pedestrian
      Attribute Recognition", 2021) does. The val split is then inside the training data, so validation
      runs on the **test** split and the log says so: selecting a checkpoint on it selects on the test set.
      Keep the last epoch (the default checkpoint config saves ``last.ckpt``) for numbers comparable to papers.

    Args:
        dataset: a name registered in :func:`pedlightning.data.sources.build_attribute_source` (``pa100k``).
        root: dataset folder (``data/`` + ``annotation.mat`` for PA-100K).
        train_split: ``train`` or ``trainval`` (see above).
        synthesize: when ``root`` is missing or empty, write the built-in synthetic version of ``dataset``
            there in ``prepare_data()`` (``synthetic`` holds the writer's keyword arguments).
        img_size: ``[height, width]`` of the network input.
        batch_size, test_batch_size: per process.
        mean, std: normalisation (ImageNet).
        flip_prob, padding: training augmentation (flip, pad + random crop: the strong baseline's).
        erasing_prob: random erasing; 0 by default (Assumption: the strong baseline does not use it).
        seed: shuffling seed, shared by all ranks.
        on_error: an unreadable image is named once, counted and skipped (``skip``, the default, as LUPerson's)
            or stops the run with an error naming it (``fail``). A skipped training image is replaced by the next
            readable one (with its own labels), so batches keep their size; a skipped evaluation image by a grey
            placeholder (see :mod:`pedlightning.data.datasets`).
        verify_images: decode every image of the splits a stage reads at ``setup`` (with progress), and fail
            naming every bad file, or drop them under ``skip``. Off by default: it reads the whole dataset once.
        finish_on_device: loader workers only decode; the device crops, resizes, flips, shifts, normalises and
            erases the decoded uint8 images after the transfer (``on_after_batch_transfer``), with the same pixels
            (the erasing noise then comes from the device's generator). ``None``: when the trainer runs on a GPU.
            ``False``: the loader yields finished float batches.
    """

    build_source = staticmethod(build_attribute_source)

    def __init__(self, dataset: str = "pa100k", root: str = "data/PA-100K",
                 train_split: Literal["train", "trainval"] = "train", synthesize: bool = False,
                 synthetic: dict | None = None, img_size: Sequence[int] = (256, 128), batch_size: int = 64,
                 test_batch_size: int = 128, num_workers: int = 4, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, flip_prob: float = 0.5, padding: int = 10,
                 erasing_prob: float = 0.0, seed: int = 0, on_error: OnError = "skip", verify_images: bool = False,
                 finish_on_device: bool | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.img_size = as_size(img_size)

    def source_kwargs(self) -> dict:
        return {"train_split": self.hparams.train_split}

    def used_splits(self, stage: str | None) -> tuple[str, ...]:
        """``fit``: train and the validation split; ``validate``: the validation split; else ``test``."""
        val = "test" if self.validates_on_test else "val"
        return {"fit": ("train", val), "validate": (val,), "test": ("test",), "predict": ("test",)}.get(
            stage, ("train", val, "test"))

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage not in ("fit", "validate"):
            return
        if self.validates_on_test:
            rank_zero_warn(f"train_split='trainval': the {self.hparams.dataset} val split is part of the training "
                           "data, so VALIDATION RUNS ON THE TEST SPLIT. A checkpoint selected on val/* metrics is "
                           "selected on the test set; report the last epoch instead.")
        else:
            rank_zero_info(f"Validation: the {self.hparams.dataset} val split ({len(self.records('val'))} images); "
                           "test numbers come from the test split.")

    @property
    def validates_on_test(self) -> bool:
        """True when validation uses the test split (``train_split='trainval'``)."""
        return self.hparams.train_split == "trainval"

    @property
    def num_attributes(self) -> int:
        return self._load_source().num_attributes

    @property
    def attribute_names(self) -> list[str]:
        return list(self._load_source().attribute_names)

    @property
    def positive_ratio(self) -> list[float]:
        """Fraction of positive labels per attribute in the training split (the loss weights of the baseline)."""
        return [float(p) for p in self._load_source().positive_ratio]

    def spec_fields(self) -> dict:
        """Attribute names and training positive ratios; no ``eval_items`` (evaluation is not a retrieval)."""
        return {"num_attributes": self.num_attributes, "attribute_names": tuple(self.attribute_names),
                "positive_ratio": tuple(self.positive_ratio)}

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        require_own_sampling(self.trainer)
        transform = build_train_transform(self.img_size, hp.flip_prob, hp.padding, hp.erasing_prob, hp.mean, hp.std,
                                          defer=True, finish_on_device=finishes_on_device(hp.finish_on_device,
                                                                                          self.trainer))
        return shuffled_loader(self.dataset("train", transform, "substitute"), hp.batch_size, hp.num_workers,
                               self.trainer, hp.seed, [self.faults("train")], f"{hp.dataset} train")

    def _eval_loader(self, split: str) -> DataLoader:
        hp = self.hparams
        require_own_sampling(self.trainer)
        dataset = self.dataset(split, build_test_transform(self.img_size, hp.mean, hp.std), "placeholder")
        return eval_loader(dataset, hp.test_batch_size, hp.num_workers, self.trainer, faults=[self.faults(split)],
                           name=f"{hp.dataset} {split}")

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("test" if self.validates_on_test else "val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
