"""The MQTT link's connection handling against a real mosquitto: a hung broker replaced by a fresh one, a
hostile retained discovery list, and two agents sharing one agent id."""

import contextlib
import json
import logging
import socket
import threading
import time

import pytest

from edge_agent.config import MqttSettings
from edge_agent.mqtt import AgentLink, AgentTopics, EntitySpec
from tests.support.broker import answer, wait_until

TOPICS = AgentTopics("edge-agent", "kitchen")
DOOR_STATE = TOPICS.state("door_open")
DOOR = EntitySpec("door_open", "Door open", "yes_no", "door")
FOREIGN_CONFIG = "homeassistant/sensor/hall_people/config"
"""Another agent's Home Assistant entity: not this agent's to remove."""


def numbered(n: int):
    """The door answer with value `n` (a different value each time, so each one is published)."""
    return answer(value=n, state=str(n), type="number", frame_ts=1_700_000_000.0 + n)


def retained(broker, subscriber, *topics: str) -> dict[str, bytes]:
    """The retained payload of each topic, as a client connecting now is told."""
    watcher = subscriber(broker, *topics)
    return {topic: watcher.next(topic).payload for topic in topics}


# --- fault 3: a hung broker replaced by a fresh one -------------------------------------------------


def test_after_a_hung_broker_is_replaced_by_a_fresh_one_the_retained_answer_state_and_camera_are_the_newest(
    make_broker, make_link, subscriber
):
    broker = make_broker(persistence=False)
    link = make_link(broker)
    link.publish_answer(numbered(0))
    link.publish_camera(True)
    subscriber(broker, DOOR_STATE).next(DOOR_STATE)

    broker.hang()
    for n in (1, 2, 3):
        link.publish_answer(numbered(n))  # handed to paho, never acknowledged
    link.publish_camera(False)
    broker.kill()
    wait_until(lambda: not link.connected, what="the link noticed")
    link.publish_answer(numbered(4))  # queued by the link
    link.publish_camera(True)
    broker.start()
    wait_until(lambda: link.connected, timeout=10, what="reconnected")
    link.publish_answer(answer("marker", value=1, state="1"))  # published after everything before it
    retained(broker, subscriber, TOPICS.state("marker"))

    newest = retained(broker, subscriber, DOOR_STATE, TOPICS.answers("door_open"), TOPICS.camera)
    assert newest[DOOR_STATE] == b"4"
    assert json.loads(newest[TOPICS.answers("door_open")])["value"] == 4
    assert newest[TOPICS.camera] == b"online"


# --- fault 4: the retained discovery list is client input ---------------------------------------------


@pytest.fixture
def make_announcing_link():
    """Like `make_link`, but the link knows its entities before it connects, so it publishes its own list
    once on connect and once more after it read the retained list (when that differs)."""
    links: list[AgentLink] = []

    def make(broker, entities: list[EntitySpec], **settings) -> AgentLink:
        links.append(AgentLink(MqttSettings(host=broker.host, port=broker.port, **settings), "kitchen"))
        links[-1].set_entities(entities)
        links[-1].start()
        return links[-1]

    yield make
    for link in links:
        link.stop()


BAD_LISTS = {
    "wildcard": json.dumps(["homeassistant/sensor/#", FOREIGN_CONFIG]).encode(),
    "non-string entries": json.dumps([1, None, {"a": 1}, ["x"], FOREIGN_CONFIG]).encode(),
    "not a list": json.dumps({FOREIGN_CONFIG: 1}).encode(),
    "a string with a wildcard": json.dumps("homeassistant/sensor/#").encode(),
    "a foreign agent's config topic": json.dumps([FOREIGN_CONFIG, "elsewhere/retained"]).encode(),
    "deeply nested": b"[" * 30_000 + b"]" * 30_000,
    "not UTF-8": b"\xff\xfe[]",
}


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("bad_list", BAD_LISTS.values(), ids=BAD_LISTS.keys())
def test_a_bad_retained_discovery_list_is_ignored_and_removes_no_foreign_topic(
    bad_list, protocol, broker, make_announcing_link, subscriber, caplog
):
    assert_a_bad_list_is_ignored(bad_list, protocol, broker, make_announcing_link, subscriber, caplog)


def test_a_huge_retained_discovery_list_is_ignored(broker, make_announcing_link, subscriber, caplog):
    huge = [FOREIGN_CONFIG] + [f"homeassistant/sensor/kitchen_q{n}/config" for n in range(5000)]
    assert_a_bad_list_is_ignored(json.dumps(huge).encode(), "3.1.1", broker, make_announcing_link, subscriber, caplog)


