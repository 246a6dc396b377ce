"""Config values that used to load and break the agent later are refused, or warned about, at start-up."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys

import pytest
import yaml

from edge_agent.config import parse_config
from edge_agent.errors import UserError
from edge_agent.mqtt.ask import AskRequest
from edge_agent.service import ad_hoc_question, load_engine
from tests.test_config import MINIMAL, error_of, question, with_changes

pytestmark = pytest.mark.timeout(120)


def test_a_keepalive_paho_cannot_send_is_refused_at_load():
    assert parse_config(with_changes(mqtt={"keepalive_s": 65535})).mqtt.keepalive_s == 65535

    message = error_of(with_changes(mqtt={"keepalive_s": 65536}))

    assert message.startswith("config.yaml: mqtt.keepalive_s: must be")
    assert "65535" in message and "\n" not in message


@pytest.mark.parametrize("key", ["open_timeout_s", "read_timeout_s", "stale_after_s", "backoff_max_s"])
def test_a_camera_wait_beyond_what_timers_hold_is_refused_at_load(key):
    """OpenCV failed every open on a timeout past 2^31 ms; a backoff grown to 1e10 s ended the reader thread."""
    message = error_of(with_changes(camera={key: 1e10}))

    assert message == f"config.yaml: camera.{key}: must be a positive number of seconds up to 604800 (a week)"


@pytest.mark.parametrize("key", ["base_topic", "client_id", "username", "discovery_prefix"])
@pytest.mark.parametrize("character", ["\x00", "\x1b", "\x7f", "\x85", "\ufdd0", "\uffff"])
def test_characters_the_broker_refuses_in_mqtt_names_are_refused_at_load(key, character):
    """Mosquitto drops a client whose id, user name or topic holds these: the agent reconnected forever."""
    message = error_of(with_changes(mqtt={key: f"edge{character}agent"}))

    assert message.startswith(f"config.yaml: mqtt.{key}: ")
    assert f"U+{ord(character):04X}" in message and "\n" not in message


@pytest.mark.parametrize(("key", "value"), [("model.path", "models/\x00llava"), ("camera.source", "a\x00.mp4")])
def test_a_nul_character_in_any_setting_is_refused_at_load(key, value):
    section, name = key.split(".")
    message = error_of(with_changes(**{section: {name: value}}))

    assert message == f"config.yaml: {key}: must not contain U+0000 (NUL)"


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"question": "What is in <image>?"}, "question"),
        ({"instruction": "Answer about <image> briefly."}, "instruction"),
        ({"type": "choice", "options": ["cat", "<image>"]}, "options[1]"),
    ],
)
def test_the_model_image_placeholder_in_a_question_is_refused_at_load(fields, key):
    """The placeholder would become a second image token and end the agent at its first frame."""
    message = error_of(with_changes(questions=[question(**fields)]))

    assert message.startswith(f"config.yaml: questions[0].{key}: ")
    assert "<image>" in message and "\n" not in message


def test_an_ad_hoc_question_holding_the_image_placeholder_is_refused_as_invalid():
    """It used to reach the engine and fail there, logged with a traceback as an internal error."""
    request = AskRequest(question="What is in <image>?", reply=None)

    with pytest.raises(UserError, match=r"^question: must not contain '<image>'"):
        ad_hoc_question(request)


def write_run_config(tmp_path, model, **model_settings) -> str:
    config = {
        **MINIMAL,
        "model": {"path": str(model), **model_settings},
        "camera": {"source": str(tmp_path)},
        "mqtt": {"host": "127.0.0.1", "port": 1},
        "log_level": "warning",
    }
    (tmp_path / "frame.png").write_bytes(b"")  # a folder with an image file passes the source check
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_cache_dir_that_is_a_file_stops_the_agent_with_one_line(tmp_path, tiny_llava_int8):
    cache_file = tmp_path / "cache"
    cache_file.write_text("not a directory")
    config = write_run_config(tmp_path, tiny_llava_int8, cache_dir=str(cache_file))

    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", config], capture_output=True, text=True, timeout=90
    )

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"edge-agent: error: model.cache_dir: {cache_file} is a file, not a directory"


@contextlib.contextmanager
def mounted_tmpfs(path, options: str):
    """A small tmpfs at `path` (needs root: a read-only or full directory root cannot simply be denied)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only or full tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(directory) -> None:
    """Write into `directory` until its file system has no space left."""
    with open(directory / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(bytes(4096))


@pytest.mark.parametrize("state", ["read-only", "full"])
def test_an_unwritable_cache_dir_is_one_warning_and_the_model_loads_without_it(
    tmp_path, tiny_llava_int8, caplog, state
):
    with mounted_tmpfs(tmp_path / "cache", "ro,size=64k" if state == "read-only" else "size=64k") as cache:
        if state == "full":
            fill(cache)
        config = parse_config({**MINIMAL, "model": {"path": str(tiny_llava_int8), "cache_dir": str(cache)}})

        with caplog.at_level(logging.WARNING):
            engine = load_engine(config)

    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"model.cache_dir: {cache} is not writable (")
    assert warnings[0].endswith("); loading the model without a compiled-model cache")
    assert engine.name


def test_a_cache_dir_that_can_be_made_is_made_and_used(tmp_path, tiny_llava_int8):
    cache = tmp_path / "new" / "cache"
    config = parse_config({**MINIMAL, "model": {"path": str(tiny_llava_int8), "cache_dir": str(cache)}})

    load_engine(config)

    assert cache.is_dir() and any(cache.iterdir())
