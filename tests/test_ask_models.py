"""The ask protocol's models: the reply and refusal on the wire, the refusal reasons, and how they are counted."""

from __future__ import annotations

import json
import math
import re
import threading
import urllib.request

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import parse_config
from edge_agent.devtools.loopback import free_port
from edge_agent.metrics import Metrics
from edge_agent.mqtt.ask import ANSWERED, ASK_RESULTS, AskRefusal, AskReply, Refusal, ReplyAddress, reply_message
from edge_agent.service import ASK_QUESTION_TOKEN_LIMIT, ASK_QUEUE_LIMIT, Agent
from tests.support.agent import AGENT, RunningAgent, agent_config
from tests.support.broker import wait_until
from tests.test_fuzz import EngineFailingOn

ASK_TOPIC = f"edge-agent/{AGENT}/ask"
AVAILABILITY = f"edge-agent/{AGENT}/availability"

# -- the wire format --------------------------------------------------------------------------------

REPLY = AskReply(
    question="Is the door open?",
    answer="Yes",
    type="yes_no",
    value=True,
    confidence=0.875,
    frame_ts=1700000000.25,
    answered_ts=1700000000.5,
    latency_ms=250.0,
    model="tiny-llava",
)
REPLY_JSON = (
    b'{"question": "Is the door open?", "answer": "Yes", "type": "yes_no", "value": true, '
    b'"confidence": 0.875, "frame_ts": 1700000000.25, "answered_ts": 1700000000.5, "latency_ms": 250.0, '
    b'"model": "tiny-llava"'
)
NAN_REPLY = AskReply(**{**REPLY.fields(), "value": None, "confidence": math.nan})
NAN_REPLY_JSON = REPLY_JSON.replace(b'"value": true, "confidence": 0.875', b'"value": null, "confidence": null')
REFUSAL = AskRefusal(Refusal.BUSY, "busy: too many questions waiting, try again later")
REFUSAL_JSON = b'{"error": "busy: too many questions waiting, try again later"'

ADDRESSES = {
    "mqtt5-utf8": (ReplyAddress("me/reply/1", correlation=b"c-1"), b', "correlation_id": "c-1"}'),
    "mqtt5-binary": (ReplyAddress("me/reply/1", correlation=b"\xff\x00"), b"}"),
    "mqtt311-json-id": (
        ReplyAddress("me/reply/1", correlation_id={"k": [1, 2.5]}),
        b', "correlation_id": {"k": [1, 2.5]}}',
    ),
    "mqtt311-no-id": (ReplyAddress("me/reply/1"), b"}"),
}
"""Each reply address and how the id it carries ends the reply JSON (the bytes the agent sent before the
models existed, recorded from `reply_message` called with the service's dicts)."""


@pytest.mark.parametrize(
    "message, start",
    [(REPLY, REPLY_JSON), (NAN_REPLY, NAN_REPLY_JSON), (REFUSAL, REFUSAL_JSON)],
    ids=["answer", "answer-with-nan", "refusal"],
)
@pytest.mark.parametrize("address", ADDRESSES)
def test_an_answer_and_a_refusal_are_the_same_bytes_on_the_wire_as_before(message, start, address):
    reply, end = ADDRESSES[address]

    body, properties = reply_message(reply, message)

    assert body == start + end
    assert getattr(properties, "CorrelationData", None) == reply.correlation


def test_a_refusal_is_built_only_from_a_refusal_reason_and_its_detail_is_one_line():
    with pytest.raises(TypeError, match="must be a Refusal, got 'busy'"):
        AskRefusal("busy", "busy: too many questions waiting")

    refusal = AskRefusal(Refusal.INVALID, "type: must be one of\nyes_no, text\r\n")

    assert refusal.fields() == {"error": "type: must be one of yes_no, text"}


# -- the metric --------------------------------------------------------------------------------------


def test_every_ask_result_is_a_metrics_label_showing_zero_before_any_request():
    metrics = Metrics()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics.serve('127.0.0.1:0')}/metrics", timeout=5) as page:
            text = page.read().decode()
    finally:
        metrics.stop()

    assert ASK_RESULTS == (ANSWERED, *(refusal.value for refusal in Refusal))
    assert set(ASK_RESULTS) == {"answered", "invalid", "rate_limited", "busy", "no_frame", "too_long", "failed"}
    for result in ASK_RESULTS:
        assert f'edge_agent_ask_requests_total{{result="{result}"}} 0.0' in text.splitlines()


# -- every refusal the agent makes, counted by its reason --------------------------------------------


def request(question: str, requester: str, **fields) -> bytes:
    return json.dumps({"question": question, "reply_to": f"asker/{requester}/reply", **fields}).encode()


def mqtt5_reply_to(requester: str) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = f"asker/{requester}/reply"
    return properties


