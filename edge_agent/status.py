"""What the status page shows: a thread-safe snapshot of the agent that the service feeds and the page reads.

The inference thread feeds it a few cheap facts (each published answer, each evidence image, each switch
state, the camera's status); the page's HTTP threads read it. Camera frames are pulled, not pushed: a
camera registers how to get its newest frame, and a frame is encoded as a small JPEG only when a page asks
for it, at most once per `FRAME_INTERVAL_S` whatever the number of pages, so the loop pays nothing while
no page is open. MQTT and latency figures come from the agent's Prometheus registry, which the loop keeps
current anyway. Everything is keyed by camera id and question id, so several cameras fit the same shape.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable

from edge_agent.capture.reader import Frame
from edge_agent.config import Config, EvidenceSettings
from edge_agent.evidence import evidence_jpeg
from edge_agent.metrics import STAGES, Metrics
from edge_agent.mqtt import AnswerMessage

FRAME_INTERVAL_S = 1.0
"""Least seconds between two encodings of a camera's frame for the page."""
FRAME_JPEG = EvidenceSettings(max_side=640, quality=70)
"""Size and quality of the page's camera frames: small enough to refresh every second on a phone."""
HISTORY_LENGTH = 20
"""Changes of each question's value kept in memory for the page (oldest forgotten first)."""


@dataclasses.dataclass
class QuestionStatus:
    """The latest published answer to one question and the changes of its value."""

    value: object = None
    state: str | None = None
    latest_value: object = None
    raw: str | None = None
    confidence: float | None = None
    answered_ts: float | None = None
    changed_ts: float | None = None
    enabled: bool = True
    evidence: bytes | None = None
    evidence_version: int = 0
    history: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=HISTORY_LENGTH))


@dataclasses.dataclass
class CameraStatus:
    """A camera's status and the page's copy of its newest frame."""

    latest: Callable[[], Frame | None]
    online: bool | None = None
    jpeg: bytes | None = None
    jpeg_seq: int = -1
    jpeg_ts: float | None = None
    encoded_at: float = float("-inf")


