"""Pieces every pedlightning DataModule shares: synthetic data on demand and DDP-aware loaders."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from pedlightning.data.datasets import Record, RecordDataset, Unreadable
from pedlightning.data.eval_loader import parts_loader
from pedlightning.data.faults import ErrorCounter, ImageFaults, find_unreadable
from pedlightning.data.loading import ReportingLoader, pin_memory
from pedlightning.data.progress import announce
from pedlightning.data.resumable import ResumableBatches
from pedlightning.data.spec import DataSpec
from pedlightning.data.transforms.batched import collate_deferred, finish_batch
from pedlightning.errors import ConfigError, DatasetLayoutError

log = logging.getLogger(__name__)

EVAL_STAGES: tuple[str, ...] = ("validate", "test", "predict")
"""The stages whose loaders a :class:`DataSpec`'s ``eval_items`` describe."""


def is_empty_dir(path: str) -> bool:
    return not os.path.isdir(path) or not any(os.scandir(path))


def synthesize_if_missing(name: str, root: str, synthesize: bool, writer_kwargs: dict | None = None) -> bool:
    """Write the synthetic version of dataset ``name`` into ``root`` if asked and ``root`` is missing or empty.

    Returns whether data was written. Writers are atomic, so concurrent ranks cannot leave a partial tree.
    """
    if not synthesize or not is_empty_dir(root):
        return False
    from pedlightning.data.synthetic import synthesize

    synthesize(name, root, **(writer_kwargs or {}))
    return True


def parse_source(build: Callable[..., Any], dataset: str, root: str, synthesize: bool, **kwargs: Any) -> Any:
    """Parse ``dataset`` at ``root`` with a source registry's ``build`` and print its stats table.

    A layout error from a datamodule without ``synthesize`` adds the hint that built-in synthetic data exists.
    """
    try:
        source = build(dataset, root, **kwargs)
    except DatasetLayoutError as err:
        hint = "" if synthesize else "\n(set data.init_args.synthesize: true to write a synthetic dataset there)"
        raise DatasetLayoutError(f"{err}{hint}") from err
    rank_zero_info(source.stats_table())
    return source


def world(trainer: L.Trainer | None) -> tuple[int, int]:
    """(world_size, global_rank) of the attached trainer, (1, 0) without one."""
    if trainer is None:
        return 1, 0
    return trainer.world_size, trainer.global_rank


def require_own_sampling(trainer: L.Trainer | None) -> None:
    """pedlightning DataModules shard their own data across ranks; Lightning's automatic sampler must be off."""
    if trainer is None or trainer.world_size == 1:
        return
    if getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
        raise ConfigError("pedlightning DataModules split data across processes themselves (identity samplers, "
                          "padded evaluation): create the Trainer with use_distributed_sampler=False "
                          "(the pedlightning CLI sets this by default)")


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, trainer: L.Trainer | None,
                collate_fn=None, faults: Sequence[ErrorCounter] = (), name: str = "evaluation") -> DataLoader:
    """An in-order loader; under DDP each rank gets a padded shard (metrics drop the padding by index)."""
    world_size, rank = world(trainer)
    sampler = (DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
               if world_size > 1 else None)
    return ReportingLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                           pin_memory=pin_memory(trainer), persistent_workers=num_workers > 0, collate_fn=collate_fn,
                           faults=faults, name=name)


def retrieval_loader(parts: Sequence[Dataset], batch_size: int, num_workers: int,
                     trainer: L.Trainer | None, faults: Sequence[ErrorCounter] = (),
                     name: str = "evaluation") -> DataLoader:
    """One in-order loader over ``[queries, gallery]`` whose batches never mix the two (each item has ``part``).

    One loader makes one evaluation: Lightning then logs and prints its metrics once, not once per dataloader.
    Under DDP each part is padded and sliced per rank (metrics drop the padding by index).
    """
    world_size, rank = world(trainer)
    return parts_loader(parts, batch_size, num_workers, world_size, rank, pin_memory=pin_memory(trainer),
                        faults=faults, name=name)


