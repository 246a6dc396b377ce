"""An MQTT 5 requester for ask tests: publishes raw ask requests and keeps each reply by correlation id."""

from __future__ import annotations

import json
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.agent import AGENT
from tests.support.broker import WAIT_TIMEOUT_S

ASK_TOPIC = f"edge-agent/{AGENT}/ask"
"""Where the test agent (tests.support.agent) takes ask requests."""


def v5_properties(response_topic: str | None, correlation: bytes | None) -> Properties | None:
    if response_topic is None:
        return None
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = response_topic
    if correlation is not None:
        properties.CorrelationData = correlation
    return properties


def ask_payload(**fields) -> bytes:
    return json.dumps(fields).encode()


class Requester:
    """Publishes raw ask requests with MQTT 5 reply properties and keeps each reply's JSON by correlation id.

    It keeps only the parsed replies (not paho's message objects), so a flood's replies barely count
    in the process's memory, which the agent shares in these tests.
    """

    def __init__(self, broker, prefix: str):
        self.prefix = prefix
        self.replies: dict[str, dict] = {}
        subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._client.on_message = self._record
        self._client.on_subscribe = lambda *args: subscribed.set()
        self._client.connect(broker.host, broker.port)
        self._client.subscribe(f"{prefix}/#", qos=1)
        self._client.loop_start()
        assert subscribed.wait(WAIT_TIMEOUT_S), "requester not subscribed"

    def _record(self, client, userdata, message) -> None:
        self.replies[message.properties.CorrelationData.decode()] = json.loads(message.payload)

    def send(self, payload: bytes, correlation: str, requester: str = "r") -> None:
        properties = v5_properties(f"{self.prefix}/{requester}/reply", correlation.encode())
        self._client.publish(ASK_TOPIC, payload, qos=1, properties=properties).wait_for_publish(WAIT_TIMEOUT_S)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def make_requester(broker):
    opened = []

    def open_requester(prefix: str) -> Requester:
        opened.append(Requester(broker, prefix))
        return opened[-1]

    yield open_requester
    for each in opened:
        each.close()
