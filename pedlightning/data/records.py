"""Plain records that dataset parsers produce and torch datasets consume (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PersonImage:
    """One reID image: absolute path, person id and camera id.

    Train pids are relabelled to 0..N-1 by the parsers; query/gallery pids keep the dataset's ids
    (Market-1501: -1 = junk, 0 = distractor).
    """

    path: str
    pid: int
    camid: int


@dataclass(frozen=True)
class AttributeImage:
    """One attribute-recognition image with its binary labels in the dataset's attribute order."""

    path: str
    labels: tuple[int, ...]


@dataclass(frozen=True)
class CaptionedImage:
    """One text-to-image search image: its identity and the captions that describe it."""

    path: str
    pid: int
    captions: tuple[str, ...]


@dataclass(frozen=True)
class PersonAnnotation:
    """The text and attribute annotation of one LUPerson-TA image (the ``<key>.json`` member of its shard).

    ``captions`` is empty when the image has no caption; ``attributes`` is ``None`` when it is not labelled
    (never a vector of zeros: an unlabelled attribute is not a negative one). Attribute values are 0/1 in the
    order of the dataset's attribute names (PA-100K's by default, ``data.sources.attributes``).
    """

    captions: tuple[str, ...] = ()
    attributes: tuple[int, ...] | None = None

    @property
    def has_captions(self) -> bool:
        return bool(self.captions)

    @property
    def has_attributes(self) -> bool:
        return self.attributes is not None


@dataclass(frozen=True)
class PersonSample:
    """What a per-sample transform of unlabeled / LUPerson-TA data receives.

    ``image`` is the decoded RGB image (PIL; a CHW uint8 tensor for a transform that ``reads_tensors``), ``key``
    its shard key (or file index), ``annotation`` its
    LUPerson-TA annotation (empty for plain LUPerson), ``epoch`` the training epoch (for draws that must be
    deterministic per epoch, such as which caption a sample shows).
    """

    image: object
    key: str
    annotation: PersonAnnotation = PersonAnnotation()
    epoch: int = 0
