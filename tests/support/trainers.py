"""The quiet one-CPU Trainer the task tests fit and test with."""

import lightning as L


def cpu_trainer(root, **overrides) -> L.Trainer:
    """A Trainer on one CPU in ``root``: no progress bar or model summary, and unless ``overrides`` say otherwise no
    logger, no checkpoints and no distributed sampler (the tests build their own samplers)."""
    kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False, "use_distributed_sampler": False,
          "default_root_dir": str(root), **overrides}
    return L.Trainer(**kw)
