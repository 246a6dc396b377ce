"""`edge-agent demo`: the whole agent on a generated video, with the answers shown as a subscriber sees them.

It writes a short video from a wide camera over two synthetic kiosk rooms side by side: in the left one the
door opens and people come and go, in the right one its own story runs (`edge_agent.devtools.scenes`). It
starts an MQTT broker on loopback (mosquitto where installed, else an embedded amqtt broker, which speaks
MQTT 3.1.1 only), runs the agent with the shipped demo model on that video, and prints every answer published,
next to the ground truth of its room. Every question names its room's region: the demo model reads a room at
its 64x64 input, which the whole wide frame squashes two rooms into. It also prints where the images behind
the answers are published and where the status page listens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
import tempfile
import threading
import time

from ..config import parse_config
from ..errors import UserError
from ..service import Agent
from .loopback import BrokerAddress, local_broker
from .scenes import Moment, SyntheticScene, grid_region, scene_at, scene_timeline, write_video

log = logging.getLogger(__name__)

DEMO_MODEL = pathlib.Path("models") / "demo-llava" / "openvino-int8"
ROOM_SIZE = (640, 480)
"""(width, height) of each of the two rooms side by side: the video is 1280x480."""
VIDEO_FPS = 10
ROOMS = ("left room", "right room")
RIGHT_ROOM_STORY_SEED = 1

# The standing questions of the demo, phrased as the demo model was trained.
DEMO_QUESTIONS = (
    {"id": "door_open", "question": "Is the door open?", "type": "yes_no", "device_class": "door"},
    {"id": "people", "question": "How many people are in the room?", "type": "number"},
    {"id": "bag", "question": "Is there a bag on the floor?", "type": "yes_no"},
    {
        "id": "cup_colour",
        "question": "What colour is the cup?",
        "type": "choice",
        "options": ["red", "green", "blue", "yellow", "white"],
    },
)


RIGHT_ROOM_QUESTION = {
    "id": "right_door_open",
    "question": "Is the door open?",
    "type": "yes_no",
    "device_class": "door",
}
"""The question about the right room (the demo's others are about the left room)."""


def demo_questions() -> list[dict]:
    """The demo's standing questions, each on its room's region of the wide frame: DEMO_QUESTIONS about the left
    room, RIGHT_ROOM_QUESTION about the right one."""
    left, right = (list(grid_region(index, len(ROOMS))) for index in range(len(ROOMS)))
    return [dict(q, every=1.0, region=left) for q in DEMO_QUESTIONS] + [
        dict(RIGHT_ROOM_QUESTION, every=1.0, region=right)
    ]


def room_of(question_id: str) -> int:
    """Which room (an index of ROOMS) a demo question is about."""
    return 1 if question_id == RIGHT_ROOM_QUESTION["id"] else 0


def truth_of(question_id: str, scene: SyntheticScene):
    """The right answer to a demo question in `scene`."""
    return {
        "door_open": scene.door_open,
        "right_door_open": scene.door_open,
        "people": scene.people,
        "bag": scene.bag_present,
        "cup_colour": scene.cup_colour,
    }[question_id]


def write_demo_video(path: pathlib.Path, seconds: float) -> tuple[pathlib.Path, list[list[Moment]]]:
    """The demo's video: the two rooms side by side, each following its story; and the stories, by room."""
    right = [  # another room, whose door is open while the left one's is closed
        dataclasses.replace(moment, scene=dataclasses.replace(moment.scene, door_open=not moment.scene.door_open))
        for moment in scene_timeline(seconds=seconds, seed=RIGHT_ROOM_STORY_SEED)
    ]
    stories = [scene_timeline(seconds=seconds), right]
    video = write_video(path, stories[0], fps=VIDEO_FPS, size=ROOM_SIZE, seconds=seconds, beside=tuple(stories[1:]))
    return video, stories


def find_demo_model(explicit: str | None) -> pathlib.Path:
    """The model to run: `--model`, else the shipped demo model beside the working directory or the package."""
    candidates = (
        [pathlib.Path(explicit)] if explicit else [DEMO_MODEL, pathlib.Path(__file__).resolve().parents[1] / DEMO_MODEL]
    )
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise UserError(
        f"demo model not found at {candidates[0]}: run the demo from the repository root, or pass --model DIR"
    )


# -- the demo -------------------------------------------------------------------------------------------


def demo_config(model: pathlib.Path, video: pathlib.Path, broker: BrokerAddress) -> dict:
    return {
        "agent_id": "demo",
        "camera": {"source": str(video), "loop": True, "fps": 2},
        "model": {"path": str(model), "max_new_tokens": 4},
        "mqtt": {"host": broker.host, "port": broker.port, "protocol": broker.protocol, "discovery": True},
        "scene_gate": {"threshold": 0.02, "max_unchanged_s": 0},
        "questions": demo_questions(),
        "metrics": {"listen": None},
        "web": {"listen": "127.0.0.1:0"},  # a free port: demos may run side by side
    }


class AnswerPrinter:
    """Subscribes to the agent's answers and prints each one beside the ground truth of its room at its frame."""

    def __init__(self, broker: BrokerAddress, stories: list[list[Moment]], video_seconds: float, out=None):
        self._stories, self._video_seconds, self._out = stories, video_seconds, out
        self.started = time.time()
        self.received: list[dict] = []
        self._client = broker.client()
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.subscribe("edge-agent/demo/answers/#", qos=1)
        self._client.loop_start()

    def video_time(self, frame_ts: float) -> float:
        return (frame_ts - self.started) % self._video_seconds

    def _on_message(self, client, userdata, message) -> None:
        # Runs on paho's network thread: an exception escaping here would stop all further messages.
        try:
            answer = json.loads(message.payload)
            answer["video_t"] = self.video_time(float(answer["frame_ts"]))
            story = self._stories[room_of(answer["question_id"])]
            answer["truth"] = truth_of(answer["question_id"], scene_at(story, answer["video_t"]))
        except (ValueError, KeyError, TypeError) as error:
            log.warning("unexpected answer message on %s (%r): %s", message.topic, message.payload[:80], error)
            return
        self.received.append(answer)
        self._print(answer)

    def _print(self, answer: dict) -> None:
        value, truth = answer["value"], answer["truth"]
        mark = "ok" if value == truth else "  "
        confidence = f" ({answer['confidence']:.2f})" if answer.get("confidence") is not None else ""
        asked = f"{answer['question']} ({ROOMS[room_of(answer['question_id'])]})"
        print(
            f"[video {answer['video_t']:5.1f} s] {asked:<46} {str(value):>6}{confidence:<7}"
            f" truth {str(truth):>6} {mark}",
            file=self._out or sys.stdout,
            flush=True,
        )

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def progress(message: str) -> None:
    print(f"edge-agent demo: {message}", file=sys.stderr, flush=True)


def run_demo(duration_s: float | None, model: str | None, video_seconds: float = 24.0) -> int:
    """Run until `duration_s` seconds have passed (None: until Ctrl-C)."""
    model_dir = find_demo_model(model)
    with tempfile.TemporaryDirectory(prefix="edge-agent-demo-") as workdir:
        workdir = pathlib.Path(workdir)
        progress("writing a sample video: two rooms side by side (doors open, people come and go)")
        video, stories = write_demo_video(workdir / "kiosk.mp4", video_seconds)
        with local_broker(workdir) as broker:
            progress(f"{broker.kind} listening on {broker.host}:{broker.port} (MQTT {broker.protocol})")
            progress(f"loading model {model_dir}")
            agent = Agent(parse_config(demo_config(model_dir, video, broker)))
            agent.start()
            printer = AnswerPrinter(broker, stories, video_seconds)
            progress(
                "each question looks at its room's region: "
                + ", ".join(f"{q['id']} {q['region']}" for q in demo_questions())
            )
            progress(
                "the image behind each answer (its region, JPEG, retained): edge-agent/demo/evidence/<question_id>"
            )
            progress(f"status page: http://127.0.0.1:{agent.web_port}/")
            progress("answering; Ctrl-C stops" + (f" (or after {duration_s:g} s)" if duration_s else ""))
            runner = threading.Thread(target=agent.run, name="agent", daemon=True)
            runner.start()
            try:
                runner.join(timeout=duration_s)
            except KeyboardInterrupt:
                progress("stopping")
            finally:
                agent.stop()
                runner.join(timeout=30)
                agent.shutdown()
                printer.close()
    return 0
