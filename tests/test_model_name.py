"""The model's own name (answers, metrics, the Home Assistant device's `model`): the checkpoint it was exported
from, not the folder it happens to sit in."""

import json
import pathlib

import pytest

from edge_agent.engine.model_dir import ModelDir

REWRITTEN = ("config.json", "edge_agent_export.json")


def model_folder(exported: pathlib.Path, folder: pathlib.Path, source=None, name_or_path=None) -> pathlib.Path:
    """A copy of an exported model in `folder` (files linked) whose export metadata names `source` (none when
    None) and whose config.json names `name_or_path` (none when None)."""
    folder.mkdir()
    for file in exported.iterdir():
        if file.name not in REWRITTEN:
            (folder / file.name).symlink_to(file)
    config = json.loads((exported / "config.json").read_text())
    if name_or_path is not None:
        config["_name_or_path"] = name_or_path
    (folder / "config.json").write_text(json.dumps(config))
    if source is not None:
        metadata = json.loads((exported / "edge_agent_export.json").read_text())
        (folder / "edge_agent_export.json").write_text(json.dumps({**metadata, "source": source}))
    return folder


@pytest.mark.parametrize(
    "source, name_or_path, name",
    [
        pytest.param("llava-hf/llava-1.5-7b-hf", None, "llava-hf/llava-1.5-7b-hf", id="a Hub id it was exported from"),
        pytest.param("/srv/checkpoints/llava-1.5-7b-hf", None, "llava-1.5-7b-hf", id="a local checkpoint"),
        pytest.param(None, "llava-hf/bakLlava-v1-hf", "llava-hf/bakLlava-v1-hf", id="an export without metadata"),
        pytest.param("llava-hf/llava-1.5-7b-hf", "other/name", "llava-hf/llava-1.5-7b-hf", id="metadata first"),
        pytest.param(None, None, "model", id="nothing better than the folder"),
        pytest.param(["not", "a", "name"], "", "model", id="no usable name"),
        pytest.param("x" * 500, "bad\nname", "model", id="no plausible name"),
    ],
)
def test_the_model_is_named_after_the_checkpoint_it_was_exported_from(
    tiny_llava_int8, tmp_path, source, name_or_path, name
):
    folder = model_folder(tiny_llava_int8, tmp_path / "model", source, name_or_path)

    assert ModelDir.open(folder).name == name


@pytest.mark.parametrize("metadata", ["[1, 2]", "{not json", ""])
def test_unreadable_export_metadata_leaves_the_config_name(tiny_llava_int8, tmp_path, metadata):
    folder = model_folder(tiny_llava_int8, tmp_path / "model", name_or_path="llava-hf/bakLlava-v1-hf")
    (folder / "edge_agent_export.json").write_text(metadata)

    assert ModelDir.open(folder).name == "llava-hf/bakLlava-v1-hf"
