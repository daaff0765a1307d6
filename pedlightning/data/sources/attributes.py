"""The canonical pedestrian attribute vocabulary: PA-100K's 26 attributes (Liu et al., ICCV 2017).

Every attribute vector in pedlightning that is not read from a dataset's own annotation file (LUPerson-TA's
per-image flags, the synthetic renderer's labels) uses these names in this order, so an attribute head trained
on one source reads the same columns on another. Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pedlightning.errors import DatasetLayoutError

__all__ = ["PA100K_ATTRIBUTES", "attribute_vector"]

PA100K_ATTRIBUTES: tuple[str, ...] = (
    "Female", "AgeOver60", "Age18-60", "AgeLess18", "Front", "Side", "Back", "Hat", "Glasses",
    "HandBag", "ShoulderBag", "Backpack", "HoldObjectsInFront", "ShortSleeve", "LongSleeve",
    "UpperStride", "UpperLogo", "UpperPlaid", "UpperSplice", "LowerStripe", "LowerPattern",
    "LongCoat", "Trousers", "Shorts", "Skirt&Dress", "boots",
)
"""The 26 PA-100K attributes in the order of its ``annotation.mat`` (the columns of ``*_label``)."""


def attribute_vector(flags: Mapping[str, object], names: Sequence[str] = PA100K_ATTRIBUTES,
                     where: str = "attributes") -> tuple[int, ...]:
    """``flags`` (name -> 0/1) as a vector in the order of ``names``; every name must be present, values 0 or 1.

    A missing name or a value other than 0/1 (``True``/``False`` accepted) raises a DatasetLayoutError naming
    ``where`` and the offending key: a partly labelled sample must say so (no attributes at all), never read
    as negatives.
    """
    missing = [n for n in names if n not in flags]
    if missing:
        raise DatasetLayoutError(f"{where}: attribute(s) {missing} missing; expected all of {list(names)}")
    out = []
    for name in names:
        value = flags[name]
        if value not in (0, 1) or isinstance(value, float) and value not in (0.0, 1.0):
            raise DatasetLayoutError(f"{where}: attribute {name!r} is {value!r}, expected 0 or 1")
        out.append(int(value))
    return tuple(out)
