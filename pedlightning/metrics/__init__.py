"""Evaluation metrics: person reID, attribute recognition and text-to-image retrieval.

Each comes as a function over whole arrays (`reid_evaluate`, `attribute_metrics`, `retrieval_evaluate`) and as a
torchmetrics `Metric` that gathers samples across processes and drops DistributedSampler padding duplicates.
"""

from pedlightning.metrics.attributes import AttributeMetric, attribute_metrics
from pedlightning.metrics.ranking import TIE_RULES, RankingResult, TieRule, feature_distance, rank_queries
from pedlightning.metrics.records import RankListInputs
from pedlightning.metrics.reid import ReIDMetric, reid_evaluate
from pedlightning.metrics.reranking import KReciprocalReranker, k_reciprocal_distance
from pedlightning.metrics.retrieval import RetrievalMetric, retrieval_evaluate

__all__ = [
    "TIE_RULES",
    "AttributeMetric",
    "KReciprocalReranker",
    "RankListInputs",
    "RankingResult",
    "ReIDMetric",
    "RetrievalMetric",
    "TieRule",
    "attribute_metrics",
    "feature_distance",
    "k_reciprocal_distance",
    "rank_queries",
    "reid_evaluate",
    "retrieval_evaluate",
]
