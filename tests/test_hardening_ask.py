"""Hostile ask requests: reply topics and correlation data a client controls, retained requests, NaN numbers.

A request's reply topic and correlation data come back in the agent's own publish, so a client that
chooses them well could otherwise crash the agent (a topic paho cannot encode), get it disconnected
for good (a topic the broker refuses, re-sent by paho after every reconnect), flood its log with
tracebacks or make it send back far more than it received. Every JSON the agent publishes is strict.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.engine import Engine, Prompt
from edge_agent.mqtt import AskRequest, BadRequest, parse_ask
from edge_agent.mqtt.ask import MAX_CORRELATION_BYTES, ReplyAddress, reply_message
from edge_agent.mqtt.topics import MAX_TOPIC_BYTES, answer_payload, topic_problem
from tests.support.agent import RunningAgent, agent_config, topic
from tests.support.broker import WAIT_TIMEOUT_S, answer, ask_reply, wait_until

LINK_ASK_TOPIC = "edge-agent/kitchen/ask"
"""Where a bare `AgentLink` (agent id `kitchen`, see `make_link`) takes requests."""
CLIENT_LOGGER = "edge_agent.mqtt.client"


def strict_json(text: bytes | str) -> object:
    """Parse like a strict JSON parser: NaN, Infinity and -Infinity are not JSON."""

    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def v5_properties(response_topic: str, correlation: bytes | None = None) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = response_topic
    if correlation is not None:
        properties.CorrelationData = correlation
    return properties


def ask_json(reply_to: str, correlation_json: str | None = None, question: str = "Is the door open?") -> bytes:
    """A request with the MQTT 3.1.1 reply fields; the correlation id is raw JSON text, sent as written."""
    fields = json.dumps({"question": question, "reply_to": reply_to})
    if correlation_json is None:
        return fields.encode()
    return f'{fields[:-1]}, "correlation_id": {correlation_json}}}'.encode()


class EchoLink:
    """A started `AgentLink` whose service answers every question at once, as the agent's loop would."""

    def __init__(self, make_link, broker, **settings):
        self.handed_over: list[AskRequest] = []
        self.link = make_link(broker, on_ask=self._answer, **settings)

    def _answer(self, request: AskRequest) -> None:
        self.handed_over.append(request)
        self.link.reply(request, ask_reply(request.question, f"echo: {request.question}"))


# -- the topic check ----------------------------------------------------------------------------------

REFUSED_BY_MOSQUITTO = ["\x00", "\x01", "\x1f", "\x7f", "\x85", "\ufdd0", "\ufffe", "\U0001ffff"]
"""Characters that make mosquitto (2.0) drop the publishing client for a protocol error (tried one by one)."""


