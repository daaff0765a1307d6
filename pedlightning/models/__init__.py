"""Models: the shared timm image encoder, checkpoint loading and heads.

The open_clip towers live in :mod:`pedlightning.models.text` (imported on demand: open_clip is slow to import).
"""

from pedlightning.models.checkpoint import LoadReport, load_pretrained
from pedlightning.models.encoders import ImageEncoder
from pedlightning.models.heads import BNNeck

__all__ = ["BNNeck", "ImageEncoder", "LoadReport", "load_pretrained"]
