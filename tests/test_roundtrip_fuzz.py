"""Whole round trips from hostile clients through a real mosquitto to the running agent (tiny model) and back.

Hypothesis drives one agent per test (one per example where the broker restarts) with what no well-behaved
client sends: reply topics with lone surrogates, U+0000 or other control characters, wildcards, `$SYS/...`,
hundreds of levels or 20,000 characters; correlation data of any bytes and correlation ids of any JSON type;
many long (emoji) options; payloads at and over the 16 KiB cap; invalid UTF-8; MQTT 5 and 3.1.1 requesters;
retained or not; and any retained payload on the topics the agent reads back when it reconnects (after a
restart of a broker with persistence, which keeps them). `tests/test_fuzz.py` fuzzes the request parser alone;
here every example goes through the broker and the agent, and afterwards the agent

- has replied exactly once to a request whose reply topic the broker can deliver: an answer, or one line
  `{"error": ...}`, with the correlation data or id echoed as sent; or, when that is longer than
  `MAX_CORRELATION_BYTES` (as sent or as JSON text) or not strict JSON, an error that echoes none of it;
- answers the next valid question;
- is still connected: no `offline` (its last will) and no second `online` on its availability topic, but
  for the one reconnect a broker restart causes;
- still runs its inference loop and has logged no traceback;
- and over all the examples of a run, the process has grown its memory within a bound.

An example that breaks the agent fails; the next one starts with a fresh agent on the same broker, so
hypothesis replays and shrinks each example on its own.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.devtools.bench import rss_mib
from edge_agent.mqtt.ask import MAX_CORRELATION_BYTES, MAX_REQUEST_BYTES
from edge_agent.mqtt.client import MAX_INCOMING_PACKET_BYTES
from edge_agent.mqtt.topics import MAX_TOPIC_BYTES, MAX_TOPIC_LEVELS
from edge_agent.questions import KINDS
from tests.support.agent import AGENT, QUESTIONS, RunningAgent, agent_config
from tests.support.broker import WAIT_TIMEOUT_S

ROOT = f"edge-agent/{AGENT}"
ASK_TOPIC = f"{ROOT}/ask"
AVAILABILITY_TOPIC = f"{ROOT}/availability"
CAMERA_TOPIC = f"{ROOT}/camera"
DISCOVERY_TOPIC = f"{ROOT}/discovery"
STATE_TOPICS = [f"{ROOT}/state/{question['id']}" for question in QUESTIONS]
HA_STATUS_TOPIC = "homeassistant/status"
OWN_CONFIG_TOPIC = re.compile(
    rf"homeassistant/(binary_sensor|sensor|switch|button|image)/{AGENT}_[A-Za-z0-9_-]+/config"
    rf"|homeassistant/button/{AGENT}/check_all/config"
)
"""A Home Assistant config the agent may have announced (a current question's, control's or image's, or a
removed one's)."""
FOREIGN_CONFIGS = {
    "homeassistant/sensor/other_x/config": b'{"name": "another agent\'s sensor", "state_topic": "other/x"}',
    "homeassistant/binary_sensor/other_y/config": b'{"name": "another door", "state_topic": "other/y"}',
    f"homeassistant/sensor/{AGENT}ing_z/config": b'{"name": "an agent whose id starts like ours"}',
}
"""Retained configs of other agents, present on the broker throughout: the agent must never touch them."""
RETAINED_REPLY_PREFIX = "retained/"
"""Reply topics of the retained ask requests start here: nothing may be published here after a reconnect."""

REPLY_TIMEOUT_S = 60.0
"""One reply from the tiny model takes well under a second; this is generous for a busy 2-core machine."""
WATCHER_SESSION_S = 600
"""How long the broker keeps the watcher's session while it is away: longer than any broker restart."""
RUN_GROWTH_LIMIT_MIB = 96
"""How much all the examples of a run may grow the process (agent and test). It is checked once at the end:
memory an engine's pool took for one request stays taken, so a check per example would blame whichever
example came next (and hypothesis could not replay a failure)."""
MAX_RECONNECT_EXAMPLES = 20
"""Each reconnect example starts an agent and restarts the broker (about 2 s): the file stays within
about 2.5 minutes on a busy 2-core machine."""
UNLIMITED_ASKS = {"ask_burst": 1_000_000, "ask_per_minute": 1e9}
"""Examples come faster than any sane rate limit (it has its own tests in `test_fuzz.py`)."""


# -- what the broker delivers -------------------------------------------------------------------------------


def deliverable_char(char: str) -> bool:
    """What mosquitto accepts in a topic: it disconnects a client publishing U+0000, another C0 or C1 control
    character, DEL or a non-character (checked with 2.0.11); a lone surrogate cannot be encoded at all."""
    code = ord(char)
    return not (
        code <= 0x1F
        or 0x7F <= code <= 0x9F
        or 0xD800 <= code <= 0xDFFF
        or 0xFDD0 <= code <= 0xFDEF
        or code & 0xFFFE == 0xFFFE
    )


def deliverable(topic: str) -> bool:
    """Whether a reply on `topic` reaches a subscriber to `#`: a valid topic name within the agent's stated
    bounds (mosquitto 2.0.11 itself delivers up to 201 levels and 65,535 bytes), outside `$...` (which `#`
    does not match) and outside the agent's and Home Assistant's own topics (where other messages flow)."""
    return (
        0 < len(topic.encode("utf-8", "surrogatepass")) <= MAX_TOPIC_BYTES
        and all(deliverable_char(char) for char in topic)
        and not any(wildcard in topic for wildcard in "+#")
        and topic.count("/") < MAX_TOPIC_LEVELS
        and not topic.startswith(("$", "edge-agent/", "homeassistant/"))
    )


def sendable_as_property(topic: str) -> bool:
    """paho cannot encode a lone surrogate, and mosquitto disconnects a requester whose `ResponseTopic` holds
    a character it refuses in topics: such topics reach the agent only inside the JSON request (`reply_to`)."""
    return all(deliverable_char(char) for char in topic)


# -- the agent and the clients around it ------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    seq: int
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None


class Watcher:
    """A client subscribed to every topic (`#`), recording what arrives in order.

    Without retain-as-published, a message already retained when the watcher subscribes has `retain` set
    and every message published later has not, so `live(...)` is what was published while watching.
    Requests on the ask topic are not kept (up to 16 KiB each, and the test knows what it sent).

    Across a restart of a broker with persistence the watcher keeps its session (mosquitto saves only
    sessions opened without clean start): what the agent publishes before the watcher is back is kept for it
    and arrives live, however the two reconnects race. It subscribes again on every connect, so what the
    broker then sends again arrives flagged retained. A message whose acknowledgement the restart lost (the
    agent's last will, sent as the broker stops) comes again with the same packet id and the DUP flag: it
    is recorded once.
    """

    def __init__(self, broker):
        self._messages: list[Seen] = []
        self._count = 0
        self._by_packet_id: dict[int, tuple[str, bytes]] = {}
        """The last message received with each packet id, to recognise one sent again."""
        self._changed = threading.Condition(threading.RLock())
        subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"watcher-{uuid.uuid4().hex}", protocol=mqtt.MQTTv5
        )
        self._client.on_connect = lambda client, *args: client.subscribe("#", qos=1)
        self._client.on_message = self._record
        self._client.on_subscribe = lambda *args: subscribed.set()
        session = Properties(PacketTypes.CONNECT)
        session.SessionExpiryInterval = WATCHER_SESSION_S
        self._client.connect(broker.host, broker.port, clean_start=False, properties=session)
        self._client.loop_start()
        assert subscribed.wait(WAIT_TIMEOUT_S), "watcher not subscribed"

    def _record(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        if message.topic == ASK_TOPIC or self._sent_again(message):
            return
        correlation = getattr(message.properties, "CorrelationData", None)
        with self._changed:
            self._count += 1
            self._messages.append(Seen(self._count, message.topic, message.payload, bool(message.retain), correlation))
            self._changed.notify_all()

    def _sent_again(self, message: mqtt.MQTTMessage) -> bool:
        """Whether the broker sends `message` again, having missed the acknowledgement (QoS 1 is "at least
        once")."""
        content = (message.topic, message.payload)
        again = message.dup and self._by_packet_id.get(message.mid) == content
        self._by_packet_id[message.mid] = content
        return again

    def reset(self) -> None:
        """Forget everything seen so far (the next example starts from nothing)."""
        with self._changed:
            self._messages.clear()

    @property
    def count(self) -> int:
        """How many messages arrived so far: pass it as `after` to see only what comes next."""
        return self._count

    def on(self, topic: str, after: int = 0) -> list[Seen]:
        with self._changed:
            return [m for m in self._messages if m.topic == topic and m.seq > after]

    def live(self, topic: str, after: int = 0) -> list[Seen]:
        return [m for m in self.on(topic, after) if not m.retain]

    def live_topics(self, after: int = 0) -> set[str]:
        """The topics of what was published while watching (not of what the broker sent again, retained)."""
        with self._changed:
            return {m.topic for m in self._messages if m.seq > after and not m.retain}

    def wait_for(self, condition, what: str, unless=lambda: None, timeout: float = REPLY_TIMEOUT_S) -> None:
        """Wait until `condition()` holds; fail at once when `unless()` names a problem."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                problem = unless()
                if problem:
                    raise AssertionError(f"{problem} (while waiting for {what})")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {what} within {timeout:g} s")
                self._changed.wait(min(remaining, 0.1))

    def publish(self, topic: str, payload: bytes, retain: bool = False, properties=None) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        info.wait_for_publish(WAIT_TIMEOUT_S)
        assert info.is_published(), f"could not publish on {topic!r}"

    def sync(self) -> None:
        """Return once everything this client published so far has come back to it (the broker keeps order)."""
        marker = f"sync/{uuid.uuid4().hex}"
        self.publish(marker, b"")
        self.wait_for(lambda: self.on(marker), "the watcher's own marker", timeout=WAIT_TIMEOUT_S)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class AgentUnderTest:
    """The running agent on its broker, watched on every topic.

    `begin_example()` replaces an agent that an earlier example broke (its loop died or it stays
    disconnected), so every example starts from a healthy agent; `problem()` names what is broken now.
    `reconnect_with_retained()` restarts the broker, which must have persistence on.
    """

    def __init__(self, broker, config: dict, engine, caplog):
        self._broker = broker
        self._config = config
        self._engine = engine
        self._caplog = caplog
        self.watcher = Watcher(broker)
        self.reconnects_allowed = 0
        self._running: RunningAgent | None = None
        self._passed = True

    def start(self) -> None:
        self.watcher.reset()
        self._running = RunningAgent(self._config, engine=self._engine)
        self._running.__enter__()
        self.watcher.wait_for(
            lambda: self.watcher.live(AVAILABILITY_TOPIC) and all(self.watcher.live(t) for t in STATE_TOPICS),
            "`online` and a first answer to every question",
            unless=self._loop_problem,
        )
        self.watcher.reset()

    def stop(self) -> None:
        if self._running is not None:
            self._running.__exit__(None, None, None)
            self._running = None

    def close(self) -> None:
        self.stop()
        self.watcher.close()

    def begin_example(self, fresh_agent: bool = False) -> None:
        """Clear what an earlier example left retained on the topics the agent reads; after a failed example,
        also replace the agent (whatever state it was left in), so examples do not depend on each other.

        `fresh_agent` replaces it anyway: an agent whose connection breaks twice in a row within 30 s of
        connecting takes it for another agent with its client id and backs off (`QUICK_DISCONNECT_S` in
        `edge_agent/mqtt/client.py`), so an agent lives through one reconnect only."""
        if fresh_agent or not self._passed:
            self.stop()
        for topic in (DISCOVERY_TOPIC, HA_STATUS_TOPIC, ASK_TOPIC):
            self.watcher.publish(topic, b"", retain=True)
        if self._running is None:
            self.start()
        self.watcher.sync()
        self.watcher.reset()
        self._caplog.clear()
        self.reconnects_allowed = 0
        self._passed = False

    def passed(self) -> None:
        """The example passed: the next one may go on with this agent."""
        self._passed = True

    def _loop_problem(self) -> str | None:
        return None if self._running.running else "the agent's inference loop died"

    def problem(self) -> str | None:
        """What shows the agent broken: its loop died, or it lost its connection more often than allowed."""
        availability = [m.payload.decode() for m in self.watcher.live(AVAILABILITY_TOPIC)]
        lost = max(availability.count("offline"), availability.count("online"))
        if lost > self.reconnects_allowed:
            return f"the agent lost its broker connection (availability went {' then '.join(availability)})"
        return self._loop_problem()

    def ask_a_valid_question(self) -> dict:
        """Ask a valid question with a fresh reply topic and return the reply."""
        reply_topic = f"probe/{uuid.uuid4().hex}"
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = reply_topic
        properties.CorrelationData = b"probe"
        self.watcher.publish(ASK_TOPIC, b'{"question": "Is the door open?", "type": "yes_no"}', properties=properties)
        self.watcher.wait_for(
            lambda: self.watcher.on(reply_topic), "reply to the next valid question", unless=self.problem
        )
        return json.loads(self.watcher.on(reply_topic)[0].payload)

    def check_healthy(self) -> None:
        """The agent answers a valid question, stayed connected, runs its loop and logged no traceback."""
        reply = self.ask_a_valid_question()
        assert reply.get("value") in (True, False), f"the next valid question was not answered: {reply}"
        assert self.problem() is None, self.problem()
        tracebacks = [record.getMessage() for record in self._caplog.records if record.exc_info]
        assert not tracebacks, f"client input earned a traceback in the log: {tracebacks}"

    def reconnect_with_retained(self, retained: dict[str, bytes]) -> int:
        """Leave `retained` on the broker (the agent takes each message as it comes), restart the broker (it
        keeps them and sends them again, flagged retained, when the agent has reconnected after paho's
        reconnect delay) and wait until the agent has republished its camera status, discovery list and every
        state; check it is healthy before and after. Returns the watcher's count before the reconnect."""
        for topic, payload in retained.items():
            self.watcher.publish(topic, payload, retain=True)
        self.check_healthy()
        before = self.watcher.count
        self.reconnects_allowed = 1
        self._broker.restart()

        def availability() -> list[bytes]:
            return [m.payload for m in self.watcher.live(AVAILABILITY_TOPIC, after=before)]

        self.watcher.wait_for(
            lambda: availability()[-1:] == [b"online"], "`online` after the reconnect", unless=self.problem
        )
        online = self.watcher.live(AVAILABILITY_TOPIC)[-1].seq
        republished = [CAMERA_TOPIC, DISCOVERY_TOPIC, *STATE_TOPICS]
        self.watcher.wait_for(
            lambda: all(self.watcher.live(topic, after=online) for topic in republished),
            "the camera status, the discovery list and every state republished after it",
            unless=self.problem,
        )
        self.check_healthy()
        return before


@contextmanager
def agent_under_test(model, engine, broker, video, caplog):
    under_test = AgentUnderTest(broker, agent_config(model, broker, video, mqtt=UNLIMITED_ASKS), engine, caplog)
    try:
        under_test.start()
        yield under_test
    finally:
        under_test.close()


# -- hostile ask requests -----------------------------------------------------------------------------------

hostile_texts = st.text(st.characters(exclude_categories=()), max_size=40)
"""Any code points, lone surrogates and U+0000 included (json.dumps escapes them, so the JSON stays valid)."""
huge_texts = st.integers(1, 6_000).map(lambda n: "\U0001f642" * n)
"""Up to 6,000 emoji: 72 KB once JSON-escaped, so below and beyond the 16 KiB cap."""
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | hostile_texts
    | huge_texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_texts, inner, max_size=4),
    max_leaves=8,
)


