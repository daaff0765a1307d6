"""LightningModules: one per task or paper."""

from pedlightning.tasks.base import TaskModule
from pedlightning.tasks.personmae import PersonMAEModule
from pedlightning.tasks.reid import ReIDModule

__all__ = ["PersonMAEModule", "ReIDModule", "TaskModule"]
