"""qnext_convert: Hugging Face Qwen3-Next checkpoints -> qnext_jax parameters.

Installed as `qnext_convert` (the source folder is `convert/`)."""

from .checkpoint import is_converted, load_pretrained, model_config, save_converted
from .loader import CheckpointError, load_params, plan
from .safetensors_io import SafetensorsCheckpoint

__all__ = [
    "CheckpointError",
    "SafetensorsCheckpoint",
    "is_converted",
    "load_params",
    "load_pretrained",
    "model_config",
    "plan",
    "save_converted",
]