def levels(count: int) -> str:
    return "/".join(["reply"] * count)


ODD_TOPICS = [
    "reply/\ud800",
    "\udfff",
    "reply/a\x00b",
    "\x00",
    "reply/\x01",
    "reply/\x7f",
    "reply/\x85",
    "reply/\uffff",
    "reply/+",
    "reply/#",
    "+",
    "#",
    "$SYS/reply",
    "$share/group/reply",
    "/",
    "reply/",
    " ",
    "reply//x",
    ASK_TOPIC,
    AVAILABILITY_TOPIC,
    HA_STATUS_TOPIC,
    levels(201),
    levels(300),
    "reply/" + "x" * 20_000,
]
reply_topics = (
    st.just("reply/plain")
    | st.sampled_from(ODD_TOPICS)
    | hostile_texts
    | st.integers(1, 400).map(levels)
    | st.integers(1, 20_000).map(lambda n: "reply/" + "x" * n)
)
"""Mostly topics the agent cannot reply to; a plain one often enough that the correlation rules are checked."""
options = (
    st.lists(hostile_texts | st.sampled_from(["red", "\U0001f642", "\U0001f642" * 60, "long " * 100]), max_size=40)
    | json_values
)
long_options = st.lists(
    st.integers(0, 500).map(lambda length: "word " * (length // 5)) | hostile_texts, min_size=1, max_size=32
).map(lambda words: [f"option {i} {w}" for i, w in enumerate(words)])
"""Up to 32 distinct options of up to 500 characters: as many as a request may carry, within its 16 KiB."""
correlation_data = (
    st.none()
    | st.binary(max_size=64)
    | st.integers(1, 8_000).map(lambda n: b"\xff" * n)
    | st.sampled_from([MAX_CORRELATION_BYTES, MAX_CORRELATION_BYTES + 1]).map(lambda n: b"c" * n)
)
"""MQTT 5 `CorrelationData`: none, any bytes, far beyond the bound, and UTF-8 text just within and just beyond it."""
correlation_ids_at_the_bounds = st.sampled_from([math.nan, math.inf, -math.inf]) | st.sampled_from(
    [MAX_CORRELATION_BYTES - 2, MAX_CORRELATION_BYTES - 1]
).map(lambda n: "c" * n)
"""Not strict JSON (`json.dumps` writes them as `NaN` or `Infinity`, which `json.loads` reads back), and strings
whose JSON text is just within and just beyond the bound."""
questions = (
    st.sampled_from(["Is the door open?", "What colour is the cup?", "How many people are there?"])
    | hostile_texts
    | st.text(max_size=600)
    | json_values
)
request_fields = st.fixed_dictionaries(
    {"question": questions},
    optional={
        "type": st.sampled_from([*KINDS, "", "multi"]) | json_values,
        "options": options,
        "max_new_tokens": st.integers(-5, 300) | json_values,
        "reply_to": reply_topics | json_values,
        "correlation_id": json_values | correlation_ids_at_the_bounds,
        "padding": st.integers(0, MAX_REQUEST_BYTES).map(lambda n: "x" * n),
    },
)
choice_fields = st.fixed_dictionaries(
    {
        "question": st.just("What colour is the cup?"),
        "type": st.just("choice"),
        "options": long_options,
        "reply_to": st.just("reply/choice"),
    }
)
PATHOLOGICAL_JSON = [
    b'{"question": "Is the door open?", "max_new_tokens": ' + b"9" * 5_000 + b"}",  # int beyond 4,300 digits
    b"[" * 10_000,  # nesting beyond the recursion limit
    b'{"question": ' * 3_000,
    b'{"question": "Is the door open?", "reply_to": "reply/x"',  # truncated
]


def invalid_utf8(payload: bytes) -> bytes:
    middle = len(payload) // 2
    return payload[:middle] + b"\xff\xc0" + payload[middle:]


@dataclass(frozen=True)
class AskCase:
    """One request as a hostile requester sends it."""

    protocol: str
    payload: bytes
    retain: bool
    response_topic: str | None = None
    """MQTT 5 `ResponseTopic` (None: not set)."""
    correlation: bytes | None = None
    """MQTT 5 `CorrelationData` (None: not set)."""

    def send(self, broker) -> None:
        """From a fresh client of its protocol, as a client that comes, asks and goes."""
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if self.protocol == "5" else mqtt.MQTTv311
        )
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            info = client.publish(ASK_TOPIC, self.payload, qos=1, retain=self.retain, properties=self._properties())
            info.wait_for_publish(WAIT_TIMEOUT_S)
            assert info.is_published(), "the broker did not take the request"
        finally:
            client.disconnect()
            client.loop_stop()

    def expected_reply(self) -> ExpectedReply | None:
        if self.forwarded_packet_bytes() > MAX_INCOMING_PACKET_BYTES:
            return None  # the agent announced this maximum: the broker drops the request, nobody replies
        return expected_reply(self.payload, self.response_topic, self.correlation)

    def forwarded_packet_bytes(self) -> int:
        """The size of the PUBLISH packet the broker forwards to the agent (an MQTT 5 client): fixed header,
        topic, packet id, properties (the response topic and correlation data, if any) and payload."""
        properties = sum(3 + len(value) for value in (self.response_topic_bytes(), self.correlation) if value)
        remaining = 2 + len(ASK_TOPIC.encode()) + 2 + varint_bytes(properties) + properties + len(self.payload)
        return 1 + varint_bytes(remaining) + remaining

    def response_topic_bytes(self) -> bytes | None:
        return None if self.response_topic is None else self.response_topic.encode("utf-8", "surrogatepass")

    def _properties(self) -> Properties | None:
        if self.response_topic is None:
            return None
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = self.response_topic
        if self.correlation is not None:
            properties.CorrelationData = self.correlation
        return properties


@st.composite
def ask_cases(draw) -> AskCase:
    fields = draw(request_fields | choice_fields)
    payload = draw(st.sampled_from(["json", "invalid utf-8", "any json", "pathological", "bytes"]))
    encoded = {
        "json": lambda: json.dumps(fields).encode(),
        "invalid utf-8": lambda: invalid_utf8(json.dumps(fields).encode()),
        "any json": lambda: json.dumps(draw(json_values)).encode(),
        "pathological": lambda: draw(st.sampled_from(PATHOLOGICAL_JSON)),
        "bytes": lambda: draw(st.binary(max_size=300)),
    }[payload]()
    protocol = draw(st.sampled_from(["5", "3.1.1"]))
    case = AskCase(protocol, encoded, retain=draw(st.booleans()))
    if protocol == "5" and draw(st.booleans()):
        response_topic = draw(reply_topics.filter(sendable_as_property))
        case = AskCase(protocol, encoded, case.retain, response_topic, draw(correlation_data))
    return case


@dataclass(frozen=True)
class ExpectedReply:
    topic: str
    correlation: bytes | None
    """The `CorrelationData` the reply must carry (MQTT 5), or None."""
    correlation_id: object
    """The `correlation_id` the reply's JSON must carry (as sent, any JSON value), or None."""
    correlation_refused: bool = False
    """The request's correlation is beyond what the agent echoes: the reply is an error carrying none."""


def varint_bytes(value: int) -> int:
    """How many bytes MQTT's variable byte integer takes for `value`."""
    return 1 if value < 128 else 2 if value < 16_384 else 3 if value < 2_097_152 else 4


def expected_reply(
    payload: bytes, response_topic: str | None = None, correlation: bytes | None = None
) -> ExpectedReply | None:
    """Where the agent must reply: the MQTT 5 properties if set, else `reply_to` in a request it can read
    (a JSON object within the size cap); None when the request names no reply topic the broker delivers."""
    if response_topic is not None:
        try:
            correlation_id = None if correlation is None else correlation.decode("utf-8")
        except UnicodeDecodeError:
            correlation_id = None  # not text: only the property can carry it as sent
        too_long = correlation is not None and len(correlation) > MAX_CORRELATION_BYTES
        expected = ExpectedReply(response_topic, correlation, correlation_id, correlation_refused=too_long)
    else:
        fields = readable_request(payload)
        if fields is None or not isinstance(fields.get("reply_to"), str):
            return None
        correlation_id = fields.get("correlation_id")
        expected = ExpectedReply(
            fields["reply_to"], None, correlation_id, correlation_refused=not echoable_correlation_id(correlation_id)
        )
    return expected if deliverable(expected.topic) else None


def echoable_correlation_id(correlation_id: object) -> bool:
    """Whether the agent echoes a JSON `correlation_id`: strict JSON (no NaN or infinities, which
    `json.loads` takes from a request) of at most `MAX_CORRELATION_BYTES` as JSON text."""
    try:
        return len(json.dumps(correlation_id, allow_nan=False)) <= MAX_CORRELATION_BYTES
    except (ValueError, RecursionError):  # NaN or an infinity; nested deeper than the encoder goes
        return False


def readable_request(payload: bytes) -> dict | None:
    if len(payload) > MAX_REQUEST_BYTES:
        return None
    try:
        fields = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return fields if isinstance(fields, dict) else None


def check_reply(replies: list[Seen], expected: ExpectedReply) -> None:
    """Exactly one reply: an answer or a one-line error, with the correlation echoed as sent; or, for a
    correlation beyond the agent's bounds, an error echoing none of it."""
    assert len(replies) == 1, f"{len(replies)} replies on {expected.topic[:80]!r}, not one"
    body = json.loads(replies[0].payload)
    assert isinstance(body, dict) and ("answer" in body) != ("error" in body), body
    if "error" in body:
        assert isinstance(body["error"], str) and body["error"] and "\n" not in body["error"], body
    if expected.correlation_refused:
        assert "error" in body, f"a request with correlation beyond the bounds was answered: {body}"
        assert replies[0].correlation is None and "correlation_id" not in body, "the refused correlation was echoed"
        return
    if expected.correlation is not None:
        assert replies[0].correlation == expected.correlation, "CorrelationData not echoed as sent"
    if expected.correlation_id is not None:
        assert body.get("correlation_id") == expected.correlation_id, "correlation_id not echoed as sent"


def test_any_ask_request_is_answered_or_refused_and_the_agent_stays_connected_and_answers_the_next(
    tiny_llava_int8, tiny_engine, broker, static_video, caplog
):
    with agent_under_test(tiny_llava_int8, tiny_engine, broker, static_video, caplog) as under_test:
        under_test.check_healthy()
        warmed_up_mib = rss_mib()
        growth_by_example: list[tuple[float, AskCase]] = []

        @settings(max_examples=100, deadline=None)
        @given(case=ask_cases())
        def round_trip(case: AskCase):
            under_test.begin_example()
            before_mib = rss_mib()
            case.send(broker)
            under_test.check_healthy()  # replies go out in order: the request's came before
            growth_by_example.append((rss_mib() - before_mib, case))
            expected = case.expected_reply()
            if expected is not None:
                check_reply(under_test.watcher.on(expected.topic), expected)
            under_test.passed()

        round_trip()
        grown = rss_mib() - warmed_up_mib
    most, culprit = max(growth_by_example, key=lambda growth: growth[0])
    assert grown < RUN_GROWTH_LIMIT_MIB, (
        f"the process grew by {grown:.0f} MiB over all examples; by {most:.0f} MiB at most in one, on {culprit!r:.300}"
    )


# -- hostile retained messages on the topics the agent reads back ----------------------------------------

OWN_GONE_CONFIG = f"homeassistant/sensor/{AGENT}_gone/config"
config_topics = (
    st.sampled_from(
        [
            OWN_GONE_CONFIG,
            f"homeassistant/binary_sensor/{AGENT}_door_open/config",
            *FOREIGN_CONFIGS,
            "homeassistant/#",
            "#",
            "+/+/+/config",
            "homeassistant/sensor/+/config",
            "$SYS/broker/uptime",
            "a",
            "",
            "x\x00y",
            "\ud800",
            "a\x01",
            levels(300),
            HA_STATUS_TOPIC,
            AVAILABILITY_TOPIC,
        ]
    )
    | hostile_texts
)
discovery_lists = st.one_of(
    st.lists(config_topics | json_values, max_size=8).map(lambda topics: json.dumps(topics).encode()),
    (config_topics | json_values).map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=64),
)
ha_statuses = st.sampled_from([b"online", b"offline", b""]) | st.binary(max_size=32)
retained_asks = st.one_of(
    st.fixed_dictionaries(
        {
            "question": st.sampled_from(["Is the door open?", "What colour is the cup?"]),
            "reply_to": st.sampled_from(["reply", "reply/\ud800", "reply/\x00", "reply/+", "reply/\x01"]).map(
                lambda topic: RETAINED_REPLY_PREFIX + topic
            ),
        },
        optional={"correlation_id": json_values, "type": st.sampled_from(list(KINDS))},
    ).map(lambda fields: json.dumps(fields).encode()),
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
)


