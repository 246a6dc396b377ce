"""Soak test: run the agent on a looping video for a while and record its memory, threads and open files.

    python scripts/soak.py --minutes 60 --model DIR [--video FILE] [--broker HOST:PORT] [--csv soak.csv]

Starts a private mosquitto on a free loopback port (unless --broker is given), writes a config with a few
standing questions, runs `edge-agent run` as a child process and samples `/proc/<pid>` every --interval
seconds into a CSV (elapsed_s, rss_mib, threads, open_fds, answers). At the end it stops the agent with
SIGTERM and prints, for each measure, the value after warm-up, the peak after warm-up and the growth.
Exit status 1 if the agent died on the way.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

AGENT_ID = "soak"
MOSQUITTO = "/usr/sbin/mosquitto"
MEASURES = ("rss_mib", "threads", "open_fds")
QUESTIONS = [
    {"id": "person", "question": "Is there a person in the picture?", "type": "yes_no", "every": 1},
    {"id": "count", "question": "How many squares are there?", "type": "number", "every": 2},
    {"id": "scene", "question": "Describe the picture.", "type": "text", "every": 1, "trigger": "change"},
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, required=True, help="how long the agent runs")
    parser.add_argument("--model", type=pathlib.Path, required=True, help="exported model directory")
    parser.add_argument("--video", type=pathlib.Path, help="video file played in a loop (default: a generated one)")
    parser.add_argument("--broker", help="HOST:PORT of an MQTT broker (default: a private mosquitto)")
    parser.add_argument("--csv", type=pathlib.Path, default=pathlib.Path("soak.csv"), help="where samples go")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before growth is measured from")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mosquitto(workdir: pathlib.Path) -> tuple[subprocess.Popen, str, int]:
    """A mosquitto on a free loopback port, without persistence; returns once it accepts connections."""
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    process = subprocess.Popen([MOSQUITTO, "-c", str(config)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, "127.0.0.1", port
        except OSError:
            time.sleep(0.05)
    process.kill()
    sys.exit(f"mosquitto did not start on port {port}")


def write_moving_video(path: pathlib.Path, seconds: float = 10, fps: int = 10) -> pathlib.Path:
    """A square crossing a dark room and back, so the scene keeps changing and answers keep coming."""
    width, height, side = 320, 240, 40
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    frames = round(seconds * fps)
    for index in range(frames):
        image = np.full((height, width, 3), 40, np.uint8)
        x = round((width - side) * abs(1 - 2 * index / frames))
        image[height // 2 - side // 2 : height // 2 + side // 2, x : x + side] = 230
        writer.write(image)
    writer.release()
    return path


def agent_config(model: pathlib.Path, video: pathlib.Path, host: str, port: int) -> dict:
    return {
        "agent_id": AGENT_ID,
        "camera": {"source": str(video.resolve()), "loop": True, "fps": 2},
        "model": {"path": str(model.resolve()), "max_new_tokens": 8},
        "mqtt": {"host": host, "port": port},
        "metrics": {"listen": None},
        "questions": QUESTIONS,
    }


class AnswerCounter:
    """Counts the answers the agent publishes, as any subscriber would receive them."""

    def __init__(self, host: str, port: int):
        self.count = 0
        self._lock = threading.Lock()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self._client.on_connect = lambda client, *_: client.subscribe(f"edge-agent/{AGENT_ID}/answers/#")
        self._client.on_message = self._count
        self._client.connect(host, port)
        self._client.loop_start()

    def _count(self, *_) -> None:
        with self._lock:
            self.count += 1

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def sample(pid: int) -> dict[str, float]:
    """Resident memory (MiB), thread count and open file descriptors of process `pid`."""
    status = dict(line.split(":", 1) for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines())
    return {
        "rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
        "threads": int(status["Threads"]),
        "open_fds": len(list(pathlib.Path(f"/proc/{pid}/fd").iterdir())),
    }


def soak(agent: subprocess.Popen, answers: AnswerCounter, args: argparse.Namespace) -> list[dict[str, float]]:
    """Sample the agent every interval until the time is up or it dies, writing each row to the CSV."""
    rows = []
    started = time.monotonic()
    with args.csv.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=["elapsed_s", *MEASURES, "answers"])
        writer.writeheader()
        while (elapsed := time.monotonic() - started) < args.minutes * 60 and agent.poll() is None:
            rows.append({"elapsed_s": round(elapsed, 1), **sample(agent.pid), "answers": answers.count})
            writer.writerow(rows[-1])
            out.flush()
            time.sleep(args.interval)
    return rows


def summary(rows: list[dict[str, float]], warmup_s: float) -> list[str]:
    """One line per measure: the value at the end of warm-up, the peak after it, and the growth."""
    settled = [row for row in rows if row["elapsed_s"] >= warmup_s] or rows[-1:]
    lines = [f"{len(rows)} samples over {rows[-1]['elapsed_s']:.0f} s, {rows[-1]['answers']} answers received"]
    for measure in MEASURES:
        start, peak = settled[0][measure], max(row[measure] for row in settled)
        lines.append(f"{measure}: {start:g} after warm-up, peak {peak:g}, growth {peak - start:+g}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edge-agent-soak-") as scratch:
        workdir = pathlib.Path(scratch)
        broker = None
        if args.broker:
            host, port = args.broker.rsplit(":", 1)[0], int(args.broker.rsplit(":", 1)[1])
        else:
            broker, host, port = start_mosquitto(workdir)
        video = args.video or write_moving_video(workdir / "loop.mp4")
        config = workdir / "config.yaml"
        config.write_text(yaml.safe_dump(agent_config(args.model, video, host, port)))
        answers = AnswerCounter(host, port)
        agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)])
        try:
            rows = soak(agent, answers, args)
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=60)
            answers.close()
            if broker is not None:
                broker.terminate()
                broker.wait()
    print("\n".join(summary(rows, args.warmup)))
    print(f"samples: {args.csv}")
    if agent.returncode != 0:
        print(f"the agent exited with status {agent.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
