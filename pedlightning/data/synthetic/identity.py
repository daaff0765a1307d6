"""Synthetic identities: a fixed, self-consistent set of PA-100K attributes plus colours and body shape.

An identity is what stays the same across cameras (clothing, hair, bags, body shape); the view
(Front/Side/Back) is chosen per image by the renderer.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from pedlightning.data.sources.attributes import PA100K_ATTRIBUTES

__all__ = [
    "COLORS",
    "HAIR_COLORS",
    "IDENTITY_ATTRIBUTES",
    "VIEW_ATTRIBUTES",
    "Identity",
    "derive_seed",
    "make_identities",
    "make_identity",
]

VIEW_ATTRIBUTES: tuple[str, ...] = ("Front", "Side", "Back")
IDENTITY_ATTRIBUTES: tuple[str, ...] = tuple(a for a in PA100K_ATTRIBUTES if a not in VIEW_ATTRIBUTES)

COLORS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30),
    "white": (236, 236, 232),
    "gray": (128, 128, 132),
    "red": (200, 32, 36),
    "blue": (36, 72, 200),
    "green": (40, 150, 64),
    "yellow": (232, 208, 40),
    "purple": (128, 48, 160),
    "pink": (240, 140, 184),
    "brown": (120, 76, 40),
    "orange": (240, 128, 28),
}
"""Clothing colours by the name captions use."""

HAIR_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (20, 18, 18),
    "brown": (92, 58, 30),
    "blond": (214, 180, 100),
    "gray": (168, 168, 168),
}

_SKIN = ((246, 212, 180), (226, 180, 140), (190, 140, 100), (140, 96, 64), (100, 66, 44))
_LOWER_WEIGHTS = {"black": 3, "blue": 3, "gray": 2, "white": 1, "brown": 1.5, "green": 1, "red": 1,
                  "yellow": 0.5, "purple": 0.5, "pink": 0.7, "orange": 0.5}


def derive_seed(*ints: int) -> int:
    """A 64-bit seed from integers (stable across processes and platforms; never uses ``hash()``)."""
    text = ",".join(str(int(i)) for i in ints).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Identity:
    """One synthetic person.

    ``attributes`` holds the 23 identity-level PA-100K attributes (0/1), consistent by construction:
    exactly one age bucket, ShortSleeve xor LongSleeve, exactly one of Trousers/Shorts/Skirt&Dress,
    at most one upper pattern and one lower pattern, a long coat has long sleeves and no upper pattern.
    Colours are names from ``COLORS``/``HAIR_COLORS`` (what captions say); ``rgb`` holds the exact
    shades drawn, jittered per identity so two people in "red" are not pixel-identical.
    ``height``/``width`` scale the body (children are shorter).
    """

    pid: int
    attributes: dict[str, int]
    upper_color: str
    lower_color: str
    shoe_color: str
    hair: str
    hair_color: str
    hat_color: str
    bag_color: str
    pattern_color: str
    height: float
    width: float
    rgb: dict[str, tuple[int, int, int]]

    @property
    def female(self) -> bool:
        return bool(self.attributes["Female"])

    @property
    def age(self) -> str:
        """The set age bucket: ``"AgeLess18"``, ``"Age18-60"`` or ``"AgeOver60"``."""
        return next(a for a in ("AgeLess18", "Age18-60", "AgeOver60") if self.attributes[a])

    @property
    def lower(self) -> str:
        """The set lower garment: ``"Trousers"``, ``"Shorts"`` or ``"Skirt&Dress"``."""
        return next(a for a in ("Trousers", "Shorts", "Skirt&Dress") if self.attributes[a])

    @property
    def upper_pattern(self) -> str | None:
        return next((a for a in ("UpperStride", "UpperLogo", "UpperPlaid", "UpperSplice") if self.attributes[a]), None)

    @property
    def lower_pattern(self) -> str | None:
        return next((a for a in ("LowerStripe", "LowerPattern") if self.attributes[a]), None)


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 14) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def make_identity(pid: int, seed: int) -> Identity:
    """The identity ``pid`` of the world ``seed`` (a pure function of the two integers).

    Assumption: attribute priors are flatter than PA-100K's (e.g. 45% female, 20% backpack) so every
    attribute has enough positives in small synthetic sets.
    """
    rng = random.Random(derive_seed(seed, pid, 0x1D))
    female = rng.random() < 0.45
    age = _pick(rng, {"AgeLess18": 0.08, "Age18-60": 0.82, "AgeOver60": 0.10})
    long_coat = rng.random() < 0.1
    short_sleeve = not long_coat and rng.random() < 0.4
    upper_pattern = None if long_coat else _pick(
        rng, {"": 0.55, "UpperStride": 0.12, "UpperLogo": 0.12, "UpperPlaid": 0.1, "UpperSplice": 0.11}
    )
    if female:
        lower = _pick(rng, {"Trousers": 0.5, "Shorts": 0.15, "Skirt&Dress": 0.35})
    else:
        lower = _pick(rng, {"Trousers": 0.8, "Shorts": 0.2})
    lower_pattern = _pick(rng, {"": 0.8, "LowerStripe": 0.1, "LowerPattern": 0.1})
    flags = {
        "Hat": rng.random() < 0.15,
        "Glasses": rng.random() < 0.2,
        "HandBag": rng.random() < (0.25 if female else 0.08),
        "ShoulderBag": rng.random() < 0.2,
        "Backpack": rng.random() < 0.2,
        "HoldObjectsInFront": rng.random() < 0.08,
        "boots": rng.random() < (0.05 if lower == "Shorts" else 0.18),
    }
    attributes = {name: 0 for name in IDENTITY_ATTRIBUTES}
    attributes.update({k: int(v) for k, v in flags.items()})
    attributes["Female"] = int(female)
    attributes[age] = 1
    attributes["ShortSleeve" if short_sleeve else "LongSleeve"] = 1
    attributes["LongCoat"] = int(long_coat)
    attributes[lower] = 1
    for pattern in (upper_pattern, lower_pattern):
        if pattern:
            attributes[pattern] = 1

    names = list(COLORS)
    upper = rng.choice(names)
    lower_color = _pick(rng, {k: v for k, v in _LOWER_WEIGHTS.items() if k != upper})
    pattern_color = rng.choice([c for c in names if c not in (upper, lower_color)])
    shoe = _pick(rng, {"black": 4, "white": 3, "brown": 2, "gray": 1, "red": 0.5, "blue": 0.5})
    if female:
        hair = _pick(rng, {"long": 0.7, "short": 0.3})
    else:
        hair = _pick(rng, {"short": 0.85, "long": 0.08, "bald": 0.07 if age != "AgeLess18" else 0.0})
    hair_color = "gray" if age == "AgeOver60" and rng.random() < 0.8 else _pick(
        rng, {"black": 0.6, "brown": 0.3, "blond": 0.1}
    )
    hat_color, bag_color = rng.choice(names), rng.choice(names)
    height = rng.uniform(*{"AgeLess18": (0.72, 0.86), "Age18-60": (0.9, 1.0), "AgeOver60": (0.86, 0.96)}[age])
    width = rng.uniform(0.85, 1.15) * (0.95 if female else 1.0)
    rgb = {
        "upper": _jitter(rng, COLORS[upper]),
        "lower": _jitter(rng, COLORS[lower_color]),
        "shoes": _jitter(rng, COLORS[shoe]),
        "pattern": _jitter(rng, COLORS[pattern_color]),
        "hair": _jitter(rng, HAIR_COLORS[hair_color], 8),
        "hat": COLORS[hat_color],
        "bag": COLORS[bag_color],
        "skin": _jitter(rng, rng.choice(_SKIN), 6),
    }
    return Identity(
        pid=pid, attributes=attributes, upper_color=upper, lower_color=lower_color, shoe_color=shoe,
        hair=hair, hair_color=hair_color, hat_color=hat_color, bag_color=bag_color,
        pattern_color=pattern_color, height=height, width=width, rgb=rgb,
    )


def make_identities(num: int, seed: int) -> list[Identity]:
    """``num`` identities with pids ``0..num-1`` of the world ``seed``."""
    return [make_identity(pid, seed) for pid in range(num)]
