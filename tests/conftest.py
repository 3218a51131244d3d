"""Fixtures and hooks for this folder; the helpers live in model_utils.py (a uniquely named module:
test files import helpers from it, never from `conftest`, which is ambiguous across folders)."""

from model_utils import *  # noqa: F403
