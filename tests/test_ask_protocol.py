"""Ad hoc questions: the request format, and request/response through a real broker on MQTT 5 and 3.1.1."""

import json
import queue
import threading

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import MqttSettings
from edge_agent.errors import UserError
from edge_agent.mqtt import AskRequest, BadRequest, ask_remote, parse_ask
from edge_agent.mqtt.ask import ReplyAddress
from tests.support.broker import ask_reply, free_port

ASK_TOPIC = "edge-agent/kitchen/ask"


def v5_reply_properties(topic: str = "me/reply", correlation: bytes = b"c-1") -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = topic
    properties.CorrelationData = correlation
    return properties


def request(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_an_mqtt5_request_replies_to_its_response_topic_with_its_correlation_data():
    parsed = parse_ask(request(question=" Is the door open? ", max_new_tokens=8), v5_reply_properties())

    assert parsed == AskRequest(question="Is the door open?", reply=ReplyAddress("me/reply", b"c-1"), max_new_tokens=8)


def test_an_mqtt311_request_carries_its_reply_address_in_the_json():
    payload = request(
        question="What colour is the cup?",
        reply_to="me/reply",
        correlation_id="c-2",
        type="options",
        options=["red", "blue"],
    )

    parsed = parse_ask(payload, None)

    assert parsed.reply == ReplyAddress("me/reply", correlation_id="c-2")
    assert (parsed.type, parsed.options) == ("options", ("red", "blue"))


def test_mqtt5_properties_win_over_the_json_reply_fields():
    payload = request(question="Anyone?", reply_to="json/reply", correlation_id="json")

    assert parse_ask(payload, v5_reply_properties()).reply == ReplyAddress("me/reply", b"c-1")


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (request(), "'question' must be a non-empty string"),
        (request(question="   "), "'question' must be a non-empty string"),
        (request(question="?" * 501), "longer than 500"),
        (request(question="Anyone?", max_new_tokens=0), "'max_new_tokens'"),
        (request(question="Anyone?", max_new_tokens="8"), "'max_new_tokens'"),
        (request(question="Anyone?", options="red"), "'options'"),
        (request(question="Anyone?", type=""), "'type'"),
    ],
)
def test_an_invalid_request_is_refused_with_a_reason_and_the_reply_address(payload, reason):
    with pytest.raises(BadRequest, match=reason) as refused:
        parse_ask(payload, v5_reply_properties())

    assert refused.value.reply == ReplyAddress("me/reply", b"c-1")


@pytest.mark.parametrize("reply_to", [None, "", "me/+/reply", "me/#"])
def test_a_request_without_a_usable_reply_topic_is_refused_without_a_reply_address(reply_to):
    with pytest.raises(BadRequest, match="reply address") as refused:
        parse_ask(request(question="Anyone?", reply_to=reply_to), None)

    assert refused.value.reply is None


@pytest.fixture
def answering_agent(broker, make_link):
    """Start an agent whose service thread answers every question with an echo."""
    links = []

    def start(protocol: str = "5", fail_first: bool = False):
        requests: queue.Queue[AskRequest] = queue.Queue()
        calls = []

        def on_ask(request: AskRequest) -> None:
            calls.append(request)
            if fail_first and len(calls) == 1:
                raise RuntimeError("a bug in the service's handler")
            requests.put(request)

        link = make_link(broker, on_ask=on_ask, protocol=protocol)
        links.append(link)

        def answer_questions() -> None:
            while link in links:
                try:
                    asked = requests.get(timeout=0.1)
                except queue.Empty:
                    continue
                link.reply(asked, ask_reply(asked.question, f"echo: {asked.question}"))

        threading.Thread(target=answer_questions, daemon=True).start()
        return link

    yield start
    links.clear()


def settings_for(broker, protocol: str = "5") -> MqttSettings:
    return MqttSettings(host=broker.host, port=broker.port, protocol=protocol)


@pytest.mark.parametrize(
    "agent_protocol, asker_protocol", [("5", "5"), ("3.1.1", "3.1.1"), ("3.1.1", "5"), ("5", "3.1.1")]
)
def test_a_remote_question_gets_the_agents_answer(broker, answering_agent, agent_protocol, asker_protocol):
    answering_agent(agent_protocol)

    reply = ask_remote(settings_for(broker, asker_protocol), "kitchen", "Is the door open?", timeout_s=5)

    assert reply["answer"] == "echo: Is the door open?"
    assert reply["correlation_id"]


def test_an_invalid_request_gets_an_error_reply_and_the_agent_keeps_answering(broker, answering_agent, subscriber):
    answering_agent()
    requester = subscriber(broker, "me/reply")

    requester.publish(ASK_TOPIC, request(question=""), properties=v5_reply_properties())

    refusal = requester.next("me/reply")
    assert json.loads(refusal.payload) == {
        "error": "'question' must be a non-empty string",
        "correlation_id": "c-1",
    }
    assert refusal.properties.CorrelationData == b"c-1"
    assert ask_remote(settings_for(broker), "kitchen", "Still there?", timeout_s=5)["answer"]


def test_an_exception_in_the_services_handler_does_not_stop_the_link(broker, answering_agent):
    answering_agent(fail_first=True)

    with pytest.raises(UserError):
        ask_remote(settings_for(broker), "kitchen", "Lost?", timeout_s=0.5)

    assert ask_remote(settings_for(broker), "kitchen", "Still there?", timeout_s=5)["answer"]


def test_asking_when_no_agent_listens_is_a_user_error_naming_the_topic(broker):
    with pytest.raises(UserError, match=f"no agent answered on {ASK_TOPIC} within 0.3 s"):
        ask_remote(settings_for(broker), "kitchen", "Anyone?", timeout_s=0.3)


def test_asking_through_an_unreachable_broker_is_a_user_error():
    port = free_port()

    with pytest.raises(UserError, match=f"cannot reach MQTT broker localhost:{port}"):
        ask_remote(MqttSettings(port=port), "kitchen", "Anyone?", timeout_s=1)
