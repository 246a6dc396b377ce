"""A real mosquitto broker on a free loopback port, and a subscriber that records what it receives.

Fixtures:
- `broker`: a running broker without persistence.
- `make_broker(persistence=False, start=True)`: more brokers, or one that starts later (to test a
  client that comes up before its broker); each can `stop()`, `start()`, `restart()`, `hang()` and `kill()` on its port.
- `subscriber(broker, *topics, protocol="5")`: a `Subscriber` recording every message, closed at
  teardown.
- `make_link(broker, agent_id="kitchen", on_ask=None, connected=True, **settings)`: a started
  `AgentLink` (by default already connected), stopped at teardown.
Helpers: `answer(...)` builds an `AnswerMessage`, `ask_reply(...)` an `AskReply`, `wait_until(condition)`
polls with a deadline.
"""

from __future__ import annotations

import getpass
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.config import MqttSettings
from edge_agent.devtools.loopback import free_port
from edge_agent.mqtt import AgentLink, AnswerMessage
from edge_agent.mqtt.ask import AskReply

MOSQUITTO = "/usr/sbin/mosquitto"
READY_TIMEOUT_S = 5.0
WAIT_TIMEOUT_S = 5.0


def wait_until(condition, timeout: float = WAIT_TIMEOUT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.02)


def answer(question_id: str = "door_open", value: object = True, state: str = "ON", **fields) -> AnswerMessage:
    """An answer as the service would publish it; override any field by keyword."""
    defaults = dict(
        question_id=question_id,
        question="Is the door open?",
        type="yes_no",
        value=value,
        raw="Yes",
        state=state,
        frame_ts=1_700_000_000.0,
        answered_ts=1_700_000_000.5,
        latency_ms=500.0,
        model="tiny-llava",
        scene_changed=True,
        latest_value=value,
    )
    return AnswerMessage(**{**defaults, **fields})


def ask_reply(question: str = "Is the door open?", answer: str = "Yes", **fields) -> AskReply:
    """An ask reply as the service would send it (a free-text answer); override any field by keyword."""
    defaults = dict(
        type="text",
        value=answer,
        confidence=None,
        frame_ts=1_700_000_000.0,
        answered_ts=1_700_000_000.5,
        latency_ms=500.0,
        model="tiny-llava",
    )
    return AskReply(question=question, answer=answer, **{**defaults, **fields})


class Broker:
    """One mosquitto process with its own config, log and (optional) persistence file in `workdir`."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, persistence: bool):
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            f"persistence {'true' if persistence else 'false'}\n"
            f"persistence_location {workdir}/\n"
            f"log_dest file {workdir}/mosquitto.log\n"
            f"user {getpass.getuser()}\n"
        )
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self._process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)])
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._accepts_connections():
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start: see {self.workdir}/mosquitto.log")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop cleanly (SIGTERM): with persistence on, retained messages are saved."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def hang(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open, nothing is read or acknowledged."""
        self._process.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL, also when hung): nothing is saved, its connections break."""
        self._process.kill()
        self._process.wait()
        self._process = None

    def _accepts_connections(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=0.2).close()
            return True
        except OSError:
            return False


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    properties: Properties | None


class Subscriber:
    """A plain paho client that records every message on its topics, with the publisher's retain flag."""

    def __init__(self, host: str, port: int, topics: tuple[str, ...], protocol: str = "5"):
        self.messages: list[Received] = []
        self._seen: dict[str, int] = {}
        self._changed = threading.Condition(threading.RLock())
        self._subscribed = threading.Event()
        v5 = protocol == "5"
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        self._client.on_message = self._record
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.connect(host, port)
        options = SubscribeOptions(qos=1, retainAsPublished=True) if v5 else 1
        self._client.subscribe([(topic, options) for topic in topics])
        self._client.loop_start()
        assert self._subscribed.wait(WAIT_TIMEOUT_S), "subscription not acknowledged"

    def _record(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        received = Received(message.topic, message.payload, bool(message.retain), getattr(message, "properties", None))
        with self._changed:
            self.messages.append(received)
            self._changed.notify_all()

    def on(self, topic: str) -> list[Received]:
        """Every message received so far on `topic`."""
        with self._changed:
            return [m for m in self.messages if m.topic == topic]

    def next(self, topic: str, timeout: float = WAIT_TIMEOUT_S) -> Received:
        """The next message on `topic` not yet returned by `next`."""
        with self._changed:
            index = self._seen.get(topic, 0)
            if not self._changed.wait_for(lambda: len(self.on(topic)) > index, timeout):
                raise AssertionError(f"nothing (more) on {topic} within {timeout} s")
            self._seen[topic] = index + 1
            return self.on(topic)[index]

    def publish(self, topic: str, payload: bytes | str, retain: bool = False, properties=None) -> None:
        self._client.publish(topic, payload, qos=1, retain=retain, properties=properties).wait_for_publish(
            WAIT_TIMEOUT_S
        )

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def make_broker(tmp_path_factory):
    brokers: list[Broker] = []

    def make(persistence: bool = False, start: bool = True) -> Broker:
        broker = Broker(tmp_path_factory.mktemp("mosquitto"), persistence)
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def broker(make_broker) -> Broker:
    return make_broker()


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory) -> Broker:
    """One broker for a module's tests that share one running agent (started once: a model load is slow)."""
    broker = Broker(tmp_path_factory.mktemp("mosquitto"), persistence=False)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def subscriber():
    subscribers: list[Subscriber] = []

    def subscribe(broker: Broker, *topics: str, protocol: str = "5") -> Subscriber:
        subscribers.append(Subscriber(broker.host, broker.port, topics, protocol))
        return subscribers[-1]

    yield subscribe
    for each in subscribers:
        each.close()


@pytest.fixture
def make_link():
    links: list[AgentLink] = []

    def make(broker: Broker, agent_id: str = "kitchen", on_ask=None, connected: bool = True, **settings) -> AgentLink:
        settings = MqttSettings(host=broker.host, port=broker.port, **settings)
        link = AgentLink(settings, agent_id, on_ask, model_name="tiny-llava")
        links.append(link)
        link.start()
        if connected:
            wait_until(lambda: link.connected, what="link connected")
        return link

    yield make
    for link in links:
        link.stop()
