"""config.yaml: the documented example loads, and every kind of mistake is one line naming the key."""

import copy
import dataclasses
import pathlib
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import Config, Question, load_config, parse_config, read_secret
from edge_agent.errors import UserError

EXAMPLE = pathlib.Path(__file__).parents[1] / "config.yaml"

MINIMAL = {
    "model": {"path": "models/llava"},
    "questions": [
        {"id": "door", "question": "Is the door open?", "type": "yes_no"},
        {"id": "light", "question": "Is the light on or off?", "type": "choice", "options": ["on", "off"]},
    ],
}


def with_changes(**sections) -> dict:
    """MINIMAL with some sections replaced or (for mappings) updated."""
    mapping = copy.deepcopy(MINIMAL)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(mapping.get(key), dict):
            mapping[key].update(value)
        else:
            mapping[key] = value
    return mapping


def question(**fields) -> dict:
    return {"id": "q", "question": "What is it?", "type": "text", **fields}


def error_of(mapping) -> str:
    with pytest.raises(UserError) as caught:
        parse_config(mapping)
    return str(caught.value)


def schema_fields(cls=Config, prefix=""):
    """(dotted name, field) for every setting, sections and questions included."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        yield prefix + field.name, field
        hint = hints[field.name]
        if typing.get_origin(hint) is tuple:
            hint = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(hint):
            yield from schema_fields(hint, f"{prefix}{field.name}.")


def test_the_documented_example_loads():
    config = load_config(EXAMPLE)

    assert config.agent_id == "kiosk-1"
    assert config.mqtt.protocol == "5"
    assert [q.id for q in config.questions] == ["door_open", "people", "lights", "counter"]
    assert config.questions[2].options == ("on", "off")
    assert config.metrics.address == ("127.0.0.1", 9464)


def test_every_setting_is_documented_in_the_schema_and_in_the_example():
    comments = {line.strip().removeprefix("# ") for line in EXAMPLE.read_text().splitlines()}

    for name, field in schema_fields():
        doc = field.metadata.get("doc")
        assert doc, f"{name} has no doc"
        assert doc in comments, f"config.yaml does not document {name} as: # {doc}"


def test_left_out_sections_take_sensible_defaults():
    config = parse_config({"model": {"path": "m"}})

    assert config.camera.source == 0
    assert config.model.device == "CPU"
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.qos) == ("localhost", 1883, 1)
    assert config.mqtt.base_topic == "edge-agent"
    assert config.mqtt.discovery and config.mqtt.discovery_prefix == "homeassistant"
    assert config.questions == ()
    assert config.metrics.address == ("127.0.0.1", 9464)
    assert config.agent_id  # the host name, made topic-safe


def test_the_config_is_frozen():
    config = parse_config(MINIMAL)

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.questions[0].every = 1


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        pytest.param(
            with_changes(questions=[question(evry=5)]),
            "config.yaml: questions[0]: unknown key 'evry' (did you mean 'every'?)",
            id="unknown key with a suggestion",
        ),
        pytest.param(
            with_changes(camera={"colour": True}),
            "config.yaml: camera: unknown key 'colour' (expected one of source, loop, fps,",
            id="unknown key without a close match",
        ),
        pytest.param(
            with_changes(questions=[question(), question(id="x", type="multi")]),
            "config.yaml: questions[1].type: must be one of yes_no, choice, number, text, got 'multi'",
            id="bad enum",
        ),
        pytest.param(
            with_changes(mqtt={"port": "1883"}),
            "config.yaml: mqtt.port: must be an integer, got '1883'",
            id="wrong type",
        ),
        pytest.param(
            with_changes(camera={"fps": "fast"}),
            "config.yaml: camera.fps: must be a number, got 'fast'",
            id="not a number",
        ),
        pytest.param(
            with_changes(mqtt={"discovery": "yes please"}),
            "config.yaml: mqtt.discovery: must be true or false, got 'yes please'",
            id="not a boolean",
        ),
        pytest.param(
            with_changes(camera={"fps": 0}),
            "config.yaml: camera.fps: must be a positive number",
            id="zero where positive is needed",
        ),
        pytest.param(
            with_changes(camera={"read_timeout_s": float("nan")}),
            "config.yaml: camera.read_timeout_s: must be a number, got nan",
            id="not a finite number",
        ),
        pytest.param(
            with_changes(questions=[question(every=-1)]),
            "config.yaml: questions[0].every: must be a positive number",
            id="negative interval",
        ),
        pytest.param(
            {"questions": []},
            "config.yaml: model.path: missing required key",
            id="missing required section",
        ),
        pytest.param(
            with_changes(questions=[{"id": "q", "type": "text"}]),
            "config.yaml: questions[0].question: missing required key",
            id="missing required key",
        ),
        pytest.param(
            with_changes(questions=[question(type="choice")]),
            "config.yaml: questions[0].options: must list at least 2 options when type is choice",
            id="choice without options",
        ),
        pytest.param(
            with_changes(questions=[question(type="choice", options=["Red", "green", "red"])]),
            "config.yaml: questions[0].options[2]: duplicate option 'red'",
            id="duplicate options",
        ),
        pytest.param(
            with_changes(questions=[question(type="yes_no", options=["yes", "no"])]),
            "config.yaml: questions[0].options: only allowed when type is choice (type is yes_no)",
            id="options on a non-choice question",
        ),
        pytest.param(
            with_changes(questions=[question(type="choice", options=[True, False])]),
            "config.yaml: questions[0].options[0]: must be a string, got True",
            id="unquoted on/off options",
        ),
        pytest.param(
            with_changes(questions=[question(id="a"), question(id="b"), question(id="a")]),
            "config.yaml: questions[2].id: duplicate id 'a' (also questions[0])",
            id="duplicate ids",
        ),
        pytest.param(
            with_changes(questions=[question(id="front door")]),
            "config.yaml: questions[0].id: must contain only letters, digits, '_' and '-'",
            id="question id not topic-safe",
        ),
        pytest.param(
            with_changes(agent_id="kiosk/1"),
            "config.yaml: agent_id: must contain only letters, digits, '_' and '-'",
            id="agent_id not topic-safe",
        ),
        pytest.param(
            with_changes(mqtt={"protocol": 4}),
            "config.yaml: mqtt.protocol: must be one of 5, 3.1.1, got 4",
            id="unknown protocol",
        ),
        pytest.param(
            with_changes(mqtt={"qos": 3}),
            "config.yaml: mqtt.qos: must be one of 0, 1, 2, got 3",
            id="bad qos",
        ),
        pytest.param(
            with_changes(mqtt={"base_topic": "home/+/agents"}),
            "config.yaml: mqtt.base_topic: must be MQTT topic levels separated by '/'",
            id="wildcard in base topic",
        ),
        pytest.param(
            with_changes(mqtt={"tls_insecure": True}),
            "config.yaml: mqtt.tls_insecure: only applies with TLS: set tls_ca_file too",
            id="tls_insecure without TLS",
        ),
        pytest.param(
            with_changes(mqtt={"password_file": "mqtt-password"}),
            "config.yaml: mqtt.password_file: needs username too",
            id="password without user",
        ),
        pytest.param(
            with_changes(model={"device": "gpu"}),
            "config.yaml: model.device: must be an OpenVINO device name such as CPU, GPU, GPU.1",
            id="device name",
        ),
        pytest.param(
            with_changes(camera={"source": 1.5}),
            "config.yaml: camera.source: must be a string or an integer, got 1.5",
            id="camera source",
        ),
        pytest.param(
            with_changes(camera={"backoff_initial_s": 60}),
            "config.yaml: camera.backoff_initial_s: must not exceed backoff_max_s (30.0)",
            id="backoff order",
        ),
        pytest.param(
            with_changes(scene_gate={"threshold": 1.5}),
            "config.yaml: scene_gate.threshold: must be between 0 and 1",
            id="threshold range",
        ),
        pytest.param(
            with_changes(metrics={"listen": "9464"}),
            "config.yaml: metrics.listen: must be host:port",
            id="metrics address",
        ),
        pytest.param(
            with_changes(questions={"door": "Is the door open?"}),
            "config.yaml: questions: must be a list, got a mapping",
            id="questions not a list",
        ),
        pytest.param(
            with_changes(camera=[0]),
            "config.yaml: camera: must be a mapping of settings, got a list",
            id="section not a mapping",
        ),
        pytest.param(["model"], "config.yaml: must be a mapping of settings, got a list", id="not a mapping"),
    ],
)
def test_a_mistake_is_one_line_naming_the_key_and_the_reason(mapping, message):
    error = error_of(mapping)

    assert error.startswith(message)
    assert "\n" not in error


@pytest.mark.parametrize(("written", "meant"), [(5, "5"), ("5", "5"), ("3.1.1", "3.1.1")])
def test_the_protocol_may_be_written_as_a_yaml_number_or_text(written, meant):
    assert parse_config(with_changes(mqtt={"protocol": written})).mqtt.protocol == meant


def test_yaml_reads_3_1_as_a_number_which_is_no_protocol():
    assert "mqtt.protocol: must be one of 5, 3.1.1, got 3.1" in error_of(with_changes(mqtt={"protocol": 3.1}))


@pytest.mark.parametrize("source", [2, "/dev/video0", "rtsp://127.0.0.1:8554/cam", "clips/door.mp4"])
def test_camera_sources_are_indices_or_paths_and_urls(source):
    assert parse_config(with_changes(camera={"source": source})).camera.source == source


@pytest.mark.parametrize(
    ("listen", "address"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:0", ("::1", 0)), ("", None), (None, None)],
)
def test_the_metrics_endpoint_is_host_port_or_disabled(listen, address):
    assert parse_config(with_changes(metrics={"listen": listen})).metrics.address == address


def test_an_empty_section_means_its_defaults():
    assert parse_config(with_changes(camera=None)).camera.fps == 1.0


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^.*absent\.yaml: cannot read config file: No such file or directory$"):
        load_config(tmp_path / "absent.yaml")


def test_a_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  path: m\nquestions: [\n")

    with pytest.raises(UserError) as caught:
        load_config(path)

    assert str(caught.value).startswith(f"{path}: invalid YAML at line 4")
    assert "\n" not in str(caught.value)


def test_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "box.yaml"
    path.write_text("model: {path: m}\nlog_level: verbose\n")

    with pytest.raises(UserError, match=rf"^{path}: log_level: must be one of debug, info, warning, error"):
        load_config(path)


def test_the_mqtt_password_comes_from_its_file_stripped(tmp_path):
    (tmp_path / "password").write_text("s3cret\n")
    config = parse_config(with_changes(mqtt={"username": "agent", "password_file": str(tmp_path / "password")}))

    assert config.mqtt.password() == "s3cret"
    assert parse_config(MINIMAL).mqtt.password() is None


def test_a_relative_password_file_is_a_systemd_credential(tmp_path, monkeypatch):
    (tmp_path / "mqtt-password").write_text("from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))

    assert read_secret("mqtt-password", "mqtt.password_file") == "from-systemd"


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "No such file or directory"), (b"  \n", "is empty"), (b"s3cret\xff", "is not UTF-8 text")],
)
def test_an_unreadable_password_is_one_line_naming_the_key_not_the_secret(tmp_path, content, reason):
    path = tmp_path / "password"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(UserError) as caught:
        read_secret(str(path), "mqtt.password_file")

    assert str(caught.value).startswith("mqtt.password_file: ")
    assert reason in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_questions_built_in_code_follow_the_same_rules():
    with pytest.raises(UserError, match="options: must list at least 2 options"):
        Question(id="light", question="On or off?", type="choice", options=("on",))


SETTING_NAMES = sorted({name.rsplit(".", 1)[-1] for name, _ in schema_fields()})
yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["CPU", "5", "3.1.1", "choice", "yes_no", "change", "127.0.0.1:1", "a", ""]),
)
yaml_keys = st.one_of(st.sampled_from(SETTING_NAMES), st.text(max_size=8), st.integers())
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(yaml_keys, inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([{}, MINIMAL]),
    overrides=st.dictionaries(st.sampled_from(SETTING_NAMES + ["questions", "zzz"]), yaml_values, max_size=4),
)
def test_any_loaded_yaml_either_gives_a_config_or_one_user_error_line(base, overrides):
    try:
        config = parse_config({**base, **overrides})
    except UserError as error:
        assert str(error).startswith("config.yaml") and "\n" not in str(error)
    else:
        assert isinstance(config, Config)


@pytest.mark.parametrize(
    "fields, message",
    [
        pytest.param(
            {"type": "yes_no", "device_class": "temperature"},
            "config.yaml: questions[0].device_class: 'temperature' is not a device class of a Home Assistant "
            "binary_sensor (the entity of a yes_no question)",
            id="a sensor class on a binary sensor",
        ),
        pytest.param(
            {"type": "number", "device_class": "occupancy"},
            "config.yaml: questions[0].device_class: 'occupancy' is not a device class of a Home Assistant "
            "sensor (the entity of a number question); a number question takes aqi, ph or power_factor",
            id="a binary sensor class on a sensor",
        ),
        pytest.param(
            {"type": "number", "device_class": "temperature"},
            "config.yaml: questions[0].device_class: 'temperature' does not fit a number question: its sensor "
            "has no unit of measurement; a number question takes aqi, ph or power_factor",
            id="a sensor class that needs a unit",
        ),
        pytest.param(
            {"type": "yes_no", "device_class": "ocupancy"},
            "config.yaml: questions[0].device_class: 'ocupancy' is not a device class of a Home Assistant "
            "binary_sensor (the entity of a yes_no question); did you mean 'occupancy'?",
            id="a misspelt class",
        ),
        pytest.param(
            {"type": "choice", "options": ["red", "blue"], "device_class": "enum"},
            "config.yaml: questions[0].device_class: a choice question is always an enum sensor with its options; "
            "remove device_class",
            id="any class on a choice question",
        ),
        pytest.param(
            {"type": "text", "device_class": "date"},
            "config.yaml: questions[0].device_class: a text question's sensor shows free text, which no device "
            "class fits; remove device_class",
            id="any class on a text question",
        ),
    ],
)
def test_a_device_class_home_assistant_would_refuse_for_the_entity_is_refused_at_load(fields, message):
    assert error_of(with_changes(questions=[question(**fields)])) == message


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"type": "yes_no", "device_class": "occupancy"}, id="binary sensor"),
        pytest.param({"type": "number", "device_class": "aqi"}, id="sensor measured without a unit"),
    ],
)
def test_a_device_class_home_assistant_knows_for_the_entity_loads(fields):
    assert (
        parse_config(with_changes(questions=[question(**fields)])).questions[0].device_class == fields["device_class"]
    )


def test_a_question_may_not_take_the_id_of_a_diagnostic_entity_of_the_agent():
    message = error_of(with_changes(questions=[question(id="a"), question(id="camera_connected", type="yes_no")]))

    assert message == (
        "config.yaml: questions[1].id: 'camera_connected' is the id of one of the agent's own Home Assistant "
        "entities; choose another"
    )
