"""Shared fixtures live in tests/support/*.py, one module per concern (broker, videos, models, ...)."""

import logging
import pathlib

import pytest

# Support modules import each other; rewrite their asserts whichever is imported first.
pytest.register_assert_rewrite("tests.support")

pytest_plugins = sorted(
    f"tests.support.{path.stem}" for path in (pathlib.Path(__file__).parent / "support").glob("[!_]*.py")
)


@pytest.fixture(autouse=True)
def root_logging_left_as_found():
    """Undo `edge_agent.logs.configure`, which tests reach through the CLI: its handler writes to the test's
    captured stderr, closed once the test ends, and a later test's log line would print a logging error there."""
    root = logging.getLogger()
    level = root.level
    yield
    root.handlers[:] = [handler for handler in root.handlers if type(handler) is not logging.StreamHandler]
    root.setLevel(level)
