"""qnext_jax: Qwen3-Next inference in JAX/Flax NNX."""

from qnext_jax.config import QWEN3_NEXT_80B_A3B, Qwen3NextConfig, RuntimeOptions, tiny_config
from qnext_jax.llm import LLM, RequestOutput
from qnext_jax.loading import from_pretrained
from qnext_jax.model import Qwen3NextForCausalLM
from qnext_jax.sampling import SamplingParams

__all__ = [
    "LLM",
    "RequestOutput",
    "SamplingParams",
    "QWEN3_NEXT_80B_A3B",
    "Qwen3NextConfig",
    "Qwen3NextForCausalLM",
    "RuntimeOptions",
    "from_pretrained",
    "tiny_config",
]
__version__ = "0.1.0"
