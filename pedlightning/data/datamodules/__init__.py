"""LightningDataModules over the dataset sources."""

from pedlightning.data.datamodules.attributes import AttributeDataModule
from pedlightning.data.datamodules.luperson import LUPersonDataModule
from pedlightning.data.datamodules.luperson_ta import LUPersonTADataModule
from pedlightning.data.datamodules.reid import ReIDDataModule
from pedlightning.data.datamodules.text import TextReIDDataModule

__all__ = ["AttributeDataModule", "LUPersonDataModule", "LUPersonTADataModule", "ReIDDataModule", "TextReIDDataModule"]
