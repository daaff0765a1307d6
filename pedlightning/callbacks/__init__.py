"""Lightning callbacks: rank-list images, feature export."""

from pedlightning.callbacks.checkpoint import RunCheckpoint
from pedlightning.callbacks.features import FeatureWriter
from pedlightning.callbacks.ranklist import RankListCallback, RankListInputs

__all__ = ["FeatureWriter", "RankListCallback", "RankListInputs", "RunCheckpoint"]
