"""Image transforms: reID train/test pipelines (reid.py) and RegionA/RegionB pair sampling (regions.py)."""

from pedlightning.data.transforms.reid import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_test_transform,
    build_train_transform,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_test_transform", "build_train_transform"]
