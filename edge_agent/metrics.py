"""Prometheus metrics of the agent and the HTTP endpoint that serves them (loopback by default).

The agent's totals (`edge_agent_frames_total`, `edge_agent_scene_changes_total`, `edge_agent_encodes_total`,
`edge_agent_camera_up`) keep their names and count over all cameras; the `edge_agent_camera_*` series and the
latency histograms have a `camera` label: the camera's id, `camera` for the single `camera:` form.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

from edge_agent.config import is_loopback
from edge_agent.errors import UserError
from edge_agent.mqtt.ask import ASK_RESULTS

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9464"

STAGES = ("preprocess", "vision", "prefill", "decode", "total")
"""Inference stages timed in `edge_agent_stage_seconds{stage}`. `prefill` is the language model's pass over the
questions, which on a frame's first round also prefills its prompt prefix (image tokens); `total` is the
language model's part of one round, prefill and decode."""

# From 1 ms (preprocessing a frame) to 60 s (a whole frame on a slow box), about 2.5x apart.
STAGE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)


class Metrics:
    """Every metric the agent exports, in a registry of its own so that several can coexist (tests).

    Besides the agent's own metrics, the registry carries the standard `process_*` metrics (resident
    memory, CPU seconds, open files): a vision-language model's memory use is the first thing to watch.
    """

    def __init__(self):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.frames = Counter("edge_agent_frames", "Frames read from the camera.", registry=self.registry)
        self.scene_changes = Counter(
            "edge_agent_scene_changes",
            "Frames the scene gate found different enough to encode.",
            registry=self.registry,
        )
        self.encodes = Counter(
            "edge_agent_encodes",
            "Frames encoded (vision encoder and prompt prefix): scene changes, re-checks of a pending change and "
            "check-nows.",
            registry=self.registry,
        )
        self.inferences = Counter("edge_agent_inferences", "Frames run through the model.", registry=self.registry)
        self.answers_published = Counter(
            "edge_agent_answers_published", "Answers handed to MQTT for publishing.", registry=self.registry
        )
        self.ask_requests = Counter(
            "edge_agent_ask_requests",
            "Ad-hoc questions received over MQTT, by outcome.",
            ["result"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "edge_agent_stage_seconds",
            "Time spent per inference stage, in seconds.",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self.camera_up = Gauge(
            "edge_agent_camera_up", "1 while the camera delivers frames, else 0.", registry=self.registry
        )
        self.mqtt_connected = Gauge(
            "edge_agent_mqtt_connected", "1 while connected to the MQTT broker, else 0.", registry=self.registry
        )
        self.mqtt_queue_depth = Gauge(
            "edge_agent_mqtt_queue_depth", "Messages waiting to be sent to the broker.", registry=self.registry
        )
        self.mqtt_dropped = Gauge(
            "edge_agent_mqtt_dropped",
            "Answers dropped since start because the offline queue was full.",
            registry=self.registry,
        )
        self.camera_frames = Counter(
            "edge_agent_camera_frames", "Frames read, per camera.", ["camera"], registry=self.registry
        )
        self.camera_scene_changes = Counter(
            "edge_agent_camera_scene_changes",
            "Views the scene gate found changed and that were encoded, per camera.",
            ["camera"],
            registry=self.registry,
        )
        self.camera_encodes = Counter(
            "edge_agent_camera_encodes", "Views encoded, per camera.", ["camera"], registry=self.registry
        )
        self.camera_online = Gauge(
            "edge_agent_camera_online",
            "1 while the camera delivers frames, else 0.",
            ["camera"],
            registry=self.registry,
        )
        self.answer_latency = Histogram(
            "edge_agent_answer_latency_seconds",
            "Seconds from the capture of the frame an answer was computed on to its publishing, per camera.",
            ["camera"],
            buckets=STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "edge_agent_queue_wait_seconds",
            "Seconds from the capture of a frame to the start of its encode (waiting for the inference loop), "
            "per camera.",
            ["camera"],
            buckets=STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self._cameras_online: dict[str, bool] = {}
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for result in ASK_RESULTS:
            self.ask_requests.labels(result=result)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def add_cameras(self, camera_ids: list[str]) -> None:
        """Show every camera's series from the start (at 0), so a camera that never delivers is visible."""
        for camera_id in camera_ids:
            for labelled in (self.camera_frames, self.camera_scene_changes, self.camera_encodes, self.camera_online):
                labelled.labels(camera=camera_id)
            self.answer_latency.labels(camera=camera_id)
            self.queue_wait.labels(camera=camera_id)

    def frame(self, camera_id: str) -> None:
        """A camera delivered a new frame to the inference loop."""
        self.frames.inc()
        self.camera_frames.labels(camera=camera_id).inc()

    def encode(self, camera_id: str, scene_change: bool, waited_s: float) -> None:
        """A view of the camera was encoded, `waited_s` after its frame was captured."""
        self.encodes.inc()
        self.camera_encodes.labels(camera=camera_id).inc()
        self.queue_wait.labels(camera=camera_id).observe(max(0.0, waited_s))
        if scene_change:
            self.scene_changes.inc()
            self.camera_scene_changes.labels(camera=camera_id).inc()

    def answered(self, camera_id: str, latency_s: float) -> None:
        """An answer about the camera's view was published, `latency_s` after its frame was captured."""
        self.answers_published.inc()
        self.answer_latency.labels(camera=camera_id).observe(max(0.0, latency_s))

    def camera_status(self, camera_id: str, online: bool) -> None:
        """A camera went online or offline: `edge_agent_camera_up` is 1 while every camera delivers frames."""
        self.camera_online.labels(camera=camera_id).set(1 if online else 0)
        self._cameras_online[camera_id] = online
        self.camera_up.set(1 if all(self._cameras_online.values()) else 0)

    def observe_stages(self, seconds_by_stage: Mapping[str, float]) -> None:
        """Record one frame's stage timings, e.g. `{"vision": 0.9, "decode": 1.0, "total": 3.1}`."""
        unknown = set(seconds_by_stage) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown inference stages {sorted(unknown)}; known: {', '.join(STAGES)}")
        for stage, seconds in seconds_by_stage.items():
            self.stage_seconds.labels(stage=stage).observe(seconds)

    def serve(self, listen: str = DEFAULT_LISTEN) -> int:
        """Serve the metrics over HTTP at `listen` ("host:port", "[v6]:port"); return the bound port.

        Port 0 picks a free port. A non-loopback address is allowed but logged: the endpoint has no
        authentication, and the unit's IPAddressAllow= must open it too.
        """
        host, port = parse_listen(listen)
        if not is_loopback(host):
            log.warning("metrics.listen %s is reachable from the network: the endpoint has no authentication", listen)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise UserError(f"metrics.listen {listen!r}: cannot listen there ({error.strerror or error})") from error
        return self._server.server_port

    def stop(self) -> None:
        """Stop the HTTP endpoint, if it is running, and release its port."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None


def parse_listen(listen: str) -> tuple[str, int]:
    """Split "host:port" or "[v6 address]:port" into a host and a port number; UserError when malformed."""
    host, colon, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or int(port) > 65535 or ("[" in host or "]" in host):
        raise UserError(f"metrics.listen {listen!r}: expected host:port such as {DEFAULT_LISTEN} or [::1]:9464")
    return host, int(port)
