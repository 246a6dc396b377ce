"""The MQTT topics of one agent and the payloads published on them.

`<base>` is `mqtt.base_topic` (default `edge-agent`), `<agent>` the agent id:

| topic | retained | payload |
| --- | --- | --- |
| `<base>/<agent>/availability` | yes | `online` / `offline`; `offline` is also the last will |
| `<base>/<agent>/camera` | yes | `online` / `offline`: whether frames are arriving (the single `camera:` form) |
| `<base>/<agent>/camera/<camera_id>` | yes | `online` / `offline`: frames arrive from that camera (`cameras:`) |
| `<base>/<agent>/latency_ms` | yes | milliseconds from frame to answer of the latest answer published |
| `<base>/<agent>/answers/<question_id>` | yes | JSON `AnswerMessage` without `state` (strict JSON) |
| `<base>/<agent>/state/<question_id>` | yes | the plain Home Assistant state (at most 255 characters) |
| `<base>/<agent>/evidence/<question_id>` | yes | JPEG: the view the question's published state was answered on |
| `<base>/<agent>/ask` | no | ad hoc question requests (see `edge_agent.mqtt.ask`) |
| `<base>/<agent>/discovery` | yes | JSON list of the Home Assistant config topics this agent announced |
| `<base>/<agent>/enabled/<question_id>` | yes | `ON` / `OFF`: whether the question is asked (`mqtt/commands.py`) |
| `<base>/<agent>/enabled/<question_id>/set` | no | command: `ON` / `OFF` enables or disables the question |
| `<base>/<agent>/check/<question_id>`, `<base>/<agent>/check` | no | command: `PRESS` answers the question (all) now |

Question ids are unique in the agent, so a question's topics are the same whichever camera it looks at, and
with `cameras:` only the camera status topics name the camera.

Answers and states use the configured QoS (default 1). An answer is published when its value, its latest
answer or its pending change changes, and again every `mqtt.heartbeat_s` seconds. The `discovery` topic is
the agent's memory of what it announced: after a restart it removes the entities of questions that are no
longer configured.
The `evidence` images (see `edge_agent.evidence`) are published when a state changes, at most one per question
every `evidence.min_interval_s`, and again after every reconnect; with `evidence.enabled: false` none are.

Every JSON the agent publishes is strict (`strict_json`): a number that is not finite is `null`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass

from edge_agent.config import mqtt_text
from edge_agent.errors import UserError
from edge_agent.questions import MAX_STATE_CHARS
from edge_agent.stable import Pending

ONLINE = "online"
OFFLINE = "offline"

MAX_TOPIC_BYTES = 1024
"""The longest topic the agent publishes to, in UTF-8 bytes. MQTT allows 65,535, but a reply topic comes
from a client: this bound keeps the rate limit's memory of requesters (1,024 of them) near 1 MiB, and is
far above any real topic."""
MAX_TOPIC_LEVELS = 128
"""The most levels a topic the agent publishes to may have. mosquitto 2.0.11 disconnects a client that
publishes a topic of 202 levels or more (and paho re-sends the message after every reconnect)."""

_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
_WILDCARDS = ("+", "#")


@dataclass(frozen=True)
class AnswerMessage:
    """One answer to one question, as the service hands it to the MQTT link."""

    question_id: str
    """The configured question's id (a topic level and part of the entity id)."""
    question: str
    """The question text asked of the model."""
    type: str
    """The question type (`yes_no`, `number`, ...), as configured."""
    value: object
    """The published typed answer (bool, int, str or None for unknown): the question's confirmed value, which
    changes only when `confirm` answers from distinct frames agree (see `edge_agent.stable`)."""
    raw: str
    """The model's raw text of the latest answer (`latest_value`), whether or not it changed `value`."""
    state: str
    """The plain Home Assistant state of `value` (`ON`/`OFF`, the option, the integer, the text or `unknown`)."""
    frame_ts: float
    """Capture time, Unix seconds, of the newest frame known to show the answered scene: the frame encoded,
    or a later frame the scene gate found unchanged."""
    answered_ts: float
    """When the agent gave this answer for that frame, Unix seconds: after computing it, or, for an answer
    reused on an unchanged scene, when it was reused. Never before `frame_ts`."""
    latency_ms: float
    """Milliseconds from `frame_ts` to `answered_ts`."""
    model: str
    """The model that answered (directory or display name)."""
    scene_changed: bool
    """True when the answer was computed on a scene other than the one of the question's previous answer
    (or it is the first); false when the previous answer was reused because the scene is unchanged."""
    confidence: float | None = None
    """For yes/no and choice questions: the model's probability of the latest answer's option among the options."""
    latest_value: object = None
    """The typed latest answer (None when unparseable), confirmed or not: `value` once enough answers agree,
    else a flicker or a change still pending, or an answer below `min_confidence`."""
    pending: Pending | None = None
    """The change waiting for more agreeing answers (its value, answers agreeing so far, answers needed), or
    None when the latest counted answers agree with `value`."""

    @property
    def news(self) -> tuple:
        """What the answer tells beside its times and confidence: a new answer that tells the same as the last
        one published waits for the heartbeat."""
        return (self.value, self.state, self.latest_value, self.pending)