def agent_may_publish_on(topic: str) -> bool:
    """The agent's own topics, the configs it announces or removes, and the probes' reply topics."""
    return (
        topic.startswith((f"{ROOT}/", "probe/")) or bool(OWN_CONFIG_TOPIC.fullmatch(topic)) or topic == HA_STATUS_TOPIC
    )  # published by the test


def test_any_retained_discovery_list_or_ha_status_leaves_foreign_configs_alone_and_the_agent_republishing(
    tiny_llava_int8, tiny_engine, make_broker, static_video, caplog
):
    with agent_under_test(
        tiny_llava_int8, tiny_engine, make_broker(persistence=True), static_video, caplog
    ) as under_test:
        watcher = under_test.watcher

        @settings(max_examples=MAX_RECONNECT_EXAMPLES, deadline=None)
        @given(discovery=discovery_lists, ha_status=ha_statuses)
        def reconnect_with(discovery: bytes, ha_status: bytes):
            under_test.begin_example(fresh_agent=True)
            for topic, config in FOREIGN_CONFIGS.items():
                watcher.publish(topic, config, retain=True)
            watcher.sync()
            watcher.reset()
            under_test.reconnect_with_retained({DISCOVERY_TOPIC: discovery, HA_STATUS_TOPIC: ha_status})
            foreign = sorted(topic for topic in watcher.live_topics() if not agent_may_publish_on(topic))
            assert not foreign, f"the agent published on topics not its own: {foreign}"
            watcher.sync()  # the configs the broker sent again when the watcher subscribed after the restart
            for topic, config in FOREIGN_CONFIGS.items():
                kept = [m.payload for m in watcher.on(topic) if m.retain][-1:]
                assert kept == [config], f"{topic} did not survive the reconnect as it was: {kept}"
            under_test.passed()

        reconnect_with()