def ask_counts(agent: Agent) -> dict[str, float]:
    return {result: agent.metrics.ask_requests.labels(result=result)._value.get() for result in ASK_RESULTS}


def refuse_without_a_frame(config: dict, engine, asker) -> dict[str, float]:
    """Asks the loop cannot take: a full queue (`busy`), then no camera frame (`no_frame`); and the link's
    own refusals: an invalid request with and without a reply address, and a requester over its rate."""
    agent = Agent(parse_config(config), engine=engine)
    agent.start()
    loop = threading.Thread(target=agent.run, daemon=True)
    try:
        assert asker.next(AVAILABILITY).payload == b"online", "the agent subscribes before it says online"
        for index in range(ASK_QUEUE_LIMIT + 1):  # the loop does not run yet: the queue fills
            asker.publish(ASK_TOPIC, request("Is the door open?", f"waiting-{index}"))
        assert json.loads(asker.next(f"asker/waiting-{ASK_QUEUE_LIMIT}/reply").payload)["error"].startswith("busy:")
        asker.publish(ASK_TOPIC, request("Again?", "waiting-0"))
        asker.publish(ASK_TOPIC, b'{"question": "Is the', properties=mqtt5_reply_to("truncated"))
        asker.publish(ASK_TOPIC, b'{"question": "Where do I reply?"}')
        assert json.loads(asker.next("asker/waiting-0/reply").payload)["error"].startswith("rate limit:")
        assert json.loads(asker.next("asker/truncated/reply").payload) == {"error": "request is not valid JSON"}
        loop.start()
        for index in range(ASK_QUEUE_LIMIT):
            assert json.loads(asker.next(f"asker/waiting-{index}/reply").payload) == {"error": "no camera frame yet"}
        wait_until(lambda: ask_counts(agent)[Refusal.INVALID.value] == 2, what="the request without a reply counted")
        return ask_counts(agent)
    finally:
        agent.stop()
        if loop.is_alive():
            loop.join(timeout=30)
        agent.shutdown()


def refuse_on_a_scene(config: dict, engine, asker) -> dict[str, float]:
    """Asks the loop refuses once it has a scene: an unknown type (`invalid`), a question and an option with
    too many tokens (`too_long`), and one the engine fails on (`failed`); and one it answers."""
    with RunningAgent(config, engine=EngineFailingOn(engine, "Explode?")) as agent:
        wait_until(lambda: agent.metrics.inferences._value.get() >= 1, timeout=30, what="a first answer")
        asker.publish(ASK_TOPIC, request("Door?", "typed", type="multi"))
        asker.publish(ASK_TOPIC, request("\U0001f642" * 125, "long-question"))
        asker.publish(ASK_TOPIC, request("Which?", "long-option", type="choice", options=["a", "\U0001f642" * 40]))
        asker.publish(ASK_TOPIC, request("Explode?", "failing"))
        asker.publish(ASK_TOPIC, request("Is the door open?", "fine", type="yes_no"))
        assert json.loads(asker.next("asker/typed/reply").payload)["error"].startswith("type: must be one of")
        assert (
            f"more than {ASK_QUESTION_TOKEN_LIMIT}"
            in json.loads(asker.next("asker/long-question/reply").payload)["error"]
        )
        assert re.match(
            r"options\[1\]: is \d+ tokens long", json.loads(asker.next("asker/long-option/reply").payload)["error"]
        )
        assert json.loads(asker.next("asker/failing/reply").payload)["error"].startswith("internal error:")
        answered = json.loads(asker.next("asker/fine/reply").payload)
        assert list(answered) == list(REPLY.fields())
        return ask_counts(agent)


def test_every_refused_ask_is_counted_under_its_reason_and_every_reason_is_reachable(
    tiny_llava_int8, tiny_engine, broker, subscriber, static_video
):
    asker = subscriber(broker, "asker/#", AVAILABILITY)
    no_camera = f"http://127.0.0.1:{free_port()}/video.mjpg"
    without_frame = refuse_without_a_frame(
        agent_config(tiny_llava_int8, broker, no_camera, mqtt={"ask_burst": 1, "ask_per_minute": 1}), tiny_engine, asker
    )
    on_a_scene = refuse_on_a_scene(agent_config(tiny_llava_int8, broker, static_video), tiny_engine, asker)

    assert without_frame == {
        **dict.fromkeys(ASK_RESULTS, 0),
        "busy": 1,
        "no_frame": ASK_QUEUE_LIMIT,
        "rate_limited": 1,
        "invalid": 2,
    }
    assert on_a_scene == {**dict.fromkeys(ASK_RESULTS, 0), "invalid": 1, "too_long": 2, "failed": 1, "answered": 1}
    reached = {result for counts in (without_frame, on_a_scene) for result, count in counts.items() if count}
    assert reached == set(ASK_RESULTS)
