"""Lightning callbacks: rank-list images, feature export."""

from pedlightning.callbacks.features import FeatureWriter
from pedlightning.callbacks.ranklist import RankListCallback, RankListInputs

__all__ = ["FeatureWriter", "RankListCallback", "RankListInputs"]
