"""LUPersonTADataModule: LUPerson-TA shards (image + captions + attributes) for VAL-PAT pre-training."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.utilities import rank_zero_warn

from pedlightning.data.datamodules.common import as_size, make_spec
from pedlightning.data.datamodules.luperson import PersonImagesDataModule
from pedlightning.data.faults import ErrorCounter
from pedlightning.data.shards import OnError, ShardSampling
from pedlightning.data.sources.attributes import PA100K_ATTRIBUTES
from pedlightning.data.sources.luperson import (
    AnnotationStats,
    annotation_stats,
    find_shards,
)
from pedlightning.data.spec import DataSpec
from pedlightning.data.tokenizer import tokenizer_name
from pedlightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pedlightning.data.transforms.moco import MoCoView, TwoViewCaptionTransform
from pedlightning.errors import DatasetLayoutError


class LUPersonTADataModule(PersonImagesDataModule):
    """LUPerson-TA as VAL-PAT reads it: per sample two MoCo v2 views, one caption, the attribute vector.

    A batch holds ``view_q``, ``view_k`` ``(B, 3, H, W)``, ``tokens`` ``(B, context_length)`` with
    ``has_caption`` ``(B,)`` bool, ``attributes`` ``(B, A)`` float with ``has_attributes`` ``(B,)`` bool, and
    ``key`` (see :class:`~pedlightning.data.transforms.moco.TwoViewCaptionTransform`). The shard machinery is the
    LUPerson datamodule's (:mod:`pedlightning.data.shards`): equal batches per rank, an exact epoch length, and
    unreadable images or annotations counted under ``on_error``. The format of the shards is
    :data:`~pedlightning.data.sources.luperson.LUPERSON_TA_LAYOUT`.

    ``data_spec`` states the attribute names and their positive ratios (over the samples that have attributes),
    computed from the json members only and cached next to the shards
    (:func:`~pedlightning.data.sources.luperson.annotation_stats`), plus the tokenizer and context length.

    Args:
        root: folder of LUPerson-TA ``.tar`` shards.
        synthesize: when ``root`` is missing or empty, write synthetic LUPerson-TA shards there in
            ``prepare_data()``; ``synthetic`` holds the writer's keyword arguments (``num_images``, ``size``,
            ``shard_size``, ``captions_per_image``, ``missing_captions``, ``missing_attributes``, ``seed``).
        img_size: ``[height, width]`` of both views.
        crop_scale, crop_ratio, jitter, jitter_prob, grayscale_prob, blur_prob, blur_sigma, flip_prob: the MoCo v2
            view, see :class:`~pedlightning.data.transforms.moco.MoCoView` (defaults: MoCo v2's recipe; the
            relative crop aspect is an Assumption).
        mean, std: normalisation.
        tokenizer, context_length: the caption tokens (:func:`pedlightning.data.tokenizer.build_tokenizer`).
        attribute_names: the order of the attribute vector (default: PA-100K's 26 names).
        batch_size, num_workers, shard_sampling, samples_per_epoch, shuffle_buffer, on_error: as
            :class:`~pedlightning.data.datamodules.luperson.LUPersonDataModule`.
        seed: shard order and caption draws (a caption per (seed, epoch, key)), shared by all ranks.
    """

    name = "luperson_ta"
    synthetic_writer = "luperson_ta"

    def __init__(self, root: str = "data/LUPerson-TA", synthesize: bool = False, synthetic: dict | None = None,
                 img_size: Sequence[int] = (256, 128), crop_scale: Sequence[float] = (0.2, 1.0),
                 crop_ratio: Sequence[float] = (3 / 4, 4 / 3), jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
                 jitter_prob: float = 0.8, grayscale_prob: float = 0.2, blur_prob: float = 0.5,
                 blur_sigma: Sequence[float] = (0.1, 2.0), flip_prob: float = 0.5,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 tokenizer: str = "ViT-B-16", context_length: int = 77,
                 attribute_names: Sequence[str] | None = None, batch_size: int = 64, num_workers: int = 4,
                 shard_sampling: ShardSampling = "split", samples_per_epoch: int | None = None,
                 shuffle_buffer: int = 2000, seed: int = 0, on_error: OnError = "skip"):
        super().__init__()
        self.save_hyperparameters()
        self.img_size = as_size(img_size)
        self._names = tuple(attribute_names) if attribute_names is not None else PA100K_ATTRIBUTES
        view = MoCoView(self.img_size, crop_scale, crop_ratio, jitter, jitter_prob, grayscale_prob, blur_prob,
                        blur_sigma, flip_prob, mean, std)
        self.transform = TwoViewCaptionTransform(view, tokenizer, context_length, len(self._names), seed)
        self._stats: AnnotationStats | None = None

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def stats(self) -> AnnotationStats:
        """Caption / attribute counts and attribute positives over all shards (json members only, cached)."""
        if self._stats is None:
            if self.errors is None:
                self.errors = ErrorCounter(self.hparams.on_error)
            shards = self.shards if self.shards is not None else find_shards(self.hparams.root)
            stats = annotation_stats(shards, self._names, errors=self.errors)
            if stats.invalid:
                shard, key, reason = stats.invalid[0]
                message = (f"{len(stats.invalid)} unreadable LUPerson-TA annotation(s), e.g. {shard}: {key}: "
                           f"{reason}")
                if self.hparams.on_error == "fail":
                    raise DatasetLayoutError(f"{message}\n(set on_error: skip to count and skip them)")
                rank_zero_warn(f"{message}; their samples are skipped when read")
            self._stats = stats
        return self._stats

    @property
    def positive_ratio(self) -> list[float]:
        """Per attribute, the fraction of positives among the samples with attributes (weighted BCE)."""
        return list(self.stats.positive_ratio)

    def _shard_rows(self, shards: list[str]) -> list[tuple[str, object]]:
        stats = self.stats
        return [("with captions", stats.with_captions), ("with attributes", stats.with_attributes),
                ("unreadable annotations", len(stats.invalid))]

    def data_spec(self) -> DataSpec:
        hp = self.hparams
        return make_spec(f"{self.name} at {hp.root}", self.img_size, hp.mean, hp.std,
                         num_attributes=len(self._names), attribute_names=self._names,
                         positive_ratio=tuple(self.positive_ratio), context_length=hp.context_length,
                         tokenizer=tokenizer_name(hp.tokenizer))