@pytest.mark.parametrize(
    "bad_topic",
    [
        "",
        "a/+/b",
        "a/#",
        "bad/reply/\ud800",
        "x" * (MAX_TOPIC_BYTES + 1),
        "\u00e9" * (MAX_TOPIC_BYTES // 2 + 1),
        *(f"bad/{character}/reply" for character in REFUSED_BY_MOSQUITTO),
    ],
    ids=lambda text: ascii(text)[:30],
)
def test_the_topic_check_names_the_problem_of_a_topic_that_cannot_be_published_to(bad_topic):
    problem = topic_problem(bad_topic)

    assert problem and "\n" not in problem and len(problem) < 100


@pytest.mark.parametrize(
    "good_topic",
    ["a", "me/reply/1", "/", "a//b", "$app/reply", "caf\u00e9/\u2603/\U0001f642", "x" * MAX_TOPIC_BYTES],
    ids=lambda text: ascii(text)[:30],
)
def test_the_topic_check_accepts_topics_the_broker_takes(good_topic):
    assert topic_problem(good_topic) is None


topic_texts = st.text(st.characters(codec=None), max_size=40) | st.text(
    st.sampled_from(
        [
            "a",
            "/",
            "+",
            "#",
            "\x00",
            "\x1f",
            "\x7f",
            "\x9f",
            "\ud800",
            "\udfff",
            "\ufdd0",
            "\uffff",
            "\U0010fffe",
            "\u00e9",
            "$",
        ]
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(candidate=topic_texts)
def test_any_topic_the_check_accepts_is_encodable_bounded_and_has_no_wildcard_or_forbidden_character(candidate):
    if topic_problem(candidate) is not None:
        return
    encoded = candidate.encode("utf-8")
    assert 0 < len(encoded) <= MAX_TOPIC_BYTES
    assert not any(character in candidate for character in "+#")
    assert not any(character in candidate for character in REFUSED_BY_MOSQUITTO)
    assert all(not (ord(c) <= 0x1F or 0x7F <= ord(c) <= 0x9F or (ord(c) & 0xFFFE) == 0xFFFE) for c in candidate)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(candidate=topic_texts.filter(lambda text: topic_problem(text) is None))
def test_mosquitto_delivers_every_topic_the_check_accepts_and_keeps_the_publisher_connected(
    broker, subscriber, candidate
):
    probe_topic = f"probe/{candidate}"  # under a first level of its own: '#' does not match a '$...' topic
    received = subscriber(broker, "probe/#")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(probe_topic, b"probe", qos=1).wait_for_publish(WAIT_TIMEOUT_S)
        assert received.next(probe_topic).payload == b"probe"
        assert client.is_connected()
    finally:
        client.disconnect()
        client.loop_stop()


# -- reply addresses and correlation data in the parser ------------------------------------------------


@pytest.mark.parametrize(
    "bad_reply_to",
    ["bad/reply/\ud800", "bad/\x00/reply", "bad/\x01/reply", "x" * 5000],
    ids=["lone-surrogate", "nul", "control", "too-long"],
)
def test_a_request_whose_reply_topic_cannot_be_published_to_is_refused_without_a_reply_address(bad_reply_to):
    for payload, properties in [
        (ask_json(bad_reply_to), None),
        (ask_json("ignored"), v5_properties(bad_reply_to, b"c-1")),
    ]:
        with pytest.raises(BadRequest, match="reply") as refused:
            parse_ask(payload, properties)

        assert refused.value.reply is None


@pytest.mark.parametrize(
    "correlation_json",
    [
        '{"k": [1, 2]}',
        "[1, 2.5, null, true]",
        "42",
        "-0.5",
        '"plain"',
        '"\\ud800 lone surrogate"',
        '"\\u0000"',
    ],
)
def test_a_json_correlation_id_is_echoed_as_the_same_json_value(correlation_json):
    request = parse_ask(ask_json("me/reply/1", correlation_json), None)

    body, properties = reply_message(request.reply, ask_reply())

    assert strict_json(body)["correlation_id"] == json.loads(correlation_json)
    assert not hasattr(properties, "CorrelationData")


def test_mqtt5_correlation_data_is_echoed_as_bytes_and_as_json_text_only_when_it_is_utf8():
    for correlation, as_text in [(b"c-1", "c-1"), ("caf\u00e9".encode(), "caf\u00e9"), (b"\xff\x00\xfe", None)]:
        request = parse_ask(ask_json("ignored"), v5_properties("me/reply", correlation))

        body, properties = reply_message(request.reply, ask_reply())

        assert properties.CorrelationData == correlation
        assert strict_json(body).get("correlation_id") == as_text


@pytest.mark.parametrize(
    "payload, properties",
    [
        (ask_json("me/reply"), v5_properties("me/reply", b"x" * 60 * 1024)),
        (ask_json("me/reply", json.dumps("x" * 10 * 1024)), None),
        (ask_json("me/reply", json.dumps([["x" * 100] * 10] * 10)), None),
    ],
    ids=["mqtt5", "json-string", "json-list"],
)
def test_correlation_data_over_the_bound_is_refused_with_a_reply_that_does_not_echo_it(payload, properties):
    with pytest.raises(BadRequest, match=f"correlation data longer than {MAX_CORRELATION_BYTES} bytes") as refused:
        parse_ask(payload, properties)

    body, reply_properties = reply_message(refused.value.reply, refused.value.refusal)
    assert refused.value.reply.topic == "me/reply"
    assert len(body) < 200 and not hasattr(reply_properties, "CorrelationData")


@pytest.mark.parametrize("correlation_json", ["NaN", "Infinity", "[-Infinity]", "1e400"])
def test_a_correlation_id_that_is_not_strict_json_is_refused_with_a_reply_that_does_not_echo_it(correlation_json):
    with pytest.raises(BadRequest, match="'correlation_id'") as refused:
        parse_ask(ask_json("me/reply", correlation_json), None)

    body, _ = reply_message(refused.value.reply, refused.value.refusal)
    assert "correlation_id" not in strict_json(body)


@pytest.mark.parametrize(
    "fields",
    [
        {"question": "Door \ud800?"},
        {"question": "Door?", "type": "\udfff"},
        {"question": "Door?", "options": ["a\ud800"]},
    ],
    ids=["question", "type", "options"],
)
def test_text_with_a_lone_surrogate_is_refused_before_it_reaches_the_engine(fields):
    with pytest.raises(BadRequest, match="not valid UTF-8") as refused:
        parse_ask(json.dumps({**fields, "reply_to": "me/reply"}).encode(), None)

    assert refused.value.reply == ReplyAddress("me/reply")


@pytest.mark.parametrize(
    "payload",
    [
        ask_json("me/reply", "[" * 5000 + "]" * 5000),
        ask_json("me/reply", "1" * 5000),
        b"[" * 10000,
    ],
    ids=["deep-nesting", "huge-integer", "deep-request"],
)
def test_json_the_parser_cannot_hold_is_refused_as_invalid(payload):
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_ask(payload, None)


correlation_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(codec=None), max_size=400),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(
    reply_to=topic_texts | st.just("me/reply/1"),
    correlation=correlation_values,
    v5_correlation=st.none() | st.binary(max_size=600),
    use_properties=st.booleans(),
)
def test_a_request_is_answered_only_at_a_publishable_topic_with_bounded_strict_json_correlation(
    reply_to, correlation, v5_correlation, use_properties
):
    payload = json.dumps({"question": "Door?", "reply_to": reply_to, "correlation_id": correlation}).encode()
    properties = v5_properties(reply_to, v5_correlation) if use_properties else None
    try:
        reply = parse_ask(payload, properties).reply
    except BadRequest as refused:
        assert refused.reason and "\n" not in refused.reason
        reply = refused.reply
    if reply is None:
        return
    body, reply_properties = reply_message(reply, ask_reply("Door?", confidence=math.nan))
    echoed = strict_json(body).get("correlation_id")
    assert topic_problem(reply.topic) is None
    unechoed, _ = reply_message(ReplyAddress(reply.topic), ask_reply("Door?"))
    assert len(body) <= len(unechoed) + 30 + 6 * MAX_CORRELATION_BYTES  # the key, and every byte as \uXXXX
    assert len(getattr(reply_properties, "CorrelationData", b"")) <= MAX_CORRELATION_BYTES
    if not use_properties and echoed is not None:
        assert echoed == correlation


# -- hostile requests at a link and at the running agent ---------------------------------------------


@pytest.mark.parametrize("bad_reply_to", ["bad/\x00/reply", "bad/\x85/reply"], ids=["nul", "c1-control"])
def test_a_reply_topic_the_broker_refuses_is_never_published_and_the_agent_stays_connected(
    broker, make_link, subscriber, bad_reply_to
):
    echo = EchoLink(make_link, broker)
    watcher = subscriber(broker, "edge-agent/kitchen/availability", "asker/#")
    assert watcher.next("edge-agent/kitchen/availability").payload == b"online"

    watcher.publish(LINK_ASK_TOPIC, ask_json(bad_reply_to))
    watcher.publish(LINK_ASK_TOPIC, ask_json("asker/reply/1"))

    assert json.loads(watcher.next("asker/reply/1").payload)["answer"] == "echo: Is the door open?"
    assert [request.reply.topic for request in echo.handed_over] == ["asker/reply/1"]
    assert echo.link.connected and len(watcher.on("edge-agent/kitchen/availability")) == 1


@pytest.mark.parametrize(
    "bad_topic",
    ["bad/reply/\ud800", "bad/\x00/reply", "bad/+/reply", "x" * 70_000],
    ids=["lone-surrogate", "nul", "wildcard", "too-long-for-mqtt"],
)
def test_a_reply_to_a_topic_that_cannot_be_published_to_is_dropped_with_one_log_line(
    broker, make_link, subscriber, caplog, bad_topic
):
    link = make_link(broker)
    watcher = subscriber(broker, "#")
    request = AskRequest(question="Door?", reply=ReplyAddress(bad_topic, None))

    link.reply(request, ask_reply())
    link.reply(AskRequest(question="Door?", reply=ReplyAddress("asker/reply", None)), ask_reply())

    assert json.loads(watcher.next("asker/reply").payload) == ask_reply().fields()
    dropped = [record for record in caplog.records if "not publishing" in record.getMessage()]
    assert len(dropped) == 1 and dropped[0].exc_info is None and len(dropped[0].getMessage()) < 200
    assert link.connected


HOSTILE_CORRELATIONS = {
    "lone-surrogate": '"\\ud800"',
    "deep-nesting": "[" * 5000 + "]" * 5000,
    "huge-integer": "1" * 5000,
    "not-finite": "NaN",
    "huge-string": json.dumps("x" * 10_000),
    "object": '{"k": [1, 2]}',
}
REQUESTS_PER_REQUESTER = 5


def test_hostile_correlation_ids_never_log_a_traceback_and_the_rate_limit_comes_first(
    broker, make_link, subscriber, caplog
):
    caplog.set_level(logging.DEBUG, logger=CLIENT_LOGGER)
    echo = EchoLink(make_link, broker, ask_burst=2, ask_per_minute=1)
    requester = subscriber(broker, "hostile/#", "asker/#", protocol="3.1.1")

    for name, correlation_json in HOSTILE_CORRELATIONS.items():
        for index in range(REQUESTS_PER_REQUESTER):
            requester.publish(LINK_ASK_TOPIC, ask_json(f"hostile/{name}/{index}", correlation_json))
    requester.publish(LINK_ASK_TOPIC, ask_json("asker/reply/1", '"fine"'))

    assert json.loads(requester.next("asker/reply/1").payload)["correlation_id"] == "fine"
    client_records = [record for record in caplog.records if record.name == CLIENT_LOGGER]
    assert [record.getMessage() for record in client_records if record.exc_info] == []
    warnings = [record for record in client_records if record.levelno >= logging.WARNING]
    assert len(warnings) <= 2 * (len(HOSTILE_CORRELATIONS) + 1), "only requests within the rate are logged"
    replies = [json.loads(message.payload) for message in requester.on("hostile/object/0")]
    assert replies[0]["correlation_id"] == {"k": [1, 2]}
    assert len(echo.handed_over) == 1 + 2 + 2, "the fine request, two objects and two lone surrogates"


def test_a_retained_ask_is_answered_neither_at_start_nor_after_a_reconnect(make_broker, make_link, subscriber, caplog):
    caplog.set_level(logging.DEBUG, logger=CLIENT_LOGGER)
    broker = make_broker(persistence=True)
    requester = subscriber(broker, "asker/#")
    requester.publish(LINK_ASK_TOPIC, ask_json("asker/reply/retained"), retain=True)
    echo = EchoLink(make_link, broker)

    requester.publish(LINK_ASK_TOPIC, ask_json("asker/reply/live"))
    requester.next("asker/reply/live")
    broker.restart()
    wait_until(lambda: not echo.link.connected, what="link disconnected")
    wait_until(lambda: echo.link.connected, what="link reconnected")
    requester.close()
    requester = subscriber(broker, "asker/#")
    requester.publish(LINK_ASK_TOPIC, ask_json("asker/reply/after"))
    requester.next("asker/reply/after")

    assert [request.reply.topic for request in echo.handed_over] == ["asker/reply/live", "asker/reply/after"]
    ignored = [record.levelno for record in caplog.records if "retained ask request" in record.getMessage()]
    assert ignored == [logging.INFO, logging.DEBUG]


def test_a_lone_surrogate_in_a_reply_topic_or_question_neither_stops_the_agent_nor_logs_a_traceback(
    tiny_llava_int8, tiny_engine, broker, subscriber, static_video, caplog
):
    requester = subscriber(broker, "asker/#")
    with RunningAgent(agent_config(tiny_llava_int8, broker, static_video), engine=tiny_engine) as agent:
        wait_until(lambda: agent.metrics.inferences._value.get() >= 1, timeout=30, what="a first answer")
        requester.publish(topic("ask"), ask_json("bad/reply/\ud800"))
        requester.publish(topic("ask"), ask_json("asker/reply/surrogate", question="Door \ud800?"))
        requester.publish(topic("ask"), ask_json("asker/reply/fine"))

        reply = json.loads(requester.next("asker/reply/fine", timeout=30).payload)

    assert "answer" in reply and "error" not in reply
    assert "not valid UTF-8" in json.loads(requester.next("asker/reply/surrogate").payload)["error"]
    assert [record.getMessage() for record in caplog.records if record.exc_info] == []


# -- strict JSON everywhere ----------------------------------------------------------------------------


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_an_answer_with_a_non_finite_confidence_is_published_as_strict_json_with_null(number):
    published = strict_json(answer_payload(answer(confidence=number, latency_ms=number)))

    assert published["confidence"] is None and published["latency_ms"] is None


def test_an_ask_reply_with_non_finite_numbers_is_strict_json_with_null():
    reply = ReplyAddress("me/reply", correlation_id={"nested": [1.5]})

    body, _ = reply_message(reply, ask_reply(confidence=math.nan, latency_ms=math.inf, value=[-math.inf]))

    assert strict_json(body) == {
        **ask_reply().fields(),
        "confidence": None,
        "latency_ms": None,
        "value": [None],
        "correlation_id": {"nested": [1.5]},
    }


def test_nan_logits_give_an_option_answer_without_a_confidence():
    prompts = [Prompt("Is the door open?", options=("Yes", "No"))]
    spelled = {0: [((1,),), ((2,),)]}

    chosen = Engine._choose(prompts, spelled, np.full((1, 4), np.nan, dtype=np.float32), {})

    option, _, confidence = chosen[0]
    assert option in ("Yes", "No") and confidence is None
