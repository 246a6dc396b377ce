"""The agent's MQTT link (paho-mqtt 2.x): availability, answers, discovery and ask requests.

`AgentLink` is the service's only view of MQTT. paho's network thread (`loop_start`) owns the socket
and reconnects with backoff; `AgentLink` keeps what must survive a reconnect: the latest answer of
every question, a bounded queue of answers made while offline, the entities to announce. On every
connect it publishes `online`, the discovery configs, the queued answers, and the latest answer of
every other question, because the broker may have lost its retained messages.

Nothing here blocks the caller: publishing hands the message to paho's queue. The paho callbacks
only update state and publish; an exception in one is logged (it would kill paho's thread).
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import ssl
import sys
import threading
import time
import uuid
from collections import deque
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import MqttSettings
from edge_agent.errors import UserError
from edge_agent.mqtt.ask import (
    AskRefusal,
    AskReply,
    AskRequest,
    BadRequest,
    ReceivedAsk,
    Refusal,
    ReplyAddress,
    evidence_topic,
    reply_message,
    request_message,
)
from edge_agent.mqtt.commands import (
    BadCommand,
    Command,
    check_all_config,
    command_subscriptions,
    control_configs,
    enabled_topic,
    parse_command,
)
from edge_agent.mqtt.discovery import (
    EntitySpec,
    config_payload,
    config_topic,
    diagnostic_configs,
    evidence_configs,
    evidence_question,
    read_announced,
    status_topic,
)
from edge_agent.mqtt.ratelimit import RequestRateLimit
from edge_agent.mqtt.topics import (
    OFFLINE,
    ONLINE,
    AgentTopics,
    AnswerMessage,
    answer_payload,
    check_id,
    latency_payload,
    state_payload,
    topic_problem,
)
from edge_agent.questions import OFF, ON

logger = logging.getLogger(__name__)

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
TAKEOVER_BACKOFF_MIN_S = 10
TAKEOVER_BACKOFF_MAX_S = 300
"""After another client took over the agent's client id, wait this long before connecting again: the
minimum, doubled with every takeover in a row, up to the maximum."""
SESSION_TAKEN_OVER = 142
"""MQTT 5 reason code of the broker's DISCONNECT when another client connected with the same client id."""
QUICK_DISCONNECT_S = 30.0
QUICK_DISCONNECTS_FOR_TAKEOVER = 2
"""With MQTT 3.1.1 the broker just closes the connection of a client whose id another client took: this
many closes in a row, each within `QUICK_DISCONNECT_S` of connecting, count as a takeover."""
STOP_TIMEOUT_S = 2.0
"""How long `stop()` waits for the broker to acknowledge `offline`."""
HA_RESEND_MIN_S = 10.0
"""Least time between two resends of discovery and states that Home Assistant's `online` asks for."""
MAX_INCOMING_PACKET_BYTES = 64 * 1024
"""MQTT 5: the broker does not forward the agent a larger message (it drops it), so a huge ask request
never reaches the agent's memory. Requests are refused above 16 KiB anyway; the agent's own retained
discovery list must fit too."""

__all__ = ["AgentLink", "AnswerMessage", "EntitySpec", "ask_remote", "new_client"]


def new_client(settings: MqttSettings, client_id: str) -> mqtt.Client:
    """A paho client with the protocol, credentials and TLS of `settings`, not yet connected.

    The password is read from `settings.password_file` here, so no settings object ever holds it."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=PROTOCOLS[settings.protocol])
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password())
    if settings.tls_ca_file:
        try:
            client.tls_set(ca_certs=settings.tls_ca_file)
        except OSError as error:
            raise UserError(f"mqtt.tls_ca_file {settings.tls_ca_file}: {error}") from None
        client.tls_insecure_set(settings.tls_insecure)
    return client


def _guarded(callback: Callable[..., None]) -> Callable[..., None]:
    """Log an exception from a paho callback instead of letting it kill paho's network thread."""

    @functools.wraps(callback)
    def guarded(*args: object) -> None:
        try:
            callback(*args)
        except Exception:
            logger.exception("error in MQTT callback %s", callback.__name__)

    return guarded