def shuffled_loader(dataset: Dataset, batch_size: int, num_workers: int, trainer: L.Trainer | None,
                    seed: int, faults: Sequence[ErrorCounter] = (), name: str = "training") -> DataLoader:
    """A training loader that reshuffles from ``seed + epoch`` and gives each rank a disjoint shard.

    One DistributedSampler serves 1 or N processes (Lightning calls its ``set_epoch``), so the data order
    depends only on the seed and the epoch, and a resumed run replays the order of the run it continues.
    Incomplete batches are dropped: batch norm and in-batch contrastive losses need full batches. Deferred image
    values (batched training transforms) are finished per batch (:func:`collate_deferred`).
    """
    world_size, rank = world(trainer)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return ReportingLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                           pin_memory=pin_memory(trainer), persistent_workers=num_workers > 0, faults=faults,
                           name=name, collate_fn=collate_deferred)


def batch_loader(dataset: Dataset, batch_sampler: Sampler, num_workers: int, trainer: L.Trainer | None,
                 faults: Sequence[ErrorCounter] = (), name: str = "training") -> DataLoader:
    """A training loader over the batches of ``batch_sampler`` (P x K identity batches).

    Wrapped in :class:`ResumableBatches`: Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler``, never on
    the batch sampler itself, so without the wrapper every epoch repeated epoch 0's order; it also lets a mid-epoch
    resume skip the batches already done.
    """
    if not isinstance(batch_sampler, ResumableBatches):
        batch_sampler = ResumableBatches(batch_sampler)
    return ReportingLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                           pin_memory=pin_memory(trainer), persistent_workers=num_workers > 0, faults=faults,
                           name=name, collate_fn=collate_deferred)


def finishes_on_device(setting: bool | None, trainer: L.Trainer | None) -> bool:
    """A datamodule's ``finish_on_device``: ``None`` means when the attached trainer runs on an accelerator.

    On, loader workers only decode, and the datamodule's ``on_after_batch_transfer`` resizes and augments the
    decoded uint8 images on the device (:func:`~pedlightning.data.transforms.batched.finish_batch`, the same
    pixels): no resize and no float work in loader workers, and for Market-1501 (128x64 images, a 256x128 input)
    a sixteenth of the bytes of a float batch through shared memory, pinning and the transfer.
    """
    if setting is not None:
        return bool(setting)
    device = getattr(getattr(trainer, "strategy", None), "root_device", None)  # None: no trainer (or a stand-in)
    return device is not None and device.type != "cpu"


def as_size(value: Sequence[int]) -> tuple[int, int]:
    size = tuple(int(v) for v in value)
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"img_size must be [height, width] with positive values, got {list(value)}")
    return size  # type: ignore[return-value]


def make_spec(source: str, img_size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
              **fields: Any) -> DataSpec:
    """A :class:`DataSpec` with the facts every datamodule has (``mean``/``std`` as float tuples) plus ``fields``."""
    return DataSpec(source=source, img_size=tuple(img_size), mean=tuple(float(m) for m in mean),
                    std=tuple(float(s) for s in std), **fields)


