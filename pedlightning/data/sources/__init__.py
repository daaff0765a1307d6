"""On-disk dataset parsers (pure Python, no torch): each turns a real dataset layout into plain records."""

from __future__ import annotations

import inspect
from typing import Any

from pedlightning.data.sources.attributes import PA100K_ATTRIBUTES
from pedlightning.data.sources.base import ReIDSource
from pedlightning.data.sources.market import DukeMTMC, Market1501, OccludedDuke
from pedlightning.data.sources.msmt17 import MSMT17
from pedlightning.data.sources.pa100k import PA100K
from pedlightning.data.sources.pedes import (
    CUHKPEDES,
    ICFGPEDES,
    CaptionSource,
    RSTPReid,
)
from pedlightning.errors import ConfigError

__all__ = [
    "ATTRIBUTE_SOURCES",
    "CUHKPEDES",
    "ICFGPEDES",
    "MSMT17",
    "PA100K",
    "PA100K_ATTRIBUTES",
    "REID_SOURCES",
    "TEXT_SOURCES",
    "CaptionSource",
    "DukeMTMC",
    "Market1501",
    "OccludedDuke",
    "RSTPReid",
    "ReIDSource",
    "build_attribute_source",
    "build_reid_source",
    "build_text_source",
]

REID_SOURCES: dict[str, type[ReIDSource]] = {
    "market1501": Market1501,
    "dukemtmc": DukeMTMC,
    "occluded_duke": OccludedDuke,
    "msmt17": MSMT17,
}
TEXT_SOURCES: dict[str, type[CaptionSource]] = {
    "cuhk_pedes": CUHKPEDES,
    "icfg_pedes": ICFGPEDES,
    "rstpreid": RSTPReid,
}
ATTRIBUTE_SOURCES: dict[str, type[PA100K]] = {"pa100k": PA100K}


def _build(registry: dict[str, type], kind: str, name: str, root: str, kwargs: dict[str, Any]) -> Any:
    if name not in registry:
        raise ConfigError(f"unknown {kind} source {name!r}; valid names: {sorted(registry)}")
    cls = registry[name]
    accepted = [p for p in inspect.signature(cls).parameters if p != "root"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        takes = ["root", *accepted]
        raise ConfigError(f"{kind} source {name!r} does not take {unknown}; it takes: {takes}")
    return cls(root, **kwargs)


def build_reid_source(name: str, root: str, **kwargs: Any) -> ReIDSource:
    """A reID source from its registry name, e.g. ``build_reid_source("msmt17", root, version="V2")``."""
    return _build(REID_SOURCES, "reID", name, root, kwargs)


def build_text_source(name: str, root: str, **kwargs: Any) -> CaptionSource:
    """A text-to-image search source from its registry name (``cuhk_pedes``, ``icfg_pedes``, ``rstpreid``)."""
    return _build(TEXT_SOURCES, "text", name, root, kwargs)


def build_attribute_source(name: str, root: str, **kwargs: Any) -> PA100K:
    """An attribute-recognition source from its registry name (``pa100k``)."""
    return _build(ATTRIBUTE_SOURCES, "attribute", name, root, kwargs)
