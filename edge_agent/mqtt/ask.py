"""The ad hoc question protocol on `<base>/<agent>/ask`: request and reply formats, both sides.

A request is a JSON object:

    {"question": "Is anyone at the door?",    required, non-empty, at most 500 characters
     "max_new_tokens": 32,                     optional, 1..256
     "type": "yes_no", "options": [...],       optional: parse the answer like a standing question
     "evidence": true,                         optional: also publish the image answered on (see below)
     "region": [0.6, 0.2, 0.9, 0.5],           optional: answer on this part of the frame (fractions)
     "camera": "entrance",                     optional: the camera (of `cameras:`) to answer on; default the first
     "reply_to": "...", "correlation_id": ...}  MQTT 3.1.1 only: where to reply, and the id to echo

With MQTT 5 the reply address is the `ResponseTopic` property and the id the `CorrelationData`
property; they take precedence over the JSON fields. The reply is a JSON object on the reply topic
(not retained) carrying the requester's id as sent: a JSON `correlation_id` comes back as the same
JSON value; MQTT 5 `CorrelationData` comes back as the same property, and as the `correlation_id`
text when it is UTF-8. The reply is an answer (`AskReply`) or a refusal (`AskRefusal`), written by
`reply_message`:

    {"question": ..., "answer": ..., "type": ..., "value": ..., "confidence": ...,
     "frame_ts": ..., "answered_ts": ..., "latency_ms": ..., "model": ...}
    {"error": "<one line for a person>"}

A request with `"evidence": true` (and `evidence.enabled`) first gets the JPEG of the view it was answered
on, not retained, on `<reply topic>/evidence` (`evidence_topic`), and the answer names that topic in an
extra field `"evidence_topic"`; without it (or when that topic is not one the agent may publish to) the
reply is as above.

A refused request gets its refusal when a reply address is known. Why it was refused is a `Refusal`,
which the reply does not carry (its text says it) but the `edge_agent_ask_requests` counter counts by.

What a client puts in the reply address comes back in the agent's own publish, so it is bounded:
- The reply topic must pass `topics.topic_problem` (UTF-8, no U+0000, control characters or wildcards,
  at most 1,024 bytes). A request naming another topic has no usable reply address: it is refused
  without a reply (the agent cannot answer it), like a request naming none.
- Correlation data is at most `MAX_CORRELATION_BYTES` (256) bytes, as sent or as JSON text; a
  `correlation_id` must be strict JSON (no NaN or infinities). A request breaking either rule is refused
  with an error reply that carries no correlation data, so the reply is never larger than the request's
  rules allow (60 KiB of correlation data once came back as a 420 KiB reply).

A requester is named by its reply topic without the last level (`ReplyAddress.requester`): MQTT does
not show subscribers who published, so this is what the agent's per-requester rate limit counts. A
client that wants its own allowance replies under a topic of its own, e.g. `<client>/reply/<id>`.
The rate limit is checked once the reply address is known (`ReceivedAsk.reply`) and before the rest
of the request is (`ReceivedAsk.request()`), so a flood costs little more than reading the addresses.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import uuid
from dataclasses import dataclass

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import MAX_OPTION_CHARS, MAX_OPTIONS, Region, finite_number, region_problem
from edge_agent.mqtt.topics import strict_json, topic_problem

MAX_REQUEST_BYTES = 16 * 1024
MAX_QUESTION_CHARS = 500
MAX_NEW_TOKENS = 256
MAX_CORRELATION_BYTES = 256
"""The longest correlation data echoed: a UUID takes 16 to 36 bytes."""
NO_REPLY_ADDRESS = "no reply address: set the ResponseTopic property or the 'reply_to' field"


@dataclass(frozen=True)
class ReplyAddress:
    """Where a reply goes and the id it must carry."""

    topic: str
    """The reply topic chosen by the requester."""
    correlation: bytes | None = None
    """MQTT 5 `CorrelationData`, echoed as the same property (None if the requester sent none)."""
    correlation_id: object = None
    """A JSON `correlation_id` (the MQTT 3.1.1 way), echoed as the same JSON value (None if not sent)."""

    @property
    def requester(self) -> str:
        """Who asks, as far as MQTT lets the agent know: the reply topic without its last level."""
        parent, _, _ = self.topic.rpartition("/")
        return parent or self.topic

    @property
    def echoed_id(self) -> object:
        """The reply's `correlation_id` field: the JSON value, or the MQTT 5 data when it is UTF-8 text."""
        if self.correlation_id is not None or self.correlation is None:
            return self.correlation_id
        try:
            return self.correlation.decode("utf-8")
        except UnicodeDecodeError:
            return None


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
    evidence: bool = False
    """Whether the requester wants the image the answer was given on (`evidence_topic`)."""
    region: Region | None = None
    """The part of the frame to answer on (`capture.views`), or None for the whole frame."""
    camera: str | None = None
    """The id of the camera to answer on, or None for the agent's first camera."""


