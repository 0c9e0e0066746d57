"""ComFusion: the algorithm (configs, data, models, losses, training, sampling, checkpoints).

This package never imports ray or mlflow; `jobs/` and `serve/` wire it to them.
"""
from pathlib import Path

__version__ = "0.1.0"


def presets_dir() -> Path:
    """Folder of presets whose weights are committed with the code (e.g. the toy world)."""
    return Path(__file__).parent / "presets"
