"""Shared fixtures live in tests/support/*.py, one module per concern (broker, videos, models, ...)."""

import pathlib

pytest_plugins = sorted(
    f"tests.support.{path.stem}"
    for path in (pathlib.Path(__file__).parent / "support").glob("[!_]*.py")
)