class Refusal(str, enum.Enum):
    """Why an ask request is not answered. The values are the `result` labels of the metric
    `edge_agent_ask_requests`, beside `ANSWERED`; a refusal is built only from a member (`AskRefusal`)."""

    INVALID = "invalid"
    """The request breaks the format (`BadRequest`), names no usable reply address, or asks for a question
    the agent cannot build (an unknown `type`, options a choice does not allow)."""
    RATE_LIMITED = "rate_limited"
    """Its requester sent more than `mqtt.ask_burst` at once or `mqtt.ask_per_minute` on average."""
    BUSY = "busy"
    """`service.ASK_QUEUE_LIMIT` questions already wait for the loop."""
    NO_FRAME = "no_frame"
    """The camera has delivered no frame yet."""
    TOO_LONG = "too_long"
    """The question, its prompt or an option has more model tokens than the agent allows."""
    FAILED = "failed"
    """Answering raised: a fault of the agent, not of the request."""


ANSWERED = "answered"
"""The `result` label of an answered request."""
ASK_RESULTS = (ANSWERED, *(refusal.value for refusal in Refusal))
"""Every `result` label of `edge_agent_ask_requests`."""


@dataclass(frozen=True)
class AskReply:
    """The answer to an ask request, in the reply's field order."""

    question: str
    """The question as received (stripped)."""
    answer: str
    """The model's text."""
    type: str
    """The question type the answer was parsed as (`text` when the request named none)."""
    value: object
    """The typed answer, or None when the text did not parse as `type`."""
    confidence: float | None
    """The model's probability of the answer, or None."""
    frame_ts: float
    """Capture time of the newest frame known to show the answered scene."""
    answered_ts: float
    """When the agent answered."""
    latency_ms: float
    """`answered_ts - frame_ts` in milliseconds."""
    model: str
    """The model's name."""
    evidence_topic: str | None = None
    """Where the JPEG the answer was given on was published just before the reply, or None (then the reply
    has no such field)."""

    def fields(self) -> dict:
        fields = dataclasses.asdict(self)
        if self.evidence_topic is None:
            del fields["evidence_topic"]
        return fields


@dataclass(frozen=True)
class AskRefusal:
    """Why an ask request is not answered: the reason counted, and one line that tells the requester."""

    reason: Refusal
    detail: str
    """For a person, in one line: line breaks become spaces."""

    def __post_init__(self) -> None:
        if not isinstance(self.reason, Refusal):
            raise TypeError(f"an ask refusal's reason must be a Refusal, got {self.reason!r}")
        object.__setattr__(self, "detail", " ".join(self.detail.splitlines()))

    def fields(self) -> dict:
        return {"error": self.detail}


class BadRequest(Exception):
    """An ask request that cannot be answered; `reply` is where to say so, if known."""

    def __init__(self, reason: str, reply: ReplyAddress | None = None):
        super().__init__(reason)
        self.reason = reason
        """What is wrong with the request, in one line."""
        self.reply = reply

    @property
    def refusal(self) -> AskRefusal:
        return AskRefusal(Refusal.INVALID, self.reason)


class ReceivedAsk:
    """A received request, read in two steps so the rate limit can come between them.

    `reply` is where to answer, found first and as cheaply as possible (the MQTT 5 properties need no
    JSON parsing); `request()` then checks everything else. The JSON is parsed at most once.
    """

    def __init__(self, payload: bytes, properties: Properties | None):
        self._payload = payload
        self._properties = properties
        self._reply_problem: str | None = None
        self.reply = self._find_reply()
        """Where to answer, or None when the request names no usable reply topic."""

    def request(self) -> AskRequest:
        """The valid question; raise `BadRequest` naming the first problem, with `reply`."""
        try:
            if self._reply_problem is not None:
                raise BadRequest(self._reply_problem)
            return request_from(self._fields, self.reply)
        except BadRequest as error:
            raise BadRequest(error.reason, self.reply) from None

    @functools.cached_property
    def _fields(self) -> dict:
        return json_object(self._payload)

    def _find_reply(self) -> ReplyAddress | None:
        try:
            return self._checked_reply()
        except BadRequest as error:
            self._reply_problem = error.reason
            return error.reply

    def _checked_reply(self) -> ReplyAddress:
        """The MQTT 5 properties if they name a topic, else the JSON fields."""
        topic = getattr(self._properties, "ResponseTopic", None)
        if topic is not None:
            topic = _reply_topic(topic, "the ResponseTopic property")
            correlation = getattr(self._properties, "CorrelationData", None)
            _check_correlation_size(0 if correlation is None else len(correlation), topic)
            return ReplyAddress(topic, correlation=correlation)
        fields = self._fields
        topic = _reply_topic(fields.get("reply_to"), "'reply_to'")
        correlation_id = fields.get("correlation_id")
        _check_correlation_id(correlation_id, topic)
        return ReplyAddress(topic, correlation_id=correlation_id)


