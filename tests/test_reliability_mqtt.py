"""The running agent through broker faults: absent at start, stopped mid-run, restarted without its retained data.

Capturing and answering never wait for the broker. Answers made while it is away are queued (up to
`mqtt.queue_limit`, the oldest dropped and counted beyond) and delivered when it is back; availability,
the retained answers and states, the camera status and the discovery configs are published again.
(`tests/test_mqtt.py` shows the same for a bare `AgentLink`; these tests run the whole agent.)
"""

from __future__ import annotations

import json
import logging
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.agent import AGENT, QUESTIONS, RunningAgent, agent_config
from tests.support.broker import WAIT_TIMEOUT_S, wait_until

ROOT = f"edge-agent/{AGENT}"
EVERY_ANSWER = {"heartbeat_s": 0.001}
"""Publish every answer, changed or not, so the answers handed to MQTT can be counted."""


def gauge(metric) -> float:
    return metric._value.get()


class DurableSubscriber:
    """A subscriber with a persistent session: a broker with persistence keeps its subscription and its
    undelivered messages across a restart, so it misses nothing the agent published."""

    def __init__(self, broker, topic: str):
        self.answers: set[tuple[str, float]] = set()
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="durable-subscriber", clean_session=False, protocol=mqtt.MQTTv311
        )
        self._client.reconnect_delay_set(0.1, 0.5)
        self._client.on_message = self._record
        self._client.on_subscribe = lambda *args: subscribed.set()
        self._client.connect(broker.host, broker.port)
        self._client.subscribe(topic, qos=1)
        self._client.loop_start()
        assert subscribed.wait(WAIT_TIMEOUT_S), "subscription not acknowledged"

    def _record(self, client, userdata, message) -> None:
        answer = json.loads(message.payload)
        with self._lock:
            self.answers.add((answer["question_id"], answer["frame_ts"]))

    def received(self) -> int:
        """Distinct answers received (QoS 1 may deliver one twice)."""
        with self._lock:
            return len(self.answers)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def run_through_an_outage(agent, broker, answers_while_down: int) -> None:
    """Stop the broker once answers flow, wait for `answers_while_down` new answers, then start it again."""
    wait_until(lambda: gauge(agent.metrics.mqtt_connected) == 1, timeout=30, what="connected")
    wait_until(lambda: agent.metrics.answers_published._value.get() >= len(QUESTIONS), timeout=30, what="first answers")
    broker.stop()
    wait_until(lambda: gauge(agent.metrics.mqtt_connected) == 0, what="the agent noticed")
    published = agent.metrics.answers_published._value.get()
    wait_until(
        lambda: agent.metrics.answers_published._value.get() >= published + answers_while_down,
        timeout=30,
        what="answers made while the broker is down",
    )
    broker.start()
    wait_until(lambda: gauge(agent.metrics.mqtt_connected) == 1, timeout=30, what="reconnected")


def test_answers_made_while_the_broker_is_down_are_all_delivered_when_it_is_back(
    tiny_llava_int8, tiny_engine, make_broker, moving_video
):
    broker = make_broker(persistence=True)
    subscriber = DurableSubscriber(broker, f"{ROOT}/answers/#")
    config = agent_config(tiny_llava_int8, broker, moving_video, mqtt=EVERY_ANSWER)
    try:
        with RunningAgent(config, engine=tiny_engine) as agent:
            run_through_an_outage(agent, broker, answers_while_down=8)
        handed_to_mqtt = agent.metrics.answers_published._value.get()
        wait_until(lambda: subscriber.received() == handed_to_mqtt, what=f"all {handed_to_mqtt} answers")
    finally:
        subscriber.close()


