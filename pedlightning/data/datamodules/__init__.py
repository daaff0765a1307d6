"""LightningDataModules over the dataset sources."""

from pedlightning.data.datamodules.luperson import LUPersonDataModule
from pedlightning.data.datamodules.reid import ReIDDataModule

__all__ = ["LUPersonDataModule", "ReIDDataModule"]
