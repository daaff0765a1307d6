"""The contract between a datamodule and a task: the facts a model needs from its data, in one typed record.

A pedlightning datamodule returns a :class:`DataSpec` from ``data_spec()``; a task reads it in ``setup`` and checks
it against its own configuration (:meth:`DataSpec.require`, :meth:`DataSpec.check_equal`), so a mismatch (a model
built for 384x128 over data cropped to 256x128, a classifier of 751 identities over 1,041) is a clear error at
start-up, never a shape error hours in. Plain types only: no torch, nothing from ``models`` or ``tasks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pedlightning.errors import ConfigError


@dataclass(frozen=True)
class DataSpec:
    """What the data tells the model.

    Attributes:
        source: a human-readable name of the data (``market1501 at data/market1501``), used in error messages.
        img_size: ``(height, width)`` of the images the loaders yield.
        mean, std: the normalisation the loaders apply (a feature extractor must apply the same).
        num_classes: training identities (reID / text ID losses), ``None`` when the data has no identities.
        num_attributes, attribute_names, positive_ratio: the attribute vector of each sample and the training
            positive ratio of each attribute (weighted BCE), ``None`` when the data has no attributes.
        context_length, tokenizer: the caption tokens the loaders yield and the tokenizer that made them.
        model_selection: which split validation evaluates (text search: ``val`` or ``test``).
        eval_items: per evaluation stage (``validate``, ``test``, ``predict``), the label of each query and of each
            gallery item in dataset-index order: image paths, or the caption text of a text query.
    """

    source: str
    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int | None = None
    num_attributes: int | None = None
    attribute_names: tuple[str, ...] | None = None
    positive_ratio: tuple[float, ...] | None = None
    context_length: int | None = None
    tokenizer: str | None = None
    model_selection: str | None = None
    eval_items: dict[str, tuple[Sequence[str], Sequence[str]]] = field(default_factory=dict, compare=False)

    def require(self, name: str, task: str) -> Any:
        """The value of ``name``; a ConfigError naming the task and the data when the data does not provide it."""
        value = getattr(self, name)
        if value is None:
            raise ConfigError(f"{task} needs `{name}` but the data ({self.source}) does not provide it: pass "
                              f"model.init_args.{name}, or use a datamodule whose data has it")
        return value

    def check_equal(self, name: str, model_value: Any, task: str) -> None:
        """A ConfigError when the model's ``name`` disagrees with the data's (both known)."""
        data_value = getattr(self, name)
        if data_value is None or model_value is None:
            return
        norm = (lambda v: tuple(v) if isinstance(v, (list, tuple)) else v)
        if norm(data_value) != norm(model_value):
            raise ConfigError(f"{task}: the model has {name}={_show(model_value)} but the data ({self.source}) "
                              f"has {name}={_show(data_value)}; set both to the same value")


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else repr(value)


@runtime_checkable
class SpecifiedData(Protocol):
    """A datamodule that states its :class:`DataSpec` (every pedlightning datamodule)."""

    def data_spec(self) -> DataSpec: ...