def test_beyond_the_queue_limit_the_oldest_answers_are_dropped_counted_and_logged(
    tiny_llava_int8, tiny_engine, make_broker, moving_video, caplog
):
    broker = make_broker(persistence=True)
    subscriber = DurableSubscriber(broker, f"{ROOT}/answers/#")
    config = agent_config(tiny_llava_int8, broker, moving_video, mqtt={**EVERY_ANSWER, "queue_limit": 3})
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    try:
        with RunningAgent(config, engine=tiny_engine) as agent:
            run_through_an_outage(agent, broker, answers_while_down=8)
            dropped = agent._link.dropped
        handed_to_mqtt = agent.metrics.answers_published._value.get()
        wait_until(
            lambda: subscriber.received() >= handed_to_mqtt - dropped,
            what=f"{handed_to_mqtt} answers less the {dropped} dropped",
        )
    finally:
        subscriber.close()

    assert dropped >= 5
    latest_of_dropped = len(QUESTIONS)  # a dropped answer that is still its question's latest is sent anyway
    assert subscriber.received() <= handed_to_mqtt - dropped + latest_of_dropped
    assert "MQTT offline and 3 answers queued: dropping the oldest from now on" in caplog.text
    assert f"MQTT: {dropped} answers were dropped while offline" in caplog.text


def retained_topics(broker, subscriber) -> dict[str, bytes]:
    """What a client connecting now is told: every retained message of the agent and Home Assistant."""
    watcher = subscriber(broker, f"{ROOT}/#", "homeassistant/#")
    expected = [
        f"{ROOT}/availability",
        f"{ROOT}/camera",
        f"{ROOT}/discovery",
        *(f"{ROOT}/{kind}/{q['id']}" for q in QUESTIONS for kind in ("answers", "state")),
    ]
    wait_until(lambda: all(watcher.on(topic) for topic in expected), timeout=20, what=f"retained {expected}")
    return {message.topic: message.payload for message in watcher.messages if message.retain}


QUESTION_OBJECT_IDS = {f"{AGENT}_{question['id']}" for question in QUESTIONS}
"""The object ids of the questions' own entities in their discovery config topics."""
ANSWER_COMPONENTS = ("binary_sensor", "sensor")
"""The components of the questions' own entities (their switches, buttons and images are others)."""


def is_question_config(topic: str) -> bool:
    """Whether `topic` is the discovery config of a question's own entity."""
    component, object_id = topic.split("/")[1:3]
    return component in ANSWER_COMPONENTS and object_id in QUESTION_OBJECT_IDS


def assert_everything_announced(retained: dict[str, bytes]) -> None:
    assert retained[f"{ROOT}/availability"] == b"online" and retained[f"{ROOT}/camera"] == b"online"
    announced = json.loads(retained[f"{ROOT}/discovery"])
    question_configs = [topic for topic in announced if is_question_config(topic)]
    assert len(question_configs) == len(QUESTIONS)  # besides the controls, images and diagnostics
    assert all(json.loads(retained[topic]) for topic in announced)


def test_with_the_broker_absent_at_start_the_agent_answers_and_publishes_everything_once_it_comes(
    tiny_llava_int8, tiny_engine, make_broker, subscriber, moving_video
):
    broker = make_broker(start=False)
    with RunningAgent(agent_config(tiny_llava_int8, broker, moving_video), engine=tiny_engine) as agent:
        wait_until(lambda: agent.metrics.inferences._value.get() >= 2, timeout=30, what="answers without a broker")
        assert gauge(agent.metrics.mqtt_queue_depth) >= len(QUESTIONS)
        assert gauge(agent.metrics.mqtt_connected) == 0

        broker.start()

        assert_everything_announced(retained_topics(broker, subscriber))
        wait_until(lambda: gauge(agent.metrics.mqtt_queue_depth) == 0, what="the queue flushed")


def test_after_a_restart_without_persistence_the_agent_publishes_its_retained_state_again(
    tiny_llava_int8, tiny_engine, make_broker, subscriber, moving_video
):
    broker = make_broker(persistence=False)
    with RunningAgent(agent_config(tiny_llava_int8, broker, moving_video), engine=tiny_engine) as agent:
        retained_topics(broker, subscriber)
        frames = agent.metrics.frames._value.get()

        broker.restart()

        assert_everything_announced(retained_topics(broker, subscriber))
        assert agent.metrics.frames._value.get() > frames, "capture went on"
