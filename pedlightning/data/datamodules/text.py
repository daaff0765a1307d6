"""TextReIDDataModule: text-to-image person search (CUHK-PEDES, ICFG-PEDES, RSTPReid)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from pedlightning.data.caption_datasets import (
    CaptionDataset,
    ImageCaptionDataset,
    flatten_captions,
)
from pedlightning.data.datamodules.common import (
    SourceDataModule,
    as_size,
    batch_loader,
    finishes_on_device,
    require_own_sampling,
    retrieval_loader,
    shuffled_loader,
    world,
)
from pedlightning.data.faults import OnError
from pedlightning.data.samplers import IdentityBatchSampler
from pedlightning.data.sources import build_text_source
from pedlightning.data.tokenizer import (
    CaptionTokenizer,
    build_tokenizer,
    tokenizer_name,
)
from pedlightning.data.transforms import build_test_transform, build_train_transform
from pedlightning.errors import ConfigError

#: CLIP's normalisation (OpenAI), the statistics its image tower was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TextReIDDataModule(SourceDataModule):
    """Text-to-image person search data.

    Training: one sample per caption (image, ``tokens``, ``pid``), shuffled, or P identities x K distinct
    images (one caption each) when ``num_instances`` is set. Validation and test return one loader over
    ``[captions, images]`` (``part`` 0 and 1): every caption of the split queries its image gallery (no camera
    filtering, as the whole field evaluates).

    Protocol switch ``model_selection``: which split the validation loaders evaluate.

    - ``val`` (default): the dataset's val split; the test split is only touched by ``test``.
    - ``test``: validation evaluates the **test** split, as IRRA's and most public code's "best epoch"
      does; the log warns that checkpoints selected this way are selected on the test set.
      ICFG-PEDES has no val split, so it needs ``test`` (``val`` raises a ConfigError when validation runs).

    Args:
        dataset: a name registered in :func:`pedlightning.data.sources.build_text_source`
            (``cuhk_pedes``, ``icfg_pedes``, ``rstpreid``).
        root: dataset folder.
        model_selection: ``val`` or ``test`` (see above).
        synthesize: when ``root`` is missing or empty, write the built-in synthetic version of ``dataset``
            there in ``prepare_data()`` (``synthetic`` holds the writer's keyword arguments).
        tokenizer: open_clip model name whose tokenizer is used (CLIP's BPE for ``ViT-B-16``).
        context_length: tokens per caption (77 for CLIP; longer captions are truncated).
        img_size: ``[height, width]`` of the network input (384 x 128, IRRA).
        batch_size, test_batch_size: per process.
        num_instances: ``None`` = shuffled caption samples (IRRA); an int K = identity batches of
            ``batch_size / K`` identities x K **distinct images**, each with one of its captions drawn from
            (seed, epoch) (LCR²S's support sets); identities with fewer than K images are left out and counted,
            see :class:`~pedlightning.data.samplers.IdentityBatchSampler`.
        mean, std: normalisation (CLIP's by default).
        flip_prob, padding, erasing_prob: training augmentation (IRRA: flip, pad 10 + crop, random erasing).
        seed: shuffling seed, shared by all ranks.
        on_error: an unreadable image is named once, counted and skipped (``skip``, the default, as LUPerson's)
            or stops the run with an error naming it (``fail``). A training pair whose image is unreadable is
            replaced by a caption + image of another image of the same identity (so identity batches keep their
            shape); a skipped gallery image by a grey placeholder (see :mod:`pedlightning.data.datasets`).
        verify_images: decode every image of the splits a stage reads at ``setup`` (with progress), and fail
            naming every bad file, or drop them under ``skip``. Off by default: it reads the whole dataset once.
        finish_on_device: loader workers only decode; the device crops, resizes, flips, shifts, normalises and
            erases the decoded uint8 images after the transfer (``on_after_batch_transfer``), with the same pixels
            (the erasing noise then comes from the device's generator). ``None``: when the trainer runs on a GPU.
            ``False``: the loader yields finished float batches.
    """

    build_source = staticmethod(build_text_source)

    def __init__(self, dataset: str = "cuhk_pedes", root: str = "data/CUHK-PEDES",
                 model_selection: Literal["val", "test"] = "val", synthesize: bool = False,
                 synthetic: dict | None = None, tokenizer: str = "ViT-B-16", context_length: int = 77,
                 img_size: Sequence[int] = (384, 128), batch_size: int = 64, num_instances: int | None = None,
                 test_batch_size: int = 128, num_workers: int = 4, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, flip_prob: float = 0.5, padding: int = 10,
                 erasing_prob: float = 0.5, seed: int = 0, on_error: OnError = "skip", verify_images: bool = False,
                 finish_on_device: bool | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.img_size = as_size(img_size)
        self._tokenizer: CaptionTokenizer | None = None

    @property
    def model_selection(self) -> str:
        return self.hparams.model_selection

    @property
    def context_length(self) -> int:
        return self.hparams.context_length

    def get_tokenizer(self) -> CaptionTokenizer:
        """The caption tokenizer: list of N strings -> LongTensor (N, context_length)."""
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.hparams.tokenizer, self.hparams.context_length)
        return self._tokenizer

    def used_splits(self, stage: str | None) -> tuple[str, ...]:
        """``fit``: train and the model-selection split; ``validate``: the latter; ``test``/``predict``: test."""
        selection = self.model_selection
        return {"fit": ("train", selection), "validate": (selection,), "test": ("test",), "predict": ("test",)}.get(
            stage, ("train", selection, "test"))

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage not in ("fit", "validate"):
            return
        name = self.hparams.dataset
        if self.model_selection == "test":
            rank_zero_warn(f"model_selection='test': VALIDATION RUNS ON THE {name} TEST SPLIT. A checkpoint selected "
                           "on val/* metrics is selected on the test set (the protocol of IRRA's public code); "
                           "say so when reporting its numbers.")
        else:
            rank_zero_info(f"Model selection: the {name} val split ({len(self.records('val'))} images); "
                           "the test split is only used by `test`.")

    @property
    def num_classes(self) -> int:
        """Number of training identities (the width of the shared ID classifier)."""
        return self._load_source().num_train_pids

    def spec_fields(self) -> dict:
        """Classes, tokens and, per evaluation stage, the caption texts (queries) and image paths (gallery) of
        the split that stage evaluates. ``tokenizer`` is the open_clip config whose BPE made the tokens
        (``clip_tiny_test`` -> ``ViT-B-16``), so a model compares it with its own via ``tokenizer_name``."""
        hp = self.hparams
        splits = {"validate": self.model_selection, "test": "test", "predict": "test"}
        items = {}
        for stage, split in splits.items():
            records = self.records(split)
            if records:
                items[stage] = (tuple(flatten_captions(records)[0]), tuple(r.path for r in records))
        return {"num_classes": self.num_classes, "context_length": hp.context_length,
                "tokenizer": tokenizer_name(hp.tokenizer), "model_selection": self.model_selection,
                "eval_items": items}

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        require_own_sampling(self.trainer)
        transform = build_train_transform(self.img_size, hp.flip_prob, hp.padding, hp.erasing_prob, hp.mean, hp.std,
                                          defer=True, finish_on_device=finishes_on_device(hp.finish_on_device,
                                                                                          self.trainer))
        faults, name = [self.faults("train")], f"{hp.dataset} train"
        dataset = ImageCaptionDataset(self.records("train"), self.get_tokenizer(), transform, faults[0])
        if hp.num_instances is None:
            return shuffled_loader(dataset, hp.batch_size, hp.num_workers, self.trainer, hp.seed, faults, name)
        world_size, rank = world(self.trainer)
        sampler = IdentityBatchSampler(dataset.pids, hp.batch_size, hp.num_instances, hp.seed,
                                       num_replicas=world_size, rank=rank, image_ids=dataset.image_indices)
        return batch_loader(dataset, sampler, hp.num_workers, self.trainer, faults, name)

    def _eval_loader(self, split: str) -> DataLoader:
        """Captions of ``split`` (``part`` 0, the queries) then its images (``part`` 1) in one loader."""
        hp = self.hparams
        require_own_sampling(self.trainer)
        queries = CaptionDataset(self.records(split), self.get_tokenizer())
        gallery = self.dataset(split, build_test_transform(self.img_size, hp.mean, hp.std), "placeholder")
        return retrieval_loader([queries, gallery], hp.test_batch_size, hp.num_workers, self.trainer,
                                [self.faults(split)], f"{hp.dataset} {split}")

    def val_dataloader(self) -> DataLoader:
        if self.model_selection == "val" and not self.records("val"):
            raise ConfigError(f"dataset {self.hparams.dataset!r} at {self.hparams.root} has no validation split "
                              "(ICFG-PEDES ships only train and test): set data.init_args.model_selection: test to "
                              "validate on the test split, or trainer.limit_val_batches: 0 to train without validation")
        return self._eval_loader(self.model_selection)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
