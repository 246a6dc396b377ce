"""Several cameras in one agent against as many single-camera agents: new scenes per second and peak memory.

    python benchmarks/cameras.py [--model DIR] [--cameras 1 2 4 8] [--seconds 20] [--write benchmarks/RESULTS.md]

For each count N it runs, one after the other, (a) one `edge-agent run` process whose config lists N cameras and
(b) N `edge-agent run` processes of one camera each, side by side. Every camera plays its own looping video
whose scene changes every half second (the demo's synthetic room), at 4 frames a second, with one yes/no
question due on every change. Measured per run: new scenes encoded per second over the run (after the first
answer), from each process's `edge_agent_scene_changes_total`, and the peak resident memory (VmHWM) summed
over the processes. A loopback broker (mosquitto, else amqtt) takes the answers. No assertion: numbers only.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

from edge_agent.devtools.demo import DEMO_MODEL, DEMO_QUESTIONS
from edge_agent.devtools.loopback import BrokerAddress, free_port, local_broker
from edge_agent.devtools.scenes import Moment, scene_timeline, write_video

FPS = 4
SCENE_S = 0.5
QUESTION = {**DEMO_QUESTIONS[0], "trigger": "change", "every": 0.1}


def camera_video(path: pathlib.Path, seed: int) -> pathlib.Path:
    """A looping story whose scene changes every `SCENE_S` seconds."""
    moments = scene_timeline(seconds=8 * SCENE_S, seed=seed)
    timeline = [Moment(start=index * SCENE_S, scene=moment.scene) for index, moment in enumerate(moments)]
    return write_video(path, timeline, fps=10, size=(640, 480), seconds=len(timeline) * SCENE_S, seed=seed)


def agent_config(model: pathlib.Path, broker: BrokerAddress, agent_id: str, videos: list[pathlib.Path]) -> dict:
    """One agent answering `videos`: the single `camera:` form for one, `cameras:` for more."""
    cameras = [
        {
            "id": f"cam{index}",
            "source": str(video),
            "loop": True,
            "fps": FPS,
            "questions": [dict(QUESTION, id=f"q{index}")],
        }
        for index, video in enumerate(videos)
    ]
    config = {
        "agent_id": agent_id,
        "model": {"path": str(model), "max_new_tokens": 4},
        "mqtt": {"host": broker.host, "port": broker.port, "protocol": broker.protocol, "discovery": False},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "web": {"enabled": False},
        "evidence": {"enabled": False},
        "state_dir": None,
    }
    if len(cameras) == 1:
        single = cameras[0]
        return {**config, "camera": {k: single[k] for k in ("source", "loop", "fps")}, "questions": single["questions"]}
    return {**config, "cameras": cameras}


def scrape(listen: str, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://{listen}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def peak_rss_mib(pid: int) -> float:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def run_agents(configs: list[dict], workdir: pathlib.Path, seconds: float) -> dict:
    """Start one process per config; once each has encoded its first scene, count scenes for `seconds`."""
    processes = []
    for index, config in enumerate(configs):
        path = workdir / f"agent{index}.yaml"
        path.write_text(yaml.safe_dump(config))
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    listens = [config["metrics"]["listen"] for config in configs]
    try:
        deadline = time.monotonic() + 300
        while any((scrape(listen, "edge_agent_scene_changes_total") or 0) < 1 for listen in listens):
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError("an agent did not start")
            time.sleep(0.5)
        before = [scrape(listen, "edge_agent_scene_changes_total") for listen in listens]
        time.sleep(seconds)
        after = [scrape(listen, "edge_agent_scene_changes_total") for listen in listens]
        peak = sum(peak_rss_mib(p.pid) for p in processes)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
    return {"scenes_per_s": (sum(after) - sum(before)) / seconds, "peak_rss_mib": peak}


def measure(model: pathlib.Path, counts: list[int], seconds: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, local_broker(pathlib.Path(tmp)) as broker:
        workdir = pathlib.Path(tmp)
        videos = [camera_video(workdir / f"camera{index}.mp4", seed=index) for index in range(max(counts))]
        for count in counts:
            one = run_agents([agent_config(model, broker, "multi", videos[:count])], workdir, seconds)
            each = run_agents(
                [agent_config(model, broker, f"single{index}", [videos[index]]) for index in range(count)],
                workdir,
                seconds,
            )
            rows.append({"cameras": count, "one_agent": one, "agents": each})
            print(f"{count} cameras: one agent {one}, {count} agents {each}", flush=True)
    return rows


def format_rows(model: pathlib.Path, rows: list[dict], seconds: float) -> str:
    lines = [
        "## Several cameras: one agent against one agent per camera",
        "",
        f"Generated by `python benchmarks/cameras.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); "
        f"model `{model}`; each camera a looping 640x480 video whose scene changes every {SCENE_S} s, read at "
        f"{FPS} frames a second, one yes/no question on every change; {seconds:g} s per run. Peak RSS is VmHWM "
        "summed over the processes.",
        "",
        "| cameras | one agent: new scenes/s | one agent: peak RSS MiB | N agents: new scenes/s | "
        "N agents: peak RSS MiB (sum) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        one, each = row["one_agent"], row["agents"]
        lines.append(
            f"| {row['cameras']} | {one['scenes_per_s']:.2f} | {one['peak_rss_mib']:.0f} | "
            f"{each['scenes_per_s']:.2f} | {each['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, default=DEMO_MODEL, help="exported model (default: demo)")
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 2, 4, 8], help="camera counts to compare")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds counted per run")
    parser.add_argument("--write", type=pathlib.Path, help="append the table to this Markdown file")
    args = parser.parse_args()
    report = format_rows(args.model, measure(args.model.resolve(), args.cameras, args.seconds), args.seconds)
    print(report)
    if args.write:
        with args.write.open("a") as out:
            out.write("\n" + report)


if __name__ == "__main__":
    main()