def test_a_retained_ask_is_answered_when_sent_and_never_again_after_a_reconnect(
    tiny_llava_int8, tiny_engine, make_broker, static_video, caplog
):
    with agent_under_test(
        tiny_llava_int8, tiny_engine, make_broker(persistence=True), static_video, caplog
    ) as under_test:

        @settings(max_examples=MAX_RECONNECT_EXAMPLES, deadline=None)
        @given(ask=retained_asks)
        def reconnect_with(ask: bytes):
            under_test.begin_example(fresh_agent=True)
            before_reconnect = under_test.reconnect_with_retained({ASK_TOPIC: ask})
            expected = expected_reply(ask)
            if expected is not None:
                replies = under_test.watcher.on(expected.topic)
                check_reply([reply for reply in replies if reply.seq <= before_reconnect], expected)
            answered_again = {
                topic
                for topic in under_test.watcher.live_topics(after=before_reconnect)
                if topic.startswith(RETAINED_REPLY_PREFIX)
            }
            assert not answered_again, f"the retained ask was answered again after the reconnect: {answered_again}"
            under_test.passed()

        reconnect_with()


# -- hostile control commands ------------------------------------------------------------------------------

command_topics = st.sampled_from(
    [
        f"{ROOT}/enabled/door_open/set",
        f"{ROOT}/enabled/gone/set",
        f"{ROOT}/check",
        f"{ROOT}/check/door_open",
        f"{ROOT}/check/gone",
    ]
) | hostile_texts.filter(
    lambda text: all(deliverable_char(char) for char in text) and "+" not in text and "#" not in text
).map(lambda text: f"{ROOT}/check/{text}")
command_payloads = (
    st.sampled_from([b"ON", b"OFF", b"PRESS", b"on", b"press", b"ON\x00", b""])
    | st.binary(max_size=300)
    | st.integers(1, 60_000).map(lambda n: b"PRESS" * (n // 5))
)


def test_any_message_on_the_command_topics_leaves_the_agent_connected_answering_and_on_its_own_topics(
    tiny_llava_int8, tiny_engine, broker, static_video, caplog
):
    with agent_under_test(tiny_llava_int8, tiny_engine, broker, static_video, caplog) as under_test:
        watcher = under_test.watcher

        @settings(max_examples=40, deadline=None)
        @given(topic=command_topics, payload=command_payloads, retain=st.booleans())
        def send_command(topic: str, payload: bytes, retain: bool):
            under_test.begin_example()
            watcher.publish(topic, payload, retain=retain)
            try:
                under_test.check_healthy()
            finally:
                if retain:
                    watcher.publish(topic, b"", retain=True)
            foreign = sorted(topic for topic in watcher.live_topics() if not agent_may_publish_on(topic))
            assert not foreign, f"the agent published on topics not its own: {foreign}"
            under_test.passed()

        send_command()
