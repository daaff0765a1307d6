"""LUPersonDataModule: unlabeled person images (folder tree, list file or WebDataset shards) for pre-training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pedlightning.data.datamodules.common import (
    as_size,
    finishes_on_device,
    make_spec,
    synthesize_if_missing,
    world,
)
from pedlightning.data.datasets import load_rgb, read_rgb, reads_tensors
from pedlightning.data.faults import ErrorCounter, ImageFaults
from pedlightning.data.loading import ReportingLoader, pin_memory
from pedlightning.data.records import PersonSample
from pedlightning.data.shards import (
    EpochLoader,
    OnError,
    ShardSampling,
    ShardStream,
    batches_per_rank,
    usable_shards,
)
from pedlightning.data.sources.attributes import PA100K_ATTRIBUTES
from pedlightning.data.sources.base import format_table
from pedlightning.data.sources.luperson import (
    SourceKind,
    detect_kind,
    find_shards,
    luperson_images,
)
from pedlightning.data.spec import DataSpec
from pedlightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pedlightning.data.transforms.batched import collate_deferred, finish_batch
from pedlightning.data.transforms.regions import RegionPairTransform
from pedlightning.data.transforms.samples import SampleTransform, as_sample_transform
from pedlightning.errors import ConfigError, DatasetLayoutError


class UnlabeledImages(Dataset):
    """Image files -> ``transform(PersonSample)`` plus ``index``; an unreadable file gives ``None`` (policy ``skip``).

    Files carry no annotation: each sample's annotation is empty, its key the file index.
    """

    def __init__(self, paths: Sequence[str], transform: SampleTransform | Callable, errors: ImageFaults):
        self.paths = list(paths)
        self.transform = as_sample_transform(transform)
        self.errors = errors
        self._load = read_rgb if reads_tensors(self.transform) else load_rgb

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if self.errors.is_bad(index):
            return None
        try:
            image: Image.Image | torch.Tensor = self._load(self.paths[index])
        except DatasetLayoutError as err:
            self.errors.record_file(index, self.paths[index], err.__cause__ or err)
            return None
        return {**self.transform(PersonSample(image, str(index))), "index": index}


def collate_readable(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """:func:`collate_deferred` of the readable items; the skipped (``None``) ones are left out of the batch."""
    items = [item for item in items if item is not None]
    if not items:
        raise DatasetLayoutError("every image of a batch was unreadable; see the warnings above for the files")
    return collate_deferred(items)


class PersonImagesDataModule(L.LightningDataModule):
    """What the LUPerson datamodules share: reading (folder, list or shards), equal batches per rank, exact
    epoch length, counted unreadable samples, synthetic data on demand.

    A subclass sets ``self.transform`` (a :class:`~pedlightning.data.transforms.samples.SampleTransform`) and
    ``self.img_size`` and saves hyper-parameters with ``root``, ``synthesize``, ``synthetic``, ``mean``, ``std``,
    ``batch_size``, ``num_workers``, ``shard_sampling``, ``samples_per_epoch``, ``shuffle_buffer``, ``seed``,
    ``on_error`` (and ``source``, ``image_root`` when it reads more than shards).
    """

    name = "luperson"
    transform: SampleTransform
    img_size: tuple[int, int]

    def __init__(self) -> None:
        super().__init__()
        self.errors: ErrorCounter | None = None  # made in setup(): one counter per process
        self.kind: Literal["folder", "list", "shards"] | None = None
        self.shards: list[str] | None = None  # the usable shards, from setup()
        self.dataset: Dataset | ShardStream | None = None
        self.num_batches: int | None = None

    @property
    def source_option(self) -> SourceKind:
        return self.hparams.get("source", "shards")

    @property
    def synthetic_writer(self) -> str:
        """The :data:`~pedlightning.data.synthetic.SYNTHETIC_WRITERS` entry ``synthesize`` uses."""
        return "luperson_shards" if self.source_option == "shards" else "luperson"

    @property
    def attribute_names(self) -> tuple[str, ...] | None:
        """The order of the annotations' attribute vectors; None for data without attributes."""
        return None

    def prepare_data(self) -> None:
        hp = self.hparams
        synthesize_if_missing(self.synthetic_writer, hp.root, hp.synthesize, hp.synthetic)

    def data_spec(self) -> DataSpec:
        """Image size and normalisation (unlabeled images: no classes, attributes or evaluation items)."""
        hp = self.hparams
        return make_spec(f"{self.name} at {hp.root}", self.img_size, hp.mean, hp.std)

    def _shard_rows(self, shards: list[str]) -> list[tuple[str, object]]:
        """Extra rows of the setup table for shard data."""
        return []

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        hp = self.hparams
        world_size, rank = world(self.trainer)
        try:
            self.kind = detect_kind(hp.root) if self.source_option == "auto" else self.source_option
        except DatasetLayoutError as err:
            hint = "" if hp.synthesize else "\n(set data.init_args.synthesize: true to write synthetic images there)"
            raise DatasetLayoutError(f"{err}{hint}") from err
        if self.kind == "shards":
            if self.errors is None:  # LUPerson-TA's annotation stats may have made it already
                self.errors = ErrorCounter(hp.on_error)
            found = find_shards(hp.root)
            self.shards, sizes = usable_shards(found, self.errors)
            self.num_batches = batches_per_rank(sizes, world_size, hp.batch_size, hp.shard_sampling,
                                                hp.samples_per_epoch)
            self.dataset = ShardStream(self.shards, self.transform, hp.shard_sampling, hp.shuffle_buffer, hp.seed,
                                       rank, world_size, self.errors, self.attribute_names or PA100K_ATTRIBUTES,
                                       num_samples=sizes)
            unusable = len(found) - len(self.shards)
            skipped = [("unusable shards skipped", unusable)] if unusable else []
            rows = [("shards", len(self.shards)), *skipped, ("images", sum(sizes)), *self._shard_rows(self.shards),
                    ("processes", world_size), ("batches per process and epoch", self.num_batches),
                    ("sampling", hp.shard_sampling)]
        else:
            paths = luperson_images(hp.root, self.kind, hp.get("image_root"))
            self.errors = ImageFaults(len(paths), hp.on_error)
            self.dataset = UnlabeledImages(paths, self.transform, self.errors)
            self.num_batches = len(paths) // world_size // hp.batch_size
            if self.num_batches < 1:
                raise ConfigError(f"{len(paths)} images give no full batch of {hp.batch_size} per process "
                                  f"({world_size} processes)")
            rows = [("images", len(paths)), ("processes", world_size),
                    ("batches per process and epoch", self.num_batches)]
        rank_zero_info(format_table([self.name, "value"], [("source", f"{self.kind}: {hp.root}"), *rows]))

    @property
    def num_skipped(self) -> int:
        """Unreadable samples skipped so far by this process (all its loader workers)."""
        return self.errors.count if self.errors is not None else 0

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches left in uint8 (``finish_on_device``) are finished where they now are."""
        return finish_batch(batch)

    def train_dataloader(self) -> DataLoader | EpochLoader:
        self.setup("fit")
        hp = self.hparams
        if hasattr(self.transform, "finish_on_device"):  # a batched transform (the default RegionA / RegionB pairs)
            self.transform.finish_on_device = finishes_on_device(hp.get("finish_on_device", False), self.trainer)
        common = dict(batch_size=hp.batch_size, num_workers=hp.num_workers, pin_memory=pin_memory(self.trainer),
                      persistent_workers=hp.num_workers > 0, name=f"{self.name} at {hp.root}")
        if isinstance(self.dataset, ShardStream):  # EpochLoader reports the epoch's skipped samples itself
            return EpochLoader(ReportingLoader(self.dataset, collate_fn=collate_deferred, **common), self.num_batches)
        world_size, rank = world(self.trainer)
        sampler = (DistributedSampler(self.dataset, world_size, rank, shuffle=True, seed=hp.seed, drop_last=True)
                   if world_size > 1 else None)
        return ReportingLoader(self.dataset, sampler=sampler, shuffle=sampler is None, drop_last=True,
                               collate_fn=collate_readable, faults=[self.errors], **common)


class LUPersonDataModule(PersonImagesDataModule):
    """Unlabeled person images, RegionA / RegionB pairs by default (:class:`~pedlightning.tasks.PersonMAEModule`).

    With the default transform a batch holds ``region_a``, ``region_b`` ``(B, 3, H, W)``, their crop boxes
    ``box_a``, ``box_b`` ``(B, 4)`` (see :mod:`pedlightning.data.transforms.regions`), and ``index`` (folder /
    list) or ``key`` (shards). Another ``transform`` yields its own keys (plus ``index`` / ``key``).

    Args:
        root: an image folder tree, an image list file, or a folder of WebDataset ``.tar`` shards.
        source: ``auto`` (decided by ``root``), ``folder``, ``list`` or ``shards``.
        image_root: folder the paths of a list file are relative to (default: the list's folder).
        synthesize: when ``root`` is missing or empty, write synthetic LUPerson-style data there in
            ``prepare_data()``: shards for ``source: shards``, else a JPG tree. ``synthetic``: the writer's
            keyword arguments (``num_images``, ``size``, ``shard_size``, ``seed``).
        img_size: ``[height, width]`` of both regions (the encoder input).
        region_scale, region_ratio, same_region, flip_prob: RegionA/RegionB sampling, see
            :class:`~pedlightning.data.transforms.regions.RegionPairTransform` (``same_region``: the ablation
            RegionB = RegionA).
        mean, std: normalisation.
        batch_size: per process. num_workers: loader processes per rank.
        shard_sampling: ``split`` (each sample at most once per epoch, equal batches per rank) or ``resampled``
            (shards drawn with replacement; for more loader workers than shards), see :mod:`pedlightning.data.shards`.
        samples_per_epoch: epoch length of ``resampled`` mode over all ranks (default: one pass over the data).
        shuffle_buffer: in-worker sample shuffle buffer of the shard stream.
        seed: shard order and folder sampling seed, shared by all ranks.
        on_error: unreadable images and shards (truncated, unreadable headers, a size or count that does not
            match ``shards.json``) are named once, counted and skipped (``skip``) or stop training with an error
            naming them (``fail``).
        transform: the per-sample transform (a :class:`~pedlightning.data.transforms.samples.SampleTransform`,
            e.g. :class:`~pedlightning.data.transforms.moco.TwoViewCaptionTransform`); ``None`` = the RegionA /
            RegionB pairs of the region arguments. It should yield ``img_size`` images (what ``data_spec`` states).
        finish_on_device: loader workers only decode; the device cuts, resizes and normalises both regions from
            the decoded uint8 image after the transfer (``on_after_batch_transfer``), with the same pixels (a
            ``transform`` of its own takes part if it has a ``finish_on_device`` attribute). ``None``: when the
            trainer runs on a GPU. ``False``: the loader yields finished float batches.
    """

    def __init__(self, root: str = "data/luperson", source: SourceKind = "auto", image_root: str | None = None,
                 synthesize: bool = False, synthetic: dict | None = None, img_size: Sequence[int] = (256, 128),
                 region_scale: Sequence[float] = (0.4, 1.0), region_ratio: Sequence[float] = (3 / 4, 4 / 3),
                 same_region: bool = False, flip_prob: float = 0.5, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, batch_size: int = 64, num_workers: int = 4,
                 shard_sampling: ShardSampling = "split", samples_per_epoch: int | None = None,
                 shuffle_buffer: int = 2000, seed: int = 0, on_error: OnError = "skip",
                 transform: SampleTransform | None = None, finish_on_device: bool | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["transform"])  # checkpoints keep plain types only
        self.img_size = as_size(img_size)
        self.transform = as_sample_transform(transform) if transform is not None else RegionPairTransform(
            self.img_size, region_scale, region_ratio, same_region, flip_prob, mean=mean, std=std, defer=True)
