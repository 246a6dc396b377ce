"""Shared fixtures live in tests/support/*.py, one module per concern (broker, videos, models, ...)."""

import pathlib

import pytest

# Support modules import each other; rewrite their asserts whichever is imported first.
pytest.register_assert_rewrite("tests.support")

pytest_plugins = sorted(
    f"tests.support.{path.stem}" for path in (pathlib.Path(__file__).parent / "support").glob("[!_]*.py")
)
