"""pedlightning: a PyTorch Lightning framework for pedestrian analysis."""

__version__ = "0.1.0"
