"""The agent's MQTT link against a real mosquitto: retained answers, availability, the offline queue."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from edge_agent.config import MqttSettings, parse_config
from edge_agent.errors import UserError
from edge_agent.mqtt import AgentLink, AgentTopics, EntitySpec
from tests.support.broker import answer, wait_until

TOPICS = AgentTopics("edge-agent", "kitchen")
DOOR_STATE = TOPICS.state("door_open")


def test_an_answer_is_published_retained_as_json_and_as_a_plain_state(broker, make_link, subscriber):
    link = make_link(broker)
    watcher = subscriber(broker, "edge-agent/kitchen/#")

    link.publish_answer(answer(value=True, state="ON"))

    published = watcher.next(TOPICS.answers("door_open"))
    assert published.retain
    assert json.loads(published.payload) == {
        "question_id": "door_open",
        "question": "Is the door open?",
        "type": "yes_no",
        "value": True,
        "raw": "Yes",
        "frame_ts": 1_700_000_000.0,
        "answered_ts": 1_700_000_000.5,
        "latency_ms": 500.0,
        "model": "tiny-llava",
        "scene_changed": True,
        "confidence": None,
        "latest_value": True,
        "pending": None,
    }
    state = watcher.next(DOOR_STATE)
    assert (state.payload, state.retain) == (b"ON", True)


def test_a_long_text_state_is_cut_to_what_home_assistant_accepts(broker, make_link, subscriber):
    link = make_link(broker)
    watcher = subscriber(broker, TOPICS.state("scene"))

    link.publish_answer(answer("scene", value="x" * 300, state="x" * 300, type="text"))

    assert watcher.next(TOPICS.state("scene")).payload == b"x" * 255


def test_an_unchanged_answer_is_not_published_again(broker, make_link, subscriber):
    link = make_link(broker)
    watcher = subscriber(broker, DOOR_STATE)

    link.publish_answer(answer(value=True, state="ON"))
    link.publish_answer(answer(value=True, state="ON", answered_ts=1_700_000_009.0))
    link.publish_answer(answer(value=False, state="OFF"))

    assert [watcher.next(DOOR_STATE).payload for _ in range(2)] == [b"ON", b"OFF"]
    assert len(watcher.on(DOOR_STATE)) == 2, "messages of one client arrive in order: no duplicate came"


def test_an_unchanged_answer_is_published_again_when_the_heartbeat_is_due(broker, make_link, subscriber):
    link = make_link(broker, heartbeat_s=0.3)
    watcher = subscriber(broker, "edge-agent/kitchen/state/#")
    link.publish_answer(answer(value=True, state="ON"))
    watcher.next(DOOR_STATE)

    link.publish_answer(answer(value=True, state="ON"))
    link.publish_answer(answer("marker", value=1, state="1"))
    watcher.next(TOPICS.state("marker"))
    assert len(watcher.on(DOOR_STATE)) == 1, "not yet due"

    time.sleep(0.35)
    link.publish_answer(answer(value=True, state="ON"))
    assert watcher.next(DOOR_STATE).payload == b"ON"


def test_availability_is_online_while_connected_and_offline_after_a_clean_stop(broker, make_link, subscriber):
    link = make_link(broker)
    watcher = subscriber(broker, TOPICS.availability)
    online = watcher.next(TOPICS.availability)
    assert (online.payload, online.retain) == (b"online", True)

    link.stop()

    offline = watcher.next(TOPICS.availability)
    assert (offline.payload, offline.retain) == (b"offline", True)
    assert not link.connected


def test_the_last_will_says_offline_when_the_agent_dies(broker, subscriber):
    watcher = subscriber(broker, TOPICS.availability)
    agent = subprocess.Popen(
        [sys.executable, "-c", _agent_script(broker.port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    try:
        assert agent.stdout.readline().strip() == "connected"
        assert watcher.next(TOPICS.availability).payload == b"online"

        agent.send_signal(signal.SIGKILL)

        will = watcher.next(TOPICS.availability)
        assert (will.payload, will.retain) == (b"offline", True)
    finally:
        agent.kill()
        agent.wait()


def _agent_script(port: int) -> str:
    return textwrap.dedent(
        f"""
        import time
        from edge_agent.config import MqttSettings
        from edge_agent.mqtt import AgentLink
        link = AgentLink(MqttSettings(host="127.0.0.1", port={port}), "kitchen")
        link.start()
        while not link.connected:
            time.sleep(0.02)
        print("connected", flush=True)
        time.sleep(30)
        """
    )


def test_answers_made_before_the_broker_is_up_are_delivered_when_it_comes(make_broker, make_link, subscriber):
    broker = make_broker(start=False)
    link = make_link(broker, connected=False)
    link.publish_answer(answer(value=True, state="ON"))
    link.publish_answer(answer("people", value=2, state="2", type="number"))
    assert (link.connected, link.queued) == (False, 2)

    broker.start()
    wait_until(lambda: link.connected, what="connected after the broker started")

    watcher = subscriber(broker, "edge-agent/kitchen/state/#")
    assert watcher.next(DOOR_STATE).payload == b"ON"
    assert watcher.next(TOPICS.state("people")).payload == b"2"
    assert link.queued == 0


def test_the_offline_queue_drops_and_counts_the_oldest_answers(make_broker, make_link, subscriber):
    broker = make_broker(start=False)
    link = make_link(broker, connected=False, queue_limit=2)
    for value, state in [(True, "ON"), (False, "OFF"), (True, "ON")]:
        link.publish_answer(answer(value=value, state=state))
    assert (link.queued, link.dropped) == (2, 1)

    broker.start()
    watcher = subscriber(broker, "edge-agent/kitchen/state/#")
    wait_until(lambda: link.connected, what="connected after the broker started")

    assert [watcher.next(DOOR_STATE).payload for _ in range(2)] == [b"OFF", b"ON"]
    link.publish_answer(answer("marker", value=1, state="1"))
    watcher.next(TOPICS.state("marker"))
    assert len(watcher.on(DOOR_STATE)) == 2, "the latest answer was the last queued one: not sent twice"


def test_after_the_broker_lost_its_retained_messages_the_link_publishes_them_again(broker, make_link, subscriber):
    link = make_link(broker)
    link.set_entities([EntitySpec("door_open", "Door open", "yes_no", "door")])
    link.publish_answer(answer(value=True, state="ON"))
    link.publish_camera(True)
    subscriber(broker, DOOR_STATE).next(DOOR_STATE)

    broker.restart()

    watcher = subscriber(broker, "edge-agent/kitchen/#", "homeassistant/#")
    assert watcher.next(DOOR_STATE, timeout=8).payload == b"ON"
    assert watcher.next(TOPICS.availability).payload == b"online"
    assert watcher.next(TOPICS.camera).payload == b"online"
    assert watcher.next("homeassistant/binary_sensor/kitchen_door_open/config").payload


def test_answers_made_around_a_broker_restart_arrive_after_it(make_broker, make_link, subscriber):
    broker = make_broker(persistence=True)
    link = make_link(broker)
    link.publish_answer(answer(value=True, state="ON"))
    subscriber(broker, DOOR_STATE).next(DOOR_STATE)

    broker.restart()
    link.publish_answer(answer(value=False, state="OFF"))

    watcher = subscriber(broker, DOOR_STATE)
    assert watcher.next(DOOR_STATE).payload == b"ON", "kept by the broker across its restart"
    assert watcher.next(DOOR_STATE).payload == b"OFF"


def test_the_camera_status_is_retained(broker, make_link, subscriber):
    link = make_link(broker)
    link.publish_camera(False)
    link.publish_answer(answer())
    subscriber(broker, DOOR_STATE).next(DOOR_STATE)

    status = subscriber(broker, TOPICS.camera).next(TOPICS.camera)

    assert (status.payload, status.retain) == (b"offline", True)


def test_the_settings_hold_the_password_file_never_the_password(tmp_path):
    (tmp_path / "password").write_text("s3cret\n")
    settings = MqttSettings(username="agent", password_file=str(tmp_path / "password"))

    assert "s3cret" not in repr(settings)
    assert settings.password() == "s3cret"


@pytest.mark.parametrize(
    "settings, key",
    [
        (dict(protocol="4"), "mqtt.protocol"),
        (dict(qos=3), "mqtt.qos"),
        (dict(queue_limit=0), "mqtt.queue_limit"),
        (dict(discovery_prefix="home/#"), "mqtt.discovery_prefix"),
    ],
)
def test_invalid_settings_are_user_errors_naming_the_key(settings, key):
    with pytest.raises(UserError, match=key):
        parse_config({"model": {"path": "models/llava"}, "mqtt": settings})


def test_a_missing_tls_ca_file_is_a_user_error(tmp_path):
    missing = tmp_path / "ca.pem"
    with pytest.raises(UserError, match=f"mqtt.tls_ca_file {missing}"):
        AgentLink(MqttSettings(tls_ca_file=str(missing)), "kitchen")


def test_a_base_topic_with_a_wildcard_is_a_user_error():
    with pytest.raises(UserError, match="mqtt.base_topic"):
        AgentTopics("edge-agent/#", "kitchen")