def assert_a_bad_list_is_ignored(payload: bytes, protocol, broker, make_announcing_link, subscriber, caplog) -> None:
    """Another client left `payload` as the agent's retained discovery list, next to another agent's entity:
    the agent warns once, removes nothing it did not announce, and after a broker restart (which loses
    every retained message) publishes its states and camera status again."""
    caplog.set_level(logging.INFO, logger="edge_agent.mqtt")
    other_client = subscriber(broker, FOREIGN_CONFIG, protocol=protocol)
    other_client.publish(FOREIGN_CONFIG, b'{"name": "People"}', retain=True)
    other_client.publish(TOPICS.discovery, payload, retain=True)
    other_client.next(FOREIGN_CONFIG)
    watcher = subscriber(broker, TOPICS.discovery, FOREIGN_CONFIG, protocol=protocol)
    own_list = json.dumps(
        [
            "homeassistant/binary_sensor/kitchen_camera_connected/config",
            "homeassistant/binary_sensor/kitchen_door_open/config",
            "homeassistant/sensor/kitchen_answer_latency/config",
        ]
    ).encode()

    link = make_announcing_link(broker, [DOOR], protocol=protocol)
    link.publish_answer(answer(value=True, state="ON"))
    link.publish_camera(True)
    wait_until(
        lambda: [m.payload for m in watcher.on(TOPICS.discovery)].count(own_list) == 2,
        what="the agent's own list, twice",
    )

    assert watcher.on(FOREIGN_CONFIG)[-1].payload == b'{"name": "People"}', "another agent's entity survives"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and TOPICS.discovery in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "error in MQTT callback" not in caplog.text

    broker.restart()

    wait_until(lambda: link.connected, timeout=10, what="reconnected")
    republished = retained(broker, subscriber, DOOR_STATE, TOPICS.camera)
    assert republished == {DOOR_STATE: b"ON", TOPICS.camera: b"online"}
    assert "error in MQTT callback" not in caplog.text


def test_a_config_topic_this_agent_announced_before_is_still_removed(broker, make_link, subscriber):
    gone = "homeassistant/sensor/kitchen_people/config"
    other_client = subscriber(broker, gone)
    other_client.publish(gone, b'{"name": "People"}', retain=True)
    other_client.publish(TOPICS.discovery, json.dumps([gone, FOREIGN_CONFIG]).encode(), retain=True)
    other_client.next(gone)

    link = make_link(broker)
    link.set_entities([DOOR])

    removal = other_client.next(gone)
    assert (removal.payload, removal.retain) == (b"", True)


# --- fault 6: two agents with one agent id ------------------------------------------------------------

CLASH_WINDOW_S = 12.0


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_two_agents_with_one_agent_id_back_off_and_say_why_instead_of_fighting(
    protocol, broker, make_link, subscriber, caplog
):
    caplog.set_level(logging.INFO, logger="edge_agent.mqtt")
    watcher = subscriber(broker, TOPICS.availability)
    first = make_link(broker, protocol=protocol)
    second = make_link(broker, protocol=protocol, connected=False)

    time.sleep(CLASH_WINDOW_S)

    connects = [r for r in caplog.records if r.getMessage().startswith("MQTT connected to")]
    assert len(connects) <= 6, f"{len(connects)} connects in {CLASH_WINDOW_S} s"
    assert len(watcher.on(TOPICS.availability)) <= 12
    assert "another client connected with client id edge-agent-kitchen (two agents with agent_id kitchen?)" in (
        caplog.text
    )
    assert "set agent_id or mqtt.client_id uniquely; backing off" in caplog.text
    for link in (first, second):
        started = time.monotonic()
        link.stop()
        assert time.monotonic() - started < 3, "stop() does not wait for the backoff"


class TakingOverBroker:
    """A stand-in for an MQTT 5 broker that hands the client id to another client right after each connect
    (DISCONNECT with reason code 142, "Session taken over"). mosquitto 2.0.11, the broker here, does not send
    it: it just closes the old connection."""

    CONNACK = bytes([0x20, 3, 0, 0, 0])
    SESSION_TAKEN_OVER = bytes([0xE0, 2, 142, 0])

    def __init__(self):
        self.host = "127.0.0.1"
        self._server = socket.create_server((self.host, 0))
        self.port = self._server.getsockname()[1]
        self.connects = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self._server.accept()
                with connection:
                    connection.recv(65536)  # the CONNECT packet
                    self.connects += 1
                    connection.sendall(self.CONNACK)
                    time.sleep(0.2)
                    connection.sendall(self.SESSION_TAKEN_OVER)

    def close(self) -> None:
        self._server.close()


def test_an_mqtt5_session_taken_over_is_named_and_backed_off_at_once(make_link, caplog):
    caplog.set_level(logging.INFO, logger="edge_agent.mqtt")
    broker = TakingOverBroker()
    try:
        link = make_link(broker, connected=False)
        wait_until(lambda: "backing off" in caplog.text, what="the clash logged")
        time.sleep(3)

        assert broker.connects == 1, "no reconnect during the backoff"
        assert (
            "MQTT: another client connected with client id edge-agent-kitchen (two agents with agent_id kitchen?); "
            "set agent_id or mqtt.client_id uniquely; backing off 10 s"
        ) in caplog.text
        started = time.monotonic()
        link.stop()
        assert time.monotonic() - started < 3, "stop() does not wait for the backoff"
    finally:
        broker.close()


# --- Home Assistant's status topic is client input too ------------------------------------------------


def test_a_flood_of_home_assistant_online_messages_resends_discovery_and_states_a_bounded_number_of_times(
    make_broker, make_announcing_link, subscriber
):
    broker = make_broker()
    link = make_announcing_link(broker, [DOOR])
    wait_until(lambda: link.connected, what="link connected")
    link.publish_answer(numbered(1))
    watcher = subscriber(broker, DOOR_STATE, "homeassistant/binary_sensor/kitchen_door_open/config")
    watcher.next(DOOR_STATE)
    for _ in range(200):
        watcher.publish("homeassistant/status", "online")
    time.sleep(3)

    states = len(watcher.on(DOOR_STATE))
    assert states <= 3, f"{states} copies of one state for 200 'online' messages"
    assert link.connected