class AgentLink:
    """Publishes one agent's availability, answers and entities, and receives its ask requests.

    `on_ask` is called on paho's network thread: it must only enqueue the request (the service
    answers it on its own thread and calls `reply`). `on_refused`, on the same thread, hears the reason
    of every request the link refuses itself (rate limit, invalid request), with or without a reply.
    `on_command`, on the same thread too, gets every valid control command (`mqtt/commands.py`) within the
    rate limit, and must only enqueue it; with it the link subscribes to the command topics and announces
    each question's switch and button.
    """

    def __init__(
        self,
        settings: MqttSettings,
        agent_id: str,
        on_ask: Callable[[AskRequest], None] | None = None,
        model_name: str = "",
        *,
        on_refused: Callable[[Refusal], None] | None = None,
        on_command: Callable[[Command], None] | None = None,
    ):
        self._settings = settings
        self._topics = AgentTopics(settings.base_topic, agent_id)
        self._on_ask = on_ask
        self._on_refused = on_refused
        self._on_command = on_command
        self._model_name = model_name
        self._lock = threading.Lock()
        self._connected = False
        self._stopping = False
        self._latest: dict[str, AnswerMessage] = {}
        self._evidence: dict[str, bytes] = {}  # question id -> its latest image, sent again after a reconnect
        self._evidence_on = False
        self._last_sent: dict[str, tuple[AnswerMessage, float]] = {}
        self._pending: deque[AnswerMessage] = deque()
        self._dropped = 0
        self._dropped_offline = 0
        self._camera_online: dict[str | None, bool] = {}  # camera id (None: the single form's) -> online
        self._configs: dict[str, bytes] | None = None
        self._question_ids: frozenset[str] = frozenset()
        self._enabled: dict[str, bool] = {}
        self._announced: set[str] = set()
        self._connected_since = 0.0
        self._quick_disconnects = 0
        self._takeovers = 0
        self._ask_limit = RequestRateLimit(settings.ask_per_minute, settings.ask_burst)
        self._retained_ask_seen = False
        self._command_limit = RequestRateLimit(settings.ask_per_minute, settings.ask_burst)
        self._handlers = {
            self._topics.ask: self._handle_ask,
            status_topic(settings.discovery_prefix): self._handle_ha_status,
            self._topics.discovery: self._handle_announced,
        }
        self._last_ha_resend: float | None = None
        self._client_id = settings.client_id_for(agent_id)
        self._client = self._build_client(self._client_id)

    def _build_client(self, client_id: str) -> mqtt.Client:
        client = new_client(self._settings, client_id)
        client.will_set(self._topics.availability, OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.on_connect = _guarded(self._on_connect)
        client.on_connect_fail = _guarded(self._on_connect_fail)
        client.on_disconnect = _guarded(self._on_disconnect)
        client.on_message = _guarded(self._on_message)
        return client

    # --- the service's side -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def queued(self) -> int:
        """Answers waiting for the broker (a metric)."""
        return len(self._pending)

    @property
    def dropped(self) -> int:
        """Answers dropped because the queue was full, since start (a metric)."""
        return self._dropped

    def start(self) -> None:
        """Connect in the background; while the broker is unreachable paho retries with backoff."""
        self._client.connect_async(
            self._settings.host,
            self._settings.port,
            self._settings.keepalive_s,
            properties=self._connect_properties(),
        )
        self._client.loop_start()

    def _connect_properties(self) -> Properties | None:
        if self._settings.protocol != "5":
            return None
        properties = Properties(PacketTypes.CONNECT)
        properties.MaximumPacketSize = MAX_INCOMING_PACKET_BYTES
        return properties

    def stop(self) -> None:
        """Publish `offline`, disconnect cleanly (so the last will is not sent) and stop paho's thread."""
        self._stopping = True
        if self._connected:
            info = self._client.publish(self._topics.availability, OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(STOP_TIMEOUT_S)
            except RuntimeError:
                logger.warning("MQTT: could not publish 'offline' before disconnecting")
        self._client.disconnect()
        self._client.loop_stop()

    def set_entities(
        self, entities: list[EntitySpec], evidence: bool = False, cameras: tuple[str | None, ...] = (None,)
    ) -> None:
        """Announce these entities (and only these) and the diagnostic ones of the agent and of its `cameras` (ids
        of `cameras:`, or None for the single form's camera) to Home Assistant, now or on the next connect; with
        discovery off, announce none.

        Entities announced earlier, by this run or a previous one (remembered in the retained
        `<base>/<agent>/discovery` topic), that are not announced now get an empty retained config: those of
        questions that are gone, and all of them once discovery is turned off. With `evidence`, each question
        also has an image entity showing its evidence image; without it, image entities announced before go.
        """
        for entity in entities:
            check_id("question id", entity.question_id)
        prefix, topics = self._settings.discovery_prefix, self._topics
        # The agent's own entities first: Home Assistant links a camera's device to the agent's (`via_device`)
        # only if the agent's device exists when the camera's is created.
        configs = diagnostic_configs(prefix, topics, self._model_name, cameras)
        configs.update(
            {config_topic(prefix, topics.agent_id, e): config_payload(e, topics, self._model_name) for e in entities}
        )
        configs.update(self._controls_of(entities))
        if evidence:
            configs.update(evidence_configs(prefix, topics, self._model_name, entities))
        with self._lock:
            self._configs = configs if self._settings.discovery else {}
            self._question_ids = frozenset(entity.question_id for entity in entities)
            self._evidence_on = evidence
            if self._connected:
                self._announce()
                self._empty_images_when_off()

    def _controls_of(self, entities: list[EntitySpec]) -> dict[str, bytes]:
        """Config topic -> discovery config of every control: none without a command handler."""
        if self._on_command is None:
            return {}
        prefix, model = self._settings.discovery_prefix, self._model_name
        configs = check_all_config(self._topics, prefix, model)
        for entity in entities:
            configs.update(control_configs(entity, self._topics, prefix, model))
        return configs

    def publish_answer(self, msg: AnswerMessage, force: bool = False) -> None:
        """Publish `msg` if it tells something new (`AnswerMessage.news`), the heartbeat is due or `force` (a
        check-now) says so; queue it while offline."""
        with self._lock:
            self._latest[msg.question_id] = msg
            now = time.monotonic()
            if not (force or self._is_due(msg, now)):
                return
            self._last_sent[msg.question_id] = (msg, now)
            if self._connected:
                self._send_answer(msg)
            else:
                self._enqueue(msg)

    def publish_evidence(self, question_id: str, jpeg: bytes) -> None:
        """Publish the image behind the question's state (retained, and again after every reconnect)."""
        with self._lock:
            self._evidence[question_id] = jpeg
            if self._connected:
                self._send_evidence(question_id)

    def publish_ask_evidence(self, request: AskRequest, jpeg: bytes) -> str | None:
        """Publish the image an ask was answered on next to its reply address (not retained); return the topic,
        or None when there is none the agent may publish to. Sent before the reply, on the same connection."""
        topic = evidence_topic(request.reply)
        if topic is not None:
            self._publish(topic, jpeg, retain=False)
        return topic

    def publish_camera(self, online: bool, camera: str | None = None) -> None:
        """Publish whether frames are arriving from a camera (retained, and again after every reconnect): one of
        `cameras:` by its id, or the single form's camera (None)."""
        with self._lock:
            self._camera_online[camera] = online
            if self._connected:
                self._send_camera(camera)

    def publish_enabled(self, question_id: str, enabled: bool) -> None:
        """Publish whether a question is enabled (retained, and again after every reconnect)."""
        with self._lock:
            self._enabled[question_id] = enabled
            if self._connected:
                self._send_enabled(question_id)

    def reply(self, request: AskRequest, message: AskReply | AskRefusal) -> None:
        """Send the answer to an ask request, or its refusal, to its reply address."""
        self._send_reply(request.reply, message)

    # --- decisions and sends (called with the lock held) --------------------------------------

    def _is_due(self, msg: AnswerMessage, now: float) -> bool:
        if msg.question_id not in self._last_sent:
            return True
        previous, sent_at = self._last_sent[msg.question_id]
        changed = previous.news != msg.news
        heartbeat = self._settings.heartbeat_s
        return changed or (heartbeat > 0 and now - sent_at >= heartbeat)

    def _enqueue(self, msg: AnswerMessage) -> None:
        if len(self._pending) >= self._settings.queue_limit:
            self._pending.popleft()
            self._dropped += 1
            self._dropped_offline += 1
            if self._dropped_offline == 1:
                logger.warning(
                    "MQTT offline and %d answers queued: dropping the oldest from now on",
                    self._settings.queue_limit,
                )
        self._pending.append(msg)

    def _publish(
        self, topic: str, payload: bytes | str, retain: bool = True, properties: Properties | None = None
    ) -> None:
        """Hand a message to paho, or drop it with one log line if it cannot be published.

        Nothing paho refuses may escape into the caller (the service's loop, a paho callback), and a
        topic the broker refuses must never reach paho's queue: the broker would drop the connection
        and paho would send the message again after every reconnect.
        """
        problem = topic_problem(topic)
        if problem is None:
            try:
                self._client.publish(topic, payload, qos=self._settings.qos, retain=retain, properties=properties)
                return
            except ValueError as error:  # paho's own checks (payload size, ...)
                problem = str(error)
        logger.warning("MQTT: not publishing to %.60r: the topic %s", topic, problem)

    def _send_answer(self, msg: AnswerMessage) -> None:
        self._publish(self._topics.answers(msg.question_id), answer_payload(msg))
        self._publish(self._topics.state(msg.question_id), state_payload(msg))
        self._publish(self._topics.latency, latency_payload(msg))

    def _empty_images_when_off(self) -> None:
        """With evidence off, empty the retained image of every question: a camera image left on the broker
        by an earlier run would stay readable there after the installer turned evidence off."""
        if not self._evidence_on:
            for question_id in sorted(self._question_ids):
                self._publish(self._topics.evidence(question_id), b"")

    def _send_evidence(self, question_id: str) -> None:
        self._publish(self._topics.evidence(question_id), self._evidence[question_id])

    def _send_camera(self, camera: str | None) -> None:
        self._publish(self._topics.camera_status(camera), ONLINE if self._camera_online[camera] else OFFLINE)

    def _send_enabled(self, question_id: str) -> None:
        self._publish(enabled_topic(self._topics, question_id), ON if self._enabled[question_id] else OFF)

    def _send_reply(self, reply: ReplyAddress, message: AskReply | AskRefusal) -> None:
        body, properties = reply_message(reply, message)
        self._publish(reply.topic, body, retain=False, properties=properties)

    def _announce(self) -> None:
        """Publish every entity's config, empty the configs of gone ones, and remember the set."""
        if self._configs is None:
            return
        for topic, config in self._configs.items():
            self._publish(topic, config)
        self._forget_gone_entities()
        self._publish_announced()

    def _forget_gone_entities(self) -> None:
        """Empty the configs of entities announced before and not now, and the retained image of a question that
        is gone (a camera image would otherwise stay readable on the broker with nothing showing it)."""
        why = "its question or control is gone" if self._settings.discovery else "discovery is off"
        for topic in sorted(self._announced - self._configs.keys()):
            logger.info("MQTT discovery: removing %s (%s)", topic, why)
            self._publish(topic, b"")
            question_id = evidence_question(self._settings.discovery_prefix, self._topics.agent_id, topic)
            if question_id is not None and question_id not in self._question_ids:
                self._publish(self._topics.evidence(question_id), b"")
        self._announced = set(self._configs)

    def _publish_announced(self) -> None:
        """Remember what is announced in the retained list; clear the list when nothing is."""
        self._publish(self._topics.discovery, json.dumps(sorted(self._configs)) if self._configs else b"")

    def _resend_all(self) -> None:
        """After a (re)connect: queued answers in order, then the latest answer of every other question, and the
        latest evidence image of each question."""
        flushed = {}
        while self._pending:
            msg = self._pending.popleft()
            self._send_answer(msg)
            flushed[msg.question_id] = msg
        for question_id, msg in self._latest.items():
            if flushed.get(question_id) is not msg:
                self._send_answer(msg)
        for question_id in self._evidence:
            self._send_evidence(question_id)
        self._empty_images_when_off()
        for camera in self._camera_online:
            self._send_camera(camera)
        for question_id in self._enabled:
            self._send_enabled(question_id)

    # --- paho callbacks (network thread) ------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            logger.error(
                "MQTT broker %s:%d refused the connection: %s",
                self._settings.host,
                self._settings.port,
                reason_code,
            )
            return
        self._subscribe()
        with self._lock:
            self._connected = True
            self._connected_since = time.monotonic()
            self._resend_unacknowledged()
            if self._dropped_offline:
                logger.warning("MQTT: %d answers were dropped while offline", self._dropped_offline)
                self._dropped_offline = 0
            logger.info(
                "MQTT connected to %s:%d, sending %d queued answers",
                self._settings.host,
                self._settings.port,
                len(self._pending),
            )
            self._publish(self._topics.availability, ONLINE)
            self._announce()
            self._resend_all()

    def _resend_unacknowledged(self) -> None:
        """Publish again, first and in order, the messages the broker had not acknowledged when the
        connection broke.

        paho keeps unacknowledged QoS 1 and 2 messages and sends them again itself, but only after
        `on_connect` returns: after the newest answers, states and camera status this callback publishes.
        The retained message of a topic would then end older than the newest (seen when a hung broker is
        replaced by a fresh one). Taking the messages back from paho (`drop_out_messages`) and publishing
        them again here, before the newest values, keeps every one of them (answers published while the
        broker hung still reach their subscribers, at least once) and makes the newest value the last on
        each topic. Dropping the stale ones instead would lose those answers, and publishing the newest
        values again later (from a timer) would race paho's own re-sends.
        """
        for message in self._client.drop_out_messages():
            self._client.publish(message.topic, message.payload, message.qos, message.retain, message.properties)

    def _subscribe(self) -> None:
        """Ask requests, the list of announced entities (also with discovery off, which removes them all), and
        Home Assistant's status."""
        topics = [self._topics.discovery]
        if self._on_ask is not None:
            topics.append(self._topics.ask)
        if self._settings.discovery:
            topics.append(status_topic(self._settings.discovery_prefix))
        if self._on_command is not None:
            topics += command_subscriptions(self._topics)
        self._client.subscribe([(topic, self._settings.qos) for topic in topics])

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this while it handles the connection's exception: name the cause.
        logger.warning(
            "MQTT broker %s:%d: cannot connect (%s), retrying",
            self._settings.host,
            self._settings.port,
            connection_problem(sys.exc_info()[1]),
        )

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            was_connected, self._connected = self._connected, False
        if self._stopping:
            return
        if was_connected and self._taken_over(reason_code):
            self._back_off(reason_code)
            return
        if was_connected and self._takeovers:
            self._takeovers = 0
            self._client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        logger.warning("MQTT connection lost (%s), reconnecting", reason_code)

    def _taken_over(self, reason_code) -> bool:
        """Whether the broker ended the connection because another client connected with our client id.

        Two agents with one agent id (the default is the host name, so boxes cloned from one image share
        it) would otherwise take the id from each other every second, forever.
        """
        lasted = time.monotonic() - self._connected_since
        self._quick_disconnects = self._quick_disconnects + 1 if lasted < QUICK_DISCONNECT_S else 0
        return reason_code == SESSION_TAKEN_OVER or self._quick_disconnects >= QUICK_DISCONNECTS_FOR_TAKEOVER

    def _back_off(self, reason_code) -> None:
        """Say what clashes and how to fix it, and wait longer before each reconnect (paho waits; the
        callback does not)."""
        self._takeovers += 1
        delay = min(TAKEOVER_BACKOFF_MIN_S * 2 ** min(self._takeovers - 1, 10), TAKEOVER_BACKOFF_MAX_S)
        self._client.reconnect_delay_set(delay, delay)
        how = (
            ""
            if reason_code == SESSION_TAKEN_OVER
            else (
                f"the broker closed the connection {self._quick_disconnects} times in a row within "
                f"{QUICK_DISCONNECT_S:g} s of connecting: probably "
            )
        )
        logger.warning(
            "MQTT: %sanother client connected with client id %s (two agents with agent_id %s?); "
            "set agent_id or mqtt.client_id uniquely; backing off %d s",
            how,
            self._client_id,
            self._topics.agent_id,
            delay,
        )

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        handler = self._handlers.get(message.topic)
        if handler is not None:
            handler(message)
        elif self._on_command is not None:  # the only other subscriptions are the command topics
            self._handle_command(message)

    def _handle_command(self, message: mqtt.MQTTMessage) -> None:
        """Hand a valid, non-retained command within the rate limit to the service; ignore anything else
        with one debug line (the command topics are client input, see `mqtt/commands.py`)."""
        try:
            if message.retain:
                raise BadCommand("retained (it would come again on every reconnect)")
            command = parse_command(self._topics, message.topic, message.payload, self._question_ids)
            if not self._command_limit.allow(command.kind):
                raise BadCommand("over the rate limit")
        except BadCommand as bad:
            logger.debug("MQTT: ignoring the message on %.80r: %s", message.topic, bad.reason)
            return
        self._on_command(command)

    def _handle_ask(self, message: mqtt.MQTTMessage) -> None:
        """Drop a retained request; refuse a requester over its rate, then an invalid request; hand a
        valid one to the service.

        The rate is checked as soon as the reply address is known, before the rest of the request is
        checked or anything is logged, so a flood of invalid requests costs no more replies, log lines
        or work than a flood of valid ones.
        """
        if message.retain:
            self._drop_retained_ask()
            return
        received = ReceivedAsk(message.payload, getattr(message, "properties", None))
        if not self._within_rate(received.reply):
            return
        try:
            request = received.request()
        except BadRequest as error:
            logger.warning("MQTT: rejected an ask request: %s", error.reason)
            self._refuse(error.reply, error.refusal)
            return
        self._on_ask(request)

    def _drop_retained_ask(self) -> None:
        """A retained request reaches the agent again after every reconnect: it is never answered.

        (A request published with the retain flag to the subscribed agent arrives without it, and is
        answered once.) Said once at info level, then at debug level.
        """
        level = logging.DEBUG if self._retained_ask_seen else logging.INFO
        self._retained_ask_seen = True
        logger.log(
            level,
            "MQTT: ignoring the retained ask request on %s; clear it with an empty retained message",
            self._topics.ask,
        )

    def _within_rate(self, reply: ReplyAddress | None) -> bool:
        """Take one request from the requester's allowance (requests without a reply address share one)."""
        requester = reply.requester if reply is not None else ""
        if self._ask_limit.allow(requester):
            return True
        logger.debug("MQTT: ask request from %r over the rate limit", requester)
        limit = f"{self._settings.ask_per_minute:g} per minute, {self._settings.ask_burst} at once"
        self._refuse(reply, AskRefusal(Refusal.RATE_LIMITED, f"rate limit: at most {limit}; try again later"))
        return False

    def _refuse(self, reply: ReplyAddress | None, refusal: AskRefusal) -> None:
        """Report the refusal, and send it when the request named a usable reply address."""
        if self._on_refused is not None:
            self._on_refused(refusal.reason)
        if reply is not None:
            self._send_reply(reply, refusal)

    def _handle_ha_status(self, message: mqtt.MQTTMessage) -> None:
        """Home Assistant (re)started: send discovery and states again, at most once per `HA_RESEND_MIN_S`.

        Any client allowed to write the status topic can send `online`; without the bound each message
        would cost every config and state once more. A skipped resend loses nothing: configs and states are
        retained, so a Home Assistant subscribing now receives them from the broker.
        """
        if message.payload != ONLINE.encode():
            return
        now = time.monotonic()
        if self._last_ha_resend is not None and now - self._last_ha_resend < HA_RESEND_MIN_S:
            logger.debug("MQTT: Home Assistant 'online' again within %g s: not resending", HA_RESEND_MIN_S)
            return
        self._last_ha_resend = now
        logger.info("Home Assistant came online: sending discovery and states again")
        with self._lock:
            self._announce()
            self._resend_all()

    def _handle_announced(self, message: mqtt.MQTTMessage) -> None:
        """The retained list of announced config topics (from a previous run, or our own echo).

        Only this agent's own config topics are taken from it (see `read_announced`); the rest is ignored
        with one warning per message, and the agent's own list replaces it.
        """
        announced, problem = read_announced(
            message.payload, self._settings.discovery_prefix, self._topics.agent_id, MAX_INCOMING_PACKET_BYTES
        )
        if problem:
            logger.warning("MQTT: ignoring (part of) the list on %s: %s", message.topic, problem)
        with self._lock:
            self._announced |= announced
            if self._configs is None:
                return
            self._forget_gone_entities()
            if announced != set(self._configs):
                self._publish_announced()


def connection_problem(error: BaseException | None) -> str:
    """A short cause of a failed connection attempt, for a log line."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {error.verify_message}; check mqtt.tls_ca_file"
    if isinstance(error, ssl.SSLError):
        return f"TLS handshake failed: {error.reason or error}"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return "no details"


def ask_remote(settings: MqttSettings, agent_id: str, question: str, timeout_s: float) -> dict:
    """Ask a running agent a question over MQTT and return its JSON reply (`edge-agent ask`)."""
    topics = AgentTopics(settings.base_topic, agent_id)
    reply_topic = f"{topics.ask}/reply/{uuid.uuid4().hex}"
    client = new_client(settings, f"edge-agent-ask-{uuid.uuid4().hex[:12]}")
    ready: queue.Queue[str | None] = queue.Queue()
    replies: queue.Queue[bytes] = queue.Queue()

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            ready.put(f"the broker refused the connection: {reason_code}")
        else:
            client.subscribe(reply_topic, qos=1)

    client.on_connect = on_connect
    client.on_subscribe = lambda *args: ready.put(None)
    client.on_message = lambda client, userdata, message: replies.put(message.payload)
    broker = f"MQTT broker {settings.host}:{settings.port}"
    try:
        client.connect(settings.host, settings.port, settings.keepalive_s)
    except OSError as error:
        raise UserError(f"cannot reach {broker}: {error.strerror or error}") from None
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout_s
        _wait_until_subscribed(ready, broker, timeout_s)
        payload, properties = request_message(question, reply_topic)
        client.publish(topics.ask, payload, qos=settings.qos, properties=properties)
        try:
            answer = replies.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise UserError(f"no agent answered on {topics.ask} within {timeout_s:g} s") from None
    finally:
        client.disconnect()
        client.loop_stop()
    return json.loads(answer)


def _wait_until_subscribed(ready: queue.Queue, broker: str, timeout_s: float) -> None:
    try:
        problem = ready.get(timeout=timeout_s)
    except queue.Empty:
        raise UserError(f"{broker} did not accept the connection within {timeout_s:g} s") from None
    if problem is not None:
        raise UserError(f"{broker}: {problem}")
