"""The config schema is declared once: its rules (cross-field ones too) and its JSON Schema come from it."""

import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
import yaml

from edge_agent.capture import SceneGate
from edge_agent.cli import main
from edge_agent.config import config_schema, load_config, parse_config
from tests.test_config import EXAMPLE, MINIMAL, error_of, schema_fields, with_changes

README = pathlib.Path(__file__).parents[1] / "README.md"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def readme_examples() -> list[dict]:
    """The YAML examples of the README, each completed with the one required setting they leave out."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    return [{"model": {"path": "models/llava"}, **yaml.safe_load(block)} for block in blocks]


def test_a_stale_after_s_not_longer_than_one_frame_interval_is_refused_at_load():
    """The rule lived in the capture layer, so `config check` passed a config that `run` then refused."""
    message = error_of(with_changes(camera={"fps": 1, "stale_after_s": 0.5}))

    assert message == (
        "config.yaml: camera.stale_after_s: must be longer than one frame interval at camera.fps (1 s), got 0.5"
    )


def test_the_layers_take_the_config_sections_as_they_are():
    config = parse_config(MINIMAL)

    gate = SceneGate(config.scene_gate)

    assert gate.changed(np.zeros((8, 8, 3), np.uint8))
    assert config.mqtt.client_id_for("kitchen") == "edge-agent-kitchen"
    assert parse_config(with_changes(mqtt={"client_id": "mine"})).mqtt.client_id_for("kitchen") == "mine"
    assert config.camera.source_text == "0"


def test_the_json_schema_accepts_the_shipped_config_and_the_readme_examples(validator):
    examples = [yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")), MINIMAL, *readme_examples()]

    for example in examples:
        validator.validate(example)
        parse_config(example)  # the schema and the loader agree
    assert len(examples) > 2


@pytest.mark.parametrize(
    "mistake",
    [
        {"mqtt": {"prot": 5}},
        {"camera": {"fps": 0}},
        {"mqtt": {"port": 65536}},
        {"mqtt": {"qos": 3}},
        {"scene_gate": {"threshold": 1.5}},
        {"scene_gate": {"size": 257}},
        {"mqtt": {"keepalive_s": 0}},
        {"camera": {"read_timeout_s": 1e10}},
        {"agent_id": "kitchen/1"},
        {"model": {"path": "models/llava", "device": "cpu"}},
        {"questions": [{"id": "q", "question": "What is in <image>?", "type": "text"}]},
        {"questions": [{"id": "q", "question": "  ", "type": "text"}]},
        {"questions": [{"id": "q", "question": "Which?", "type": "multi"}]},
        {"questions": [{"id": "q", "question": "Door open?", "type": "yes_no", "device_class": "temperature"}]},
        {"questions": [{"id": "q", "question": "How many?", "type": "number", "device_class": "occupancy"}]},
        {
            "questions": [
                {"id": "q", "question": "Which?", "type": "choice", "options": ["a", "b"], "device_class": "door"}
            ]
        },
    ],
)
def test_the_json_schema_rejects_what_the_loader_rejects(validator, mistake):
    mapping = with_changes(**mistake)

    error_of(mapping)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(mapping)


def test_every_setting_appears_in_the_json_schema_with_its_description_and_default():
    schema = config_schema()

    for name, field in schema_fields():
        node = schema
        for part in name.split("."):
            properties = node.get("properties") or node["items"]["properties"]
            node = properties[part]
        assert node["description"] == field.metadata["doc"], name
        if field.default is not dataclasses.MISSING:  # a plain default, not a computed or required one
            assert node.get("default") == (
                list(field.default) if isinstance(field.default, tuple) else field.default
            ), name


def test_config_schema_prints_a_draft_2020_12_json_schema(capsys):
    assert main(["config", "schema"]) == 0

    printed = json.loads(capsys.readouterr().out)
    assert printed == config_schema()
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert printed["additionalProperties"] is False


def test_config_check_prints_one_line_for_a_valid_config_and_the_problem_for_an_invalid_one(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text(EXAMPLE.read_text(encoding="utf-8").replace("  port: 1883", "  prot: 1883"))

    assert main(["config", "check", "--config", str(EXAMPLE)]) == 0
    assert main(["config", "check", "--config", str(broken)]) == 2

    out, err = capsys.readouterr()
    config = load_config(EXAMPLE)
    assert out == f"{EXAMPLE}: valid ({len(config.questions)} questions, agent_id {config.agent_id})\n"
    assert err == f"edge-agent: error: {broken}: mqtt: unknown key 'prot' (did you mean 'port'?)\n"


def test_the_config_module_loads_only_leaf_modules_and_no_heavy_library():
    """The layers import their sections from it: anything that imports a layer back would make an import
    cycle, and `config check` must not load OpenVINO, OpenCV, numpy or paho."""
    script = (
        "import sys, edge_agent.config; "
        "print(' '.join(sorted(name for name in sys.modules if name.split('.')[0] in "
        "('edge_agent', 'openvino', 'cv2', 'numpy', 'paho'))))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
    )

    assert loaded == {
        "edge_agent",
        "edge_agent.config",
        "edge_agent.device_classes",
        "edge_agent.errors",
        "edge_agent.questions",
    }