class StatusBoard:
    """The agent's state for the status page; every method may be called from any thread."""

    def __init__(self, config: Config, metrics: Metrics, clock: Callable[[], float] = time.monotonic):
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._model = ""
        self._cameras: dict[str, CameraStatus] = {}
        self._questions = {question.id: QuestionStatus() for question in config.all_questions}
        self._camera_of = {q.id: camera.id for camera in config.all_cameras for q in camera.questions}

    # -- the service's side ------------------------------------------------------------------------------

    def started(self, model: str, cameras: dict[str, Callable[[], Frame | None]]) -> None:
        """The model's name and, per camera id, how to get its newest frame (`CameraReader.latest`)."""
        with self._lock:
            self._model = model
            for camera_id, latest in cameras.items():
                self._cameras[camera_id] = CameraStatus(latest=latest)

    def camera_status(self, camera_id: str, online: bool) -> None:
        with self._lock:
            if camera_id in self._cameras:
                self._cameras[camera_id].online = online

    def answer(self, message: AnswerMessage) -> None:
        """A published answer: its value (a change goes into the history), raw text and confidence."""
        with self._lock:
            status = self._questions[message.question_id]
            if status.answered_ts is None or status.value != message.value or status.state != message.state:
                status.changed_ts = message.answered_ts
                status.history.append({"value": message.value, "state": message.state, "ts": message.answered_ts})
            status.value, status.state, status.latest_value = message.value, message.state, message.latest_value
            status.raw, status.confidence, status.answered_ts = message.raw, message.confidence, message.answered_ts

    def evidence(self, question_id: str, jpeg: bytes) -> None:
        """The image the question's published value was answered on."""
        with self._lock:
            status = self._questions[question_id]
            status.evidence = jpeg
            status.evidence_version += 1

    def enabled(self, question_id: str, enabled: bool) -> None:
        with self._lock:
            self._questions[question_id].enabled = enabled

    # -- the page's side ---------------------------------------------------------------------------------

    def camera_ids(self) -> list[str]:
        with self._lock:
            return list(self._cameras)

    def frame_jpeg(self, camera_id: str) -> bytes | None:
        """The camera's newest frame as a JPEG, encoded again only when the last one is `FRAME_INTERVAL_S` old
        and a newer frame exists; None for an unknown camera or before its first frame."""
        with self._lock:
            camera = self._cameras.get(camera_id)
            if camera is None:
                return None
            now = self._clock()
            if now - camera.encoded_at >= FRAME_INTERVAL_S:
                frame = camera.latest()
                if frame is not None and frame.seq != camera.jpeg_seq:
                    camera.jpeg = evidence_jpeg(frame.image, FRAME_JPEG)
                    camera.jpeg_seq, camera.jpeg_ts, camera.encoded_at = frame.seq, frame.ts, now
            return camera.jpeg

    def evidence_jpeg(self, question_id: str) -> bytes | None:
        with self._lock:
            status = self._questions.get(question_id)
            return None if status is None else status.evidence

    def snapshot(self) -> dict:
        """Everything the page shows, as JSON-ready data (images as URLs that change with the image)."""
        with self._lock:
            return {
                "agent": {"id": self._config.agent_id, "model": self._model, "device": self._config.model.device},
                "mqtt": self._mqtt(),
                "cameras": [self._camera(camera_id, camera) for camera_id, camera in self._cameras.items()],
                "questions": [self._question(question) for question in self._config.all_questions],
                "latency_ms": self._latency_ms(),
                "counts": self._counts(),
            }

    def _camera(self, camera_id: str, camera: CameraStatus) -> dict:
        newest = camera.latest()
        return {
            "id": camera_id,
            "online": camera.online,
            "frame": f"/api/frame/{camera_id}.jpg?seq={newest.seq}" if newest is not None else None,
            "frame_ts": newest.ts if newest is not None else None,
        }

    def _question(self, question) -> dict:
        status = self._questions[question.id]
        return {
            "id": question.id,
            "camera": self._camera_of[question.id],
            "question": question.question,
            "type": question.type,
            "options": list(question.options),
            "region": list(question.region) if question.region else None,
            "enabled": status.enabled,
            "value": status.value,
            "state": status.state,
            "latest_value": status.latest_value,
            "raw": status.raw,
            "confidence": status.confidence,
            "answered_ts": status.answered_ts,
            "changed_ts": status.changed_ts,
            "evidence": (
                f"/api/evidence/{question.id}.jpg?v={status.evidence_version}" if status.evidence is not None else None
            ),
            "history": list(status.history),
        }

    def _sample(self, name: str, labels: dict | None = None) -> float | None:
        return self._metrics.registry.get_sample_value(name, labels or {})

    def _mqtt(self) -> dict:
        mqtt = self._config.mqtt
        return {
            "broker": f"{mqtt.host}:{mqtt.port}",
            "connected": self._sample("edge_agent_mqtt_connected") == 1,
            "queued": int(self._sample("edge_agent_mqtt_queue_depth") or 0),
            "dropped": int(self._sample("edge_agent_mqtt_dropped") or 0),
        }

    def _latency_ms(self) -> dict:
        """Per inference stage, the mean time in milliseconds since start (None before its first run)."""
        means = {}
        for stage in STAGES:
            count = self._sample("edge_agent_stage_seconds_count", {"stage": stage}) or 0
            total = self._sample("edge_agent_stage_seconds_sum", {"stage": stage}) or 0
            means[stage] = round(total / count * 1000, 1) if count else None
        return means

    def _counts(self) -> dict:
        names = ("frames", "scene_changes", "encodes", "inferences", "answers_published")
        return {name: int(self._sample(f"edge_agent_{name}_total") or 0) for name in names}
