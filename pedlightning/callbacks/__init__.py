"""Lightning callbacks: checkpoints that resume, rank-list images, feature export, MAE reconstructions."""

from pedlightning.callbacks.checkpoint import RunCheckpoint
from pedlightning.callbacks.features import FeatureWriter
from pedlightning.callbacks.ranklist import RankListCallback, RankListInputs
from pedlightning.callbacks.reconstruction import ReconstructionGrid

__all__ = ["FeatureWriter", "RankListCallback", "RankListInputs", "ReconstructionGrid", "RunCheckpoint"]
