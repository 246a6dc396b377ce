"""Tiny LLaVA models for tests: random-weight checkpoints and their OpenVINO exports, built once and cached.

Each model is built offline on first use into `<repo>/.cache/test-models/<key>/<name>`, where the key
hashes the sources of `edge_agent/devtools/testmodels.py` and `edge_agent/export.py` and the versions of the
libraries that shape the files, so a change to any of them rebuilds. A file lock serialises builds across
parallel test processes. Prebuild everything (e.g. in CI) with `python -m tests.support.models`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import os
import pathlib
from typing import Iterator

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
_KEYED_SOURCES = ("edge_agent/devtools/testmodels.py", "edge_agent/export.py")
_KEYED_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "optimum-intel",
    "optimum",
    "nncf",
    "openvino",
    "openvino-tokenizers",
)


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """How one cached test model is made."""

    arch: str
    """LLaVA architecture of the random checkpoint: "llava" or "llava_next"."""
    weight_format: str | None = None
    """OpenVINO export weight format, or None for the Hugging Face checkpoint itself."""
    group_size: int | None = None
    """int4 only: channels per quantization scale (the tiny LM has 64 and 128 input channels)."""
    preset: str = "tiny"
    """`edge_agent.devtools.testmodels` preset of the random checkpoint."""

    @property
    def checkpoint(self) -> str:
        """Name of the checkpoint this model is exported from (itself, for a checkpoint)."""
        return f"{self.preset}-{self.arch}"


RECIPES = {
    "tiny-llava": ModelRecipe("llava"),
    "tiny-llava_next": ModelRecipe("llava_next"),
    "tiny-llava-fp32": ModelRecipe("llava", "fp32"),
    "tiny-llava_next-fp32": ModelRecipe("llava_next", "fp32"),
    "tiny-llava-int8": ModelRecipe("llava", "int8"),
    "tiny-llava-int4": ModelRecipe("llava", "int4", group_size=32),
    "tiny-qwen2-layout-llava": ModelRecipe("llava", preset="tiny-qwen2-layout"),
    "tiny-qwen2-layout-llava-fp32": ModelRecipe("llava", "fp32", preset="tiny-qwen2-layout"),
}


def cache_dir() -> pathlib.Path:
    """Where models built from the current sources and library versions live."""
    digest = hashlib.sha256()
    for source in _KEYED_SOURCES:
        digest.update((REPO / source).read_bytes())
    for package in _KEYED_PACKAGES:
        digest.update(f"{package}=={importlib.metadata.version(package)}\n".encode())
    return REPO / ".cache" / "test-models" / digest.hexdigest()[:16]


def ensure_test_model(name: str) -> pathlib.Path:
    """The path of test model `name` (a key of RECIPES), built first if it is not cached yet."""
    with _build_lock(cache_dir()):
        return _ensure_locked(name)


def ensure_test_models() -> list[pathlib.Path]:
    """Build every test model that is not cached yet; return their paths."""
    with _build_lock(cache_dir()):
        return [_ensure_locked(name) for name in RECIPES]


@contextlib.contextmanager
def _build_lock(directory: pathlib.Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def _ensure_locked(name: str) -> pathlib.Path:
    path = cache_dir() / name
    if path.is_dir():  # builds are staged and renamed into place, so a directory is complete
        return path
    recipe = RECIPES[name]
    with _hub_offline():
        if recipe.weight_format is None:
            from edge_agent.devtools.testmodels import build_test_model

            build_test_model(path, arch=recipe.arch, preset=recipe.preset, seed=0)
        else:
            from edge_agent.export import export_model

            export_model(
                str(_ensure_locked(recipe.checkpoint)),
                path,
                weight_format=recipe.weight_format,
                group_size=recipe.group_size,
                progress=False,
            )
    return path


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make any accidental Hugging Face Hub access fail at once instead of waiting for the network."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _session_fixture(fixture_name: str, model_name: str, description: str):
    def fixture() -> pathlib.Path:
        return ensure_test_model(model_name)

    fixture.__doc__ = description
    return pytest.fixture(scope="session", name=fixture_name)(fixture)


tiny_llava_checkpoint = _session_fixture(
    "tiny_llava_checkpoint",
    "tiny-llava",
    "Random-weight llava Hugging Face checkpoint (32 px image, 16 image tokens, vocab 1000).",
)
tiny_llava_next_checkpoint = _session_fixture(
    "tiny_llava_next_checkpoint", "tiny-llava_next", "Random-weight llava_next (anyres) Hugging Face checkpoint."
)
tiny_llava_fp32 = _session_fixture(
    "tiny_llava_fp32", "tiny-llava-fp32", "tiny llava exported to OpenVINO with fp32 weights."
)
tiny_llava_next_fp32 = _session_fixture(
    "tiny_llava_next_fp32", "tiny-llava_next-fp32", "tiny llava_next exported to OpenVINO with fp32 weights."
)
tiny_grouped_llava_checkpoint = _session_fixture(
    "tiny_grouped_llava_checkpoint",
    "tiny-qwen2-layout-llava",
    "tiny llava with one language model layer of Qwen2-0.5B's grouped-query layout (14 heads, 2 key/value heads).",
)
tiny_grouped_llava_fp32 = _session_fixture(
    "tiny_grouped_llava_fp32",
    "tiny-qwen2-layout-llava-fp32",
    "The grouped-query tiny llava exported with fp32 weights.",
)
tiny_llava_int8 = _session_fixture(
    "tiny_llava_int8", "tiny-llava-int8", "tiny llava exported with int8 weights everywhere."
)
tiny_llava_int4 = _session_fixture(
    "tiny_llava_int4",
    "tiny-llava-int4",
    "tiny llava exported with an int4 language model (group size 32) and int8 embeddings.",
)


if __name__ == "__main__":
    for built in ensure_test_models():
        print(built)