def answer_payload(msg: AnswerMessage) -> bytes:
    """The JSON published on the answers topic: every field except the plain state."""
    fields = asdict(msg)
    del fields["state"]
    return strict_json(fields).encode()


def strict_json(value: object) -> str:
    """`value` as JSON that strict parsers accept: NaN and infinities (which JSON lacks) become null.

    The numbers come from the model (a confidence from damaged weights can be NaN) or echo a client's
    correlation id; this is the safety net for both. Other types are written as their `str`.
    """
    return json.dumps(_finite(value), default=str, allow_nan=False)


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def topic_problem(topic: object) -> str | None:
    """Why the agent must not publish to `topic`, or None if it may.

    paho raises on a topic it cannot encode (a lone surrogate) and queues whatever the broker would
    refuse; the broker then drops the connection, and paho sends the message again after every
    reconnect. So a topic is checked before anything is published to it, and a reply topic as soon as
    a request names it. Lone surrogates, U+0000, control characters and non-characters are refused
    as in the config's MQTT names (`config.mqtt_text`), and so are topics longer than `MAX_TOPIC_BYTES`
    or deeper than `MAX_TOPIC_LEVELS`.
    """
    if not isinstance(topic, str) or not topic:
        return "must be a non-empty string"
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return f"must not be longer than {MAX_TOPIC_BYTES} bytes"
    if topic.count("/") >= MAX_TOPIC_LEVELS:
        return f"must not have more than {MAX_TOPIC_LEVELS} levels"
    if any(wildcard in topic for wildcard in _WILDCARDS):
        return "must not contain a wildcard ('+' or '#')"
    return mqtt_text(topic)


def state_payload(msg: AnswerMessage) -> bytes:
    """The plain state, cut to the length Home Assistant accepts."""
    return msg.state[:MAX_STATE_CHARS].encode()


def latency_payload(msg: AnswerMessage) -> bytes:
    """The answer's latency in whole milliseconds (`unknown` if it is not a number)."""
    return str(round(msg.latency_ms)).encode() if math.isfinite(msg.latency_ms) else b"unknown"


def check_id(key: str, value: str) -> str:
    """Return `value` if it can be a topic level and part of a Home Assistant object id."""
    if not _ID_PATTERN.fullmatch(value):
        raise UserError(f"{key} {value!r} must use only letters, digits, '_' and '-'")
    return value


@dataclass(frozen=True)
class AgentTopics:
    """The topic names of one agent under a base topic."""

    base: str
    """The base topic (`mqtt.base_topic`), without a trailing slash."""
    agent_id: str
    """The agent id: one topic level."""

    def __post_init__(self) -> None:
        check_id("agent id", self.agent_id)
        if not self.base or any(w in self.base for w in _WILDCARDS) or self.base.endswith("/"):
            raise UserError(f"mqtt.base_topic {self.base!r} must be non-empty, without '+', '#' or a trailing '/'")

    @property
    def root(self) -> str:
        return f"{self.base}/{self.agent_id}"

    @property
    def availability(self) -> str:
        return f"{self.root}/availability"

    @property
    def camera(self) -> str:
        return f"{self.root}/camera"

    def camera_status(self, camera_id: str | None) -> str:
        """Whether frames arrive from a camera of `cameras:` (`<root>/camera/<camera_id>`), or from the camera of
        the single `camera:` form (None: `<root>/camera`)."""
        return self.camera if camera_id is None else f"{self.camera}/{camera_id}"

    @property
    def latency(self) -> str:
        return f"{self.root}/latency_ms"

    @property
    def ask(self) -> str:
        return f"{self.root}/ask"

    @property
    def discovery(self) -> str:
        return f"{self.root}/discovery"

    def answers(self, question_id: str) -> str:
        return f"{self.root}/answers/{question_id}"

    def state(self, question_id: str) -> str:
        return f"{self.root}/state/{question_id}"

    def evidence(self, question_id: str) -> str:
        return f"{self.root}/evidence/{question_id}"