def parse_ask(payload: bytes, properties: Properties | None) -> AskRequest:
    """Validate a request; raise `BadRequest` naming the first problem and, if known, the reply address."""
    return ReceivedAsk(payload, properties).request()


def request_from(fields: dict, reply: ReplyAddress) -> AskRequest:
    """The question a request's JSON object asks, answered to `reply`; `BadRequest` naming the first problem.
    The status page's asks are checked by it too (`edge_agent.web`), as they arrive over HTTP."""
    return AskRequest(
        question=_question(fields),
        reply=reply,
        max_new_tokens=_max_new_tokens(fields),
        type=_optional_str(fields, "type"),
        options=_options(fields),
        evidence=_evidence(fields),
        region=region_field(fields),
        camera=_optional_str(fields, "camera"),
    )


def json_object(payload: bytes) -> dict:
    """The request's JSON object; `BadRequest` when it is too large, not JSON or not an object."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise BadRequest(f"request larger than {MAX_REQUEST_BYTES} bytes")
    try:
        fields = json.loads(payload)
    except (ValueError, RecursionError):  # not UTF-8 or JSON, an integer over 4,300 digits, nesting too deep
        raise BadRequest("request is not valid JSON") from None
    if not isinstance(fields, dict):
        raise BadRequest("request must be a JSON object")
    return fields


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


def reply_message(reply: ReplyAddress, message: AskReply | AskRefusal) -> tuple[bytes, Properties]:
    """The responder's side: the answer or refusal as strict JSON (with `correlation_id`) and its MQTT 5
    properties."""
    properties = Properties(PacketTypes.PUBLISH)
    body = message.fields()
    if reply.correlation is not None:
        properties.CorrelationData = reply.correlation
    if reply.echoed_id is not None:
        body["correlation_id"] = reply.echoed_id
    return strict_json(body).encode(), properties


def _reply_topic(topic: object, source: str) -> str:
    """`topic` if the agent may publish to it; else the request has no reply address."""
    if topic is None:
        raise BadRequest(NO_REPLY_ADDRESS)
    problem = topic_problem(topic)
    if problem is not None:
        raise BadRequest(f"no usable reply address: {source} {problem}")
    return topic


def _check_correlation_id(correlation_id: object, topic: str) -> None:
    """Refuse a JSON id that is not strict JSON or is too long (the refusal is sent to `topic`, without it)."""
    try:
        size = len(json.dumps(correlation_id, allow_nan=False))
    except ValueError:
        raise BadRequest("'correlation_id' must be JSON without NaN or infinities", ReplyAddress(topic)) from None
    except RecursionError:  # nested deeper than the encoder goes: far too long anyway
        size = MAX_CORRELATION_BYTES + 1
    _check_correlation_size(size, topic)


def _check_correlation_size(size: int, topic: str) -> None:
    if size > MAX_CORRELATION_BYTES:
        raise BadRequest(f"correlation data longer than {MAX_CORRELATION_BYTES} bytes", ReplyAddress(topic))


def _utf8(text: str, key: str) -> str:
    """`text` if it is valid UTF-8: a lone surrogate (which JSON can spell) breaks the tokenizer and MQTT."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{key}' is not valid UTF-8 (it holds a lone surrogate)") from None
    return text


def _question(fields: dict) -> str:
    question = fields.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadRequest("'question' must be a non-empty string")
    if len(question) > MAX_QUESTION_CHARS:
        raise BadRequest(f"'question' is longer than {MAX_QUESTION_CHARS} characters")
    return _utf8(question.strip(), "question")


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
    return value if value is None else _utf8(value, key)


def _evidence(fields: dict) -> bool:
    value = fields.get("evidence", False)
    if not isinstance(value, bool):
        raise BadRequest("'evidence' must be true or false")
    return value


def region_field(fields: dict) -> Region | None:
    """The request's region, checked as a config question's is (`config.region_problem`)."""
    value = fields.get("region")
    if value is None:
        return None
    if not isinstance(value, list) or not all(finite_number(edge) for edge in value):
        raise BadRequest("'region' must be a list of 4 numbers [x0, y0, x1, y1]")
    region = tuple(float(edge) for edge in value)
    problem = region_problem(region)
    if problem is not None:
        raise BadRequest(f"'region' {problem}")
    return region


def evidence_topic(reply: ReplyAddress) -> str | None:
    """Where the image of an answer to `reply` goes: `<reply topic>/evidence`, or None when the agent may not
    publish there (the reply topic is near the length or depth `topics.topic_problem` allows)."""
    topic = f"{reply.topic}/evidence"
    return topic if topic_problem(topic) is None else None


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
    return tuple(_utf8(option, "options") for option in options)
