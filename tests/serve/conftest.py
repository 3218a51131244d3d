"""Fixtures and hooks for this folder; the helpers live in serve_utils.py (a uniquely named module:
test files import helpers from it, never from `conftest`, which is ambiguous across folders)."""

from serve_utils import *  # noqa: F403
