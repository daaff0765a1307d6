"""Pieces every pedlightning DataModule shares: synthetic data on demand and DDP-aware loaders."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pedlightning.data.eval_loader import parts_loader
from pedlightning.data.spec import DataSpec
from pedlightning.errors import ConfigError, DatasetLayoutError

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
    from pedlightning.data.synthetic import SYNTHETIC_WRITERS

    if name not in SYNTHETIC_WRITERS:
        raise ConfigError(f"no synthetic writer for dataset {name!r}; available: {sorted(SYNTHETIC_WRITERS)}")
    SYNTHETIC_WRITERS[name](root, **(writer_kwargs or {}))
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
                collate_fn=None) -> DataLoader:
    """An in-order loader; under DDP each rank gets a padded shard (metrics drop the padding by index)."""
    world_size, rank = world(trainer)
    sampler = (DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
               if world_size > 1 else None)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0, collate_fn=collate_fn)


def retrieval_loader(parts: Sequence[Dataset], batch_size: int, num_workers: int,
                     trainer: L.Trainer | None) -> DataLoader:
    """One in-order loader over ``[queries, gallery]`` whose batches never mix the two (each item has ``part``).

    One loader makes one evaluation: Lightning then logs and prints its metrics once, not once per dataloader.
    Under DDP each part is padded and sliced per rank (metrics drop the padding by index).
    """
    world_size, rank = world(trainer)
    return parts_loader(parts, batch_size, num_workers, world_size, rank, pin_memory=torch.cuda.is_available())


def shuffled_loader(dataset: Dataset, batch_size: int, num_workers: int, trainer: L.Trainer | None,
                    seed: int) -> DataLoader:
    """A training loader that reshuffles from ``seed + epoch`` and gives each rank a disjoint shard.

    One DistributedSampler serves 1 or N processes (Lightning calls its ``set_epoch``), so the data order
    depends only on the seed and the epoch, and a resumed run replays the order of the run it continues.
    Incomplete batches are dropped: batch norm and in-batch contrastive losses need full batches.
    """
    world_size, rank = world(trainer)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)


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
    registry's ``build_*_source``) and may override :meth:`source_kwargs` for protocol switches.
    """

    build_source: Callable[..., Any]

    def __init__(self) -> None:
        super().__init__()
        self.source: Any = None
        self._spec: DataSpec | None = None

    def source_kwargs(self) -> dict[str, Any]:
        return {}

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