class SourceDataModule(L.LightningDataModule):
    """A DataModule over one on-disk dataset parsed by a source registry (``hparams.dataset``, ``hparams.root``).

    ``prepare_data`` writes the synthetic version when ``hparams.synthesize`` is set and the root is missing or
    empty; ``setup`` parses the dataset once and prints its stats table. Subclasses set ``build_source`` (a
    registry's ``build_*_source``), list the splits each stage reads (:meth:`used_splits`) and may override
    :meth:`source_kwargs` for protocol switches.

    Unreadable images (``hparams.on_error``, ``hparams.verify_images``): see :meth:`verify` and
    :mod:`pedlightning.data.datasets`. Loaders read a split through :meth:`records` (the parsed split, less the
    files ``verify`` dropped) and :meth:`dataset`.
    """

    build_source: Callable[..., Any]

    def __init__(self) -> None:
        super().__init__()
        self.source: Any = None
        self._spec: DataSpec | None = None
        self._kept: dict[str, list[Record]] = {}
        self._faults: dict[str, ImageFaults] = {}
        self._verified: set[str] = set()
        self.dropped: list[tuple[str, str]] = []
        """``(path, reason)`` of the images :meth:`verify` found unreadable (and, under ``skip``, dropped)."""

    def source_kwargs(self) -> dict[str, Any]:
        return {}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches left in uint8 (``finish_on_device``) are finished where they now are."""
        return finish_batch(batch)

    def used_splits(self, stage: str | None) -> tuple[str, ...]:
        """The splits (source attributes) that ``stage``'s loaders read; ``None``: every stage's."""
        raise NotImplementedError

    @property
    def source_name(self) -> str:
        """``market1501 at data/market1501``: how error messages name this data."""
        return f"{self.hparams.dataset} at {self.hparams.root}"

    def spec_fields(self) -> dict[str, Any]:
        """The dataset-specific :class:`DataSpec` fields (classes, attributes, captions, eval items)."""
        return {}

    def data_spec(self) -> DataSpec:
        """The facts the model needs from this data; parses the dataset on first use, then cached."""
        if self._spec is None:
            hp = self.hparams
            self._spec = make_spec(self.source_name, self.img_size, hp.mean, hp.std, **self.spec_fields())
        return self._spec

    def prepare_data(self) -> None:
        hp = self.hparams
        synthesize_if_missing(hp.dataset, hp.root, hp.synthesize, hp.synthetic)

    def _load_source(self) -> Any:
        if self.source is None:
            hp = self.hparams
            self.source = parse_source(type(self).build_source, hp.dataset, hp.root, hp.synthesize,
                                       **self.source_kwargs())
        return self.source

    def setup(self, stage: str | None = None) -> None:
        self._load_source()
        if self.hparams.verify_images:
            self.verify(self.used_splits(stage))

    # ----------------------------------------------------------------- unreadable images
    def records(self, split: str) -> list[Record]:
        """The records of ``split`` that loaders read: the parsed split, less what :meth:`verify` dropped."""
        if split not in self._kept:
            self._kept[split] = list(getattr(self._load_source(), split))
        return self._kept[split]

    def faults(self, split: str) -> ImageFaults:
        """The shared record of ``split``'s unreadable images (one per process, kept across loaders and epochs)."""
        if split not in self._faults:
            self._faults[split] = ImageFaults(len(self.records(split)), self.hparams.on_error)
        return self._faults[split]

    def dataset(self, split: str, transform: Callable | None, on_unreadable: Unreadable,
                groups: Sequence[int] | None = None) -> RecordDataset:
        """``split``'s images under the ``on_error`` policy (see :mod:`pedlightning.data.datasets`)."""
        return RecordDataset(self.records(split), transform, self.faults(split), on_unreadable, groups)

    def verify(self, splits: Sequence[str]) -> None:
        """Decode every image of ``splits`` (not yet checked) now, instead of meeting bad files hours into training.

        Every bad file is named in a warning; then ``on_error: fail`` raises a DatasetLayoutError listing them,
        ``skip`` drops them from their split (a dropped training identity keeps its class index: ``num_classes``
        counts the parsed split). Assumption: every DDP process checks every image (the lists must agree, and no
        process group is needed); the check uses ``num_workers`` processes.
        """
        todo = [s for s in splits if s not in self._verified]
        if not todo:
            return
        records = {s: self.records(s) for s in todo}
        paths = sorted({r.path for rs in records.values() for r in rs})
        show = world(self.trainer)[1] == 0
        bad = dict((paths[i], reason) for i, reason in find_unreadable(
            paths, self.hparams.num_workers, f"images of {self.source_name} ({', '.join(todo)})", show))
        self._verified.update(todo)
        if not bad:
            return
        for path, reason in sorted(bad.items()):
            log.warning("unreadable image %s: %s", path, reason)
        self.dropped += sorted(bad.items())
        listed = "\n  ".join(list(bad)[:20]) + (f"\n  ... and {len(bad) - 20} more (all in the warnings above)"
                                                 if len(bad) > 20 else "")
        if self.hparams.on_error == "fail":
            raise DatasetLayoutError(f"{len(bad)} unreadable image(s) in {self.source_name}:\n  {listed}\n"
                                     "(set on_error: skip to drop them and train on the rest)")
        for split, rs in records.items():
            kept = [r for r in rs if r.path not in bad]
            if len(kept) < len(rs):
                self._kept[split] = kept
                self._faults.pop(split, None)
                if show:
                    announce(f"{self.source_name} {split}: {len(rs) - len(kept)} unreadable image(s) dropped, "
                             f"{len(kept)} kept")
        self._spec = None

    @property
    def unreadable_images(self) -> list[str]:
        """Paths of every unreadable image known to this process: dropped by :meth:`verify` or skipped in loading."""
        found = [p for p, _ in self.dropped]
        for split, faults in self._faults.items():
            records = self.records(split)
            found += [records[i].path for i in faults.bad_indices()]
        return sorted(set(found))

    @property
    def num_skipped(self) -> int:
        """How many distinct unreadable images this process dropped or skipped so far (all loader workers)."""
        return len(self.unreadable_images)
