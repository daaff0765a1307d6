"""LightningModules: one per task or paper."""

from pedlightning.tasks.attributes import AttributeModule
from pedlightning.tasks.base import TaskModule
from pedlightning.tasks.lcr2s import LCR2SModule
from pedlightning.tasks.personmae import PersonMAEModule
from pedlightning.tasks.reid import ReIDModule
from pedlightning.tasks.text_reid import TextReIDModule
from pedlightning.tasks.valpat import VALPATModule

__all__ = ["AttributeModule", "LCR2SModule", "PersonMAEModule", "ReIDModule", "TaskModule", "TextReIDModule",
           "VALPATModule"]
