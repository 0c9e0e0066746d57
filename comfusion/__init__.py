"""ComFusion: the algorithm (configs, data, models, losses, training, sampling, checkpoints).

This package never imports ray or mlflow; `jobs/` and `serve/` wire it to them.
"""
import logging
from pathlib import Path

# diffusers imports bitsandbytes whenever it is installed, and bitsandbytes then warns on CPUs with
# AVX512-BF16 that its 4-bit matmul kernel (from the `kernels` hub package) is missing. The project
# never uses 4-bit layers (only the 8-bit AdamW, which needs no such kernel), so that one logger is
# kept to errors rather than teaching every user to ignore the line.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# diffusers' pipeline module names transformers' CLIP/Siglip image processors, which transformers 5
# then resolves to their PIL versions with a warning that torchvision is missing. The project never
# uses those processors (no safety checker, no image encoder; the judges preprocess with torch), and
# torchvision is left out on purpose, so that one logger is kept to errors.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)

__version__ = "0.1.0"


def presets_dir() -> Path:
    """Folder of presets whose weights are committed with the code (e.g. the toy world)."""
    return Path(__file__).parent / "presets"
