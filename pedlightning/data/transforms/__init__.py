"""Image transforms: reID train/test pipelines (reid.py), RegionA/RegionB pair sampling (regions.py), and the
per-batch finishing both training pipelines use in loaders (batched.py)."""

from pedlightning.data.transforms.reid import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ReIDTrainTransform,
    build_test_transform,
    build_train_transform,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ReIDTrainTransform", "build_test_transform", "build_train_transform"]
