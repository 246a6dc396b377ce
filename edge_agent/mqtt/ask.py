"""The ad hoc question protocol on `<base>/<agent>/ask`: request and reply formats, both sides.

A request is a JSON object:

    {"question": "Is anyone at the door?",    required, non-empty, at most 500 characters
     "max_new_tokens": 32,                     optional, 1..256
     "type": "yes_no", "options": [...],       optional: parse the answer like a standing question
     "reply_to": "...", "correlation_id": "..."}  MQTT 3.1.1 only: where to reply, and the id to echo

With MQTT 5 the reply address is the `ResponseTopic` property and the id the `CorrelationData`
property; they take precedence over the JSON fields. The reply is a JSON object on the reply topic
(not retained) carrying `correlation_id` (and, with MQTT 5, the same `CorrelationData` property);
an invalid request gets `{"error": "<reason>"}` when a reply address is known.

A requester is named by its reply topic without the last level (`ReplyAddress.requester`): MQTT does
not show subscribers who published, so this is what the agent's per-requester rate limit counts. A
client that wants its own allowance replies under a topic of its own, e.g. `<client>/reply/<id>`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import MAX_OPTION_CHARS, MAX_OPTIONS

MAX_REQUEST_BYTES = 16 * 1024
MAX_QUESTION_CHARS = 500
MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class ReplyAddress:
    """Where a reply goes and the id it must carry."""

    topic: str
    """The reply topic chosen by the requester."""
    correlation: bytes | None
    """The requester's correlation id, echoed in the reply (None if the requester sent none)."""

    @property
    def requester(self) -> str:
        """Who asks, as far as MQTT lets the agent know: the reply topic without its last level."""
        parent, _, _ = self.topic.rpartition("/")
        return parent or self.topic


@dataclass(frozen=True)
class AskRequest:
    """One valid ad hoc question."""

    question: str
    """The question text, stripped."""
    reply: ReplyAddress
    """Where the answer goes."""
    max_new_tokens: int | None = None
    """Cap on generated tokens, or None for the service's default."""
    type: str | None = None
    """Parse the answer like a standing question of this type, or None for free text."""
    options: tuple[str, ...] = ()
    """The allowed answers for an options question."""


class BadRequest(Exception):
    """An ask request that cannot be answered; `reply` is where to say so, if known."""

    def __init__(self, reason: str, reply: ReplyAddress | None = None):
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


def parse_ask(payload: bytes, properties: Properties | None) -> AskRequest:
    """Validate a request; raise `BadRequest` naming the first problem and, if known, the reply address."""
    reply = _reply_address({}, properties)
    try:
        fields = _json_object(payload)
        reply = _reply_address(fields, properties)
        if reply is None:
            raise BadRequest("no reply address: set the ResponseTopic property or the 'reply_to' field")
        return AskRequest(
            question=_question(fields),
            reply=reply,
            max_new_tokens=_max_new_tokens(fields),
            type=_optional_str(fields, "type"),
            options=_options(fields),
        )
    except BadRequest as error:
        raise BadRequest(error.reason, reply) from None


def request_message(question: str, reply_topic: str) -> tuple[bytes, Properties]:
    """The requester's side: a request payload and its MQTT 5 properties, with a fresh correlation id.

    Both the properties and the JSON fallback fields are set, so an agent on either protocol answers.
    """
    correlation_id = uuid.uuid4().hex
    fields = {"question": question, "reply_to": reply_topic, "correlation_id": correlation_id}
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = reply_topic
    properties.CorrelationData = correlation_id.encode()
    return json.dumps(fields).encode(), properties


def reply_message(reply: ReplyAddress, payload: dict) -> tuple[bytes, Properties]:
    """The responder's side: the reply JSON (with `correlation_id`) and its MQTT 5 properties."""
    properties = Properties(PacketTypes.PUBLISH)
    body = dict(payload)
    if reply.correlation is not None:
        properties.CorrelationData = reply.correlation
        body["correlation_id"] = reply.correlation.decode("utf-8", "replace")
    return json.dumps(body, default=str).encode(), properties


def _json_object(payload: bytes) -> dict:
    if len(payload) > MAX_REQUEST_BYTES:
        raise BadRequest(f"request larger than {MAX_REQUEST_BYTES} bytes")
    try:
        fields = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest("request is not valid JSON") from None
    if not isinstance(fields, dict):
        raise BadRequest("request must be a JSON object")
    return fields


def _reply_address(fields: dict, properties: Properties | None) -> ReplyAddress | None:
    """The MQTT 5 properties if present, else the JSON fallback; None if no usable topic was given."""
    topic = getattr(properties, "ResponseTopic", None)
    correlation = getattr(properties, "CorrelationData", None)
    if topic is None:
        topic = fields.get("reply_to")
        correlation_id = fields.get("correlation_id")
        correlation = None if correlation_id is None else str(correlation_id).encode()
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic:
        return None
    return ReplyAddress(topic, correlation)


def _question(fields: dict) -> str:
    question = fields.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadRequest("'question' must be a non-empty string")
    if len(question) > MAX_QUESTION_CHARS:
        raise BadRequest(f"'question' is longer than {MAX_QUESTION_CHARS} characters")
    return question.strip()


def _max_new_tokens(fields: dict) -> int | None:
    value = fields.get("max_new_tokens")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
        raise BadRequest(f"'max_new_tokens' must be an integer from 1 to {MAX_NEW_TOKENS}")
    return value


def _optional_str(fields: dict, key: str) -> str | None:
    value = fields.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise BadRequest(f"'{key}' must be a non-empty string")
    return value


def _options(fields: dict) -> tuple[str, ...]:
    """The request's options, bounded as a config question's are (`config.MAX_OPTIONS`, `MAX_OPTION_CHARS`)."""
    options = fields.get("options", [])
    if not isinstance(options, list) or not all(isinstance(option, str) and option for option in options):
        raise BadRequest("'options' must be a list of non-empty strings")
    if len(options) > MAX_OPTIONS:
        raise BadRequest(f"'options' lists {len(options)} options, more than {MAX_OPTIONS}")
    too_long = next((option for option in options if len(option) > MAX_OPTION_CHARS), None)
    if too_long is not None:
        raise BadRequest(f"'options' has an option of {len(too_long)} characters, more than {MAX_OPTION_CHARS}")
    return tuple(options)
