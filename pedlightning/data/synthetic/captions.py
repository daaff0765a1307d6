"""Natural-language captions generated from an image's attributes (CUHK-PEDES style: two per image).

Each caption is built from clauses (clothing, hair, carried items, shoes, view) whose wording, synonyms
and order vary with the seed, so captions of one image differ in phrasing but agree on content, and
captions of different identities differ in the words that matter (colours, garments, bags).
Every caption names the upper and the lower garment with their colours.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from pedlightning.data.synthetic.identity import Identity, derive_seed
from pedlightning.errors import ConfigError

__all__ = ["describe", "tokenize"]

_SUBJECT = {
    ("AgeLess18", True): ("a young girl", "a girl", "a little girl", "a teenage girl"),
    ("AgeLess18", False): ("a young boy", "a boy", "a kid", "a teenage boy"),
    ("Age18-60", True): ("a woman", "a lady", "a young woman", "a female pedestrian"),
    ("Age18-60", False): ("a man", "a guy", "a young man", "a male pedestrian"),
    ("AgeOver60", True): ("an elderly woman", "an old lady", "a senior woman"),
    ("AgeOver60", False): ("an elderly man", "an old man", "a senior man"),
}
_GENERIC_SUBJECT = ("the person", "this pedestrian", "the pedestrian")
_SHORT_TOPS = ("t-shirt", "short-sleeved shirt", "short-sleeved top")
_LONG_TOPS = ("long-sleeved shirt", "sweater", "jacket", "long-sleeved top")
_LOWER = {"Trousers": ("trousers", "pants", "long pants"), "Shorts": ("shorts", "short pants"),
          "Skirt&Dress": ("skirt", "dress")}
_VIEW = {
    "Front": ("facing the camera", "walking toward the camera"),
    "Back": ("walking away from the camera", "seen from behind"),
    "Side": ("seen from the side", "walking sideways past the camera"),
}


def tokenize(caption: str) -> list[str]:
    """Lower-case word tokens without punctuation (the ``processed_tokens`` of the caption json files)."""
    return re.findall(r"[a-z0-9]+", caption.lower())


def _first(a: dict[str, int], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if a.get(n)), None)


def _upper(ident: Identity, a: dict[str, int], rng: random.Random) -> str:
    color, pc = ident.upper_color, ident.pattern_color
    if a["LongCoat"]:
        return rng.choice((f"a long {color} coat", f"a {color} long coat", f"a knee-length {color} coat"))
    top = rng.choice(_SHORT_TOPS if a["ShortSleeve"] else _LONG_TOPS)
    pattern = _first(a, ("UpperStride", "UpperLogo", "UpperPlaid", "UpperSplice"))
    if pattern == "UpperStride":
        return rng.choice((f"a {color} striped {top}", f"a {color} {top} with {pc} stripes"))
    if pattern == "UpperPlaid":
        return rng.choice((f"a {color} plaid {top}", f"a {color} and {pc} checked {top}"))
    if pattern == "UpperLogo":
        return rng.choice((f"a {color} {top} with a {pc} logo", f"a {color} {top} with a logo on it"))
    if pattern == "UpperSplice":
        return rng.choice((f"a {color} and {pc} {top}", f"a two-tone {color} and {pc} {top}"))
    return f"a {color} {top}"


def _lower(ident: Identity, a: dict[str, int], rng: random.Random) -> str:
    color, pc = ident.lower_color, ident.pattern_color
    noun = rng.choice(_LOWER[_first(a, ("Trousers", "Shorts", "Skirt&Dress")) or "Trousers"])
    article = "a " if noun in ("skirt", "dress") else ""
    pattern = _first(a, ("LowerStripe", "LowerPattern"))
    if pattern == "LowerStripe":
        return rng.choice((f"{article}{color} {noun} with {pc} stripes", f"{article}{color} striped {noun}"))
    if pattern == "LowerPattern":
        return rng.choice((f"{article}{color} patterned {noun}", f"{article}{color} {noun} with {pc} dots"))
    return f"{article}{color} {noun}"


def _hair(ident: Identity, rng: random.Random) -> str | None:
    if ident.hair == "bald":
        return None
    color = ident.hair_color
    return rng.choice((f"{ident.hair} {color} hair", f"{color} {ident.hair} hair"))


def _carried(ident: Identity, a: dict[str, int], rng: random.Random, pos: str) -> list[str]:
    bag = ident.bag_color
    items = []
    if a["Backpack"]:
        items.append(rng.choice((f"a {bag} backpack", f"a {bag} bag on {pos} back")))
    if a["ShoulderBag"]:
        items.append(rng.choice((f"a {bag} shoulder bag", f"a {bag} bag over {pos} shoulder")))
    if a["HandBag"]:
        items.append(rng.choice((f"a {bag} handbag", f"a {bag} bag in {pos} hand")))
    if a["HoldObjectsInFront"]:
        obj = "her" if a["Female"] else "him"
        items.append(rng.choice((f"something in front of {obj}", "an object in both hands")))
    return items


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _caption(ident: Identity, attributes: dict[str, int], rng: random.Random,
             mention: Callable[[], bool] = lambda: True) -> str:
    """One caption; ``mention()`` decides, fact by fact, whether the caption names it (partial captions)."""
    a = attributes
    female = bool(a["Female"])
    age = _first(a, ("AgeLess18", "Age18-60", "AgeOver60")) or "Age18-60"
    pron, pos = ("she", "her") if female else ("he", "his")
    subject = rng.choice(_SUBJECT[(age, female)])
    wear = [_upper(ident, a, rng), _lower(ident, a, rng)]
    shoes = f"{ident.shoe_color} " + ("boots" if a["boots"] else rng.choice(("shoes", "sneakers")))
    if rng.random() < 0.7:
        wear.append(shoes)
    if a["Hat"]:
        wear.append(rng.choice((f"a {ident.hat_color} hat", f"a {ident.hat_color} cap")))
    if a["Glasses"]:
        wear.append(rng.choice(("glasses", "a pair of glasses")))
    rng.shuffle(wear[2:])
    wear = [w for w in wear if mention()]
    hair = _hair(ident, rng)
    carried = [c for c in _carried(ident, a, rng, pos) if mention()]
    view = _first(a, ("Front", "Side", "Back"))

    verb = rng.choice(("wearing", "in", "dressed in"))
    first = f"{subject} {verb} {_join(wear)}" if wear else f"{subject} walking"
    extra = []
    if hair and mention():
        extra.append(rng.choice((f"{pron} has {hair}", f"{pos} hair is {ident.hair} and {ident.hair_color}")))
    elif ident.hair == "bald" and mention():
        extra.append(f"{pron} is bald")
    if carried:
        extra.append(f"{pron} {rng.choice(('is carrying', 'is holding', 'has'))} {_join(carried)}")
    if view and rng.random() < 0.5 and mention():
        extra.append(f"{pron} is {rng.choice(_VIEW[view])}")
    rng.shuffle(extra)
    if rng.random() < 0.35 and "pedestrian" not in subject:  # "The person is a man. He is wearing ..."
        first = f"{rng.choice(_GENERIC_SUBJECT)} is {subject}"
        first += f". {pron.capitalize()} is wearing {_join(wear)}" if wear else ""
    sentences = [first] + extra
    if len(sentences) > 2 and sentences[1].startswith(pron + " ") and rng.random() < 0.5:
        sentences = [sentences[0] + " and " + sentences[1][len(pron) + 1 :]] + sentences[2:]
    return " ".join(s[0].upper() + s[1:] + "." for s in sentences)


def describe(identity: Identity, attributes: dict[str, int], seed: int, num: int = 2,
             mention_prob: float = 1.0) -> list[str]:
    """``num`` captions of one image of ``identity`` with per-image ``attributes`` (26 PA-100K names).

    Captions follow ``attributes`` for the attribute words (sex, age, sleeves, bags, ...) and the
    identity for colours; caption k of an image uses its own random stream, like a second annotator.

    ``mention_prob`` < 1 makes **partial captions** (for LCR²S, where a support set must add information): each
    fact (upper garment, lower garment, shoes, hat, glasses, hair, each carried item, view; with its colour) is
    named with this probability, independently per caption and seeded by (seed, pid, caption), so one caption
    tells part of what the identity's captions tell together. The subject (sex, age) is always named.
    """
    if not 0 < mention_prob <= 1:
        raise ConfigError(f"mention_prob must be in (0, 1], got {mention_prob}")
    captions = []
    for k in range(num):
        rng = random.Random(derive_seed(seed, identity.pid, k, 0xC7))
        if mention_prob >= 1:
            captions.append(_caption(identity, attributes, rng))
            continue
        facts = random.Random(derive_seed(seed, identity.pid, k, 0x3E))
        captions.append(_caption(identity, attributes, rng, lambda f=facts: f.random() < mention_prob))
    return captions
