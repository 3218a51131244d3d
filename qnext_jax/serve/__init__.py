"""OpenAI-compatible HTTP server (`python -m qnext_jax.serve`): FastAPI routes over one engine
thread doing continuous batching. See shared/spec/serving.md for the surface."""

from qnext_jax.serve.app import build_app

__all__ = ["build_app"]
