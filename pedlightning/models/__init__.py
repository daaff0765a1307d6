"""Models: the shared image encoder, the momentum encoder, checkpoint loading and heads.

The open_clip text tower (`TextEncoder`) lives in :mod:`pedlightning.models.text` (imported on demand: open_clip is
slow to import); CLIP's visual tower is an `ImageEncoder` named `open_clip:<config>`.
"""

from pedlightning.models.checkpoint import LoadReport, load_pretrained
from pedlightning.models.encoders import ImageEncoder, ImageEncoderConfig
from pedlightning.models.heads import BNNeck
from pedlightning.models.momentum import MomentumEncoder, momentum_at

__all__ = ["BNNeck", "ImageEncoder", "ImageEncoderConfig", "LoadReport", "MomentumEncoder", "load_pretrained",
           "momentum_at"]
