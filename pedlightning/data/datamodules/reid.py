"""ReIDDataModule: Market-1501, DukeMTMC-reID, Occluded-Duke and MSMT17 with a P x K identity sampler."""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import DataLoader

from pedlightning.data.datamodules.common import (
    EVAL_STAGES,
    SourceDataModule,
    as_size,
    batch_loader,
    finishes_on_device,
    require_own_sampling,
    retrieval_loader,
    world,
)
from pedlightning.data.faults import OnError
from pedlightning.data.samplers import IdentityBatchSampler
from pedlightning.data.sources import build_reid_source
from pedlightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_test_transform,
    build_train_transform,
)


class ReIDDataModule(SourceDataModule):
    """Supervised person re-identification data.

    Train batches come from :class:`IdentityBatchSampler` (``batch_size / num_instances`` identities x
    ``num_instances`` images). Validation and test both return two loaders, ``[query, gallery]``: reID
    benchmarks have no validation split, so validation evaluates on the test split, as TransReID and fast-reid do.

    Args:
        dataset: ``market1501``, ``dukemtmc``, ``occluded_duke`` or ``msmt17``.
        root: dataset folder (the parsers also accept the usual sub-folder inside it).
        dataset_kwargs: protocol switches passed to the parser, e.g. MSMT17's
            ``{version: V1, train_with_val: true}`` — they change the numbers, so configs state them.
        synthesize: when ``root`` is missing or empty, write the built-in synthetic version of ``dataset``
            there in ``prepare_data()`` (``synthetic`` holds the writer's keyword arguments).
        img_size: ``[height, width]`` of the network input.
        batch_size, num_instances: P x K sampling; ``batch_size`` is per process.
        mean, std: normalisation (ImageNet by default; TransReID's ViTs use 0.5).
        flip_prob, padding, erasing_prob: training augmentation (Bag of Tricks / TransReID defaults).
        seed: sampler seed, shared by all ranks.
        on_error: an unreadable image is named once, counted and skipped (``skip``, the default, as LUPerson's)
            or stops the run with an error naming it (``fail``). A skipped training image is replaced by another
            image of the same identity, so P x K batches keep their shape; a skipped query/gallery image by a
            grey placeholder (see :mod:`pedlightning.data.datasets`).
        verify_images: decode every image of the splits a stage reads at ``setup`` (with progress), and fail
            naming every bad file, or drop them under ``skip``. Off by default: it reads the whole dataset once.
        finish_on_device: loader workers only decode; the device crops, resizes, flips, shifts, normalises and
            erases the decoded uint8 images after the transfer (``on_after_batch_transfer``), with the same pixels
            (the erasing noise then comes from the device's generator). ``None``: when the trainer runs on a GPU.
            ``False``: the loader yields finished float batches.
    """

    build_source = staticmethod(build_reid_source)

    def __init__(self, dataset: str = "market1501", root: str = "data/market1501", dataset_kwargs: dict | None = None,
                 synthesize: bool = False, synthetic: dict | None = None, img_size: Sequence[int] = (256, 128),
                 batch_size: int = 64, num_instances: int = 4, test_batch_size: int = 128, num_workers: int = 4,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, flip_prob: float = 0.5,
                 padding: int = 10, erasing_prob: float = 0.5, seed: int = 0, on_error: OnError = "skip",
                 verify_images: bool = False, finish_on_device: bool | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.img_size = as_size(img_size)

    def source_kwargs(self) -> dict:
        return dict(self.hparams.dataset_kwargs or {})

    @property
    def num_classes(self) -> int:
        """Number of training identities (the classifier's width)."""
        return self._load_source().num_train_pids

    def used_splits(self, stage: str | None) -> tuple[str, ...]:
        """Training reads ``train``; every evaluation the test split's ``query`` and ``gallery``."""
        return ("query", "gallery") if stage in EVAL_STAGES else ("train", "query", "gallery")

    def spec_fields(self) -> dict:
        """Every evaluation stage reads the test split's query and gallery (no val split in reID)."""
        items = tuple(tuple(r.path for r in self.records(split)) for split in ("query", "gallery"))
        return {"num_classes": self.num_classes, "eval_items": dict.fromkeys(EVAL_STAGES, items)}

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        require_own_sampling(self.trainer)
        world_size, rank = world(self.trainer)
        transform = build_train_transform(self.img_size, hp.flip_prob, hp.padding, hp.erasing_prob, hp.mean, hp.std,
                                          defer=True, finish_on_device=finishes_on_device(hp.finish_on_device,
                                                                                          self.trainer))
        pids = [r.pid for r in self.records("train")]
        sampler = IdentityBatchSampler(pids, hp.batch_size, hp.num_instances, hp.seed, num_replicas=world_size,
                                       rank=rank)
        return batch_loader(self.dataset("train", transform, "substitute", groups=pids), sampler, hp.num_workers,
                            self.trainer, [self.faults("train")], f"{hp.dataset} train")

    def _eval_loader(self) -> DataLoader:
        """Queries (``part`` 0) then gallery (``part`` 1) in one loader."""
        hp = self.hparams
        require_own_sampling(self.trainer)
        transform = build_test_transform(self.img_size, hp.mean, hp.std)
        splits = ("query", "gallery")
        return retrieval_loader([self.dataset(s, transform, "placeholder") for s in splits], hp.test_batch_size,
                                hp.num_workers, self.trainer, [self.faults(s) for s in splits], f"{hp.dataset} test")

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader()
