"""`edge-agent bench`: where the time and memory of answering standing questions about a frame go.

For an exported model it measures, on synthetic 640x480 frames:
- the prompt prefix every question shares (system prompt, `USER:`, image tokens), in tokens;
- each stage of a new frame (preprocess, vision encoder, prefix prefill, question prefill, decode) and the
  whole frame's wall time, as medians over the measured frames (one warm-up frame is not counted). The
  agent prefills the prefix together with the questions; to split that prefill, each frame is encoded a
  second time with its prefix prefilled alone: `prefix` is that, `question_prefill` the rest;
- the new frame against its vision encoding plus prefix prefill alone (what no question can avoid);
- decode speed: tokens per second over all questions of the batch, and milliseconds per decode step;
- an unchanged-scene frame: the scene gate's comparison of an identical frame, which is all the agent does
  for it, and how many times cheaper that is than a new frame;
- peak resident memory of this process next to the size of the model's files;
- time from process start to the first published answer: `edge-agent run` started twice on a looping
  video with one standing question, a broker on loopback and one new compiled-model cache directory,
  timed until a subscriber receives its first answer: the first run compiles (cold cache), the second
  loads the blobs (warm).

Answers run with end-of-sequence ignored, so every answer is exactly `new_tokens` long and runs compare.
Imports only the runtime's own dependencies (no torch).
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..capture.gate import SceneGate
from ..config import SceneGateSettings
from ..engine import Engine, Prompt
from ..errors import UserError
from .loopback import BrokerAddress, local_broker
from .scenes import scene_timeline, write_video

FRAME_SHAPE = (480, 640, 3)
STAGES = ("preprocess", "vision", "prefix", "question_prefill", "decode")
STANDING_QUESTIONS = (
    "Is the door open?",
    "How many people are in the room?",
    "What color is the cup on the table?",
    "Is there a bag on the chair?",
    "Are the lights on?",
    "Is anyone sitting at the desk?",
    "What is on the shelf?",
    "Is the window closed?",
)
YES_NO = ("yes", "no")
GATE_REPEATS = 200
"""Scene-gate comparisons timed for the unchanged-scene figure (each takes well under a millisecond)."""
STARTUP_TIMEOUT_S = 900
"""Longest the agent may take from its start to its first answer before the benchmark gives up on it."""
STARTUP_AGENT_ID = "bench"
STARTUP_VIDEO_S, STARTUP_VIDEO_FPS = 4, 5
"""The looping camera video of the start-up runs: short, since only the first answer counts."""


@dataclass(frozen=True)
class BenchSettings:
    """What `edge-agent bench` measures."""

    model: Path
    """Exported model directory (`edge-agent model export`)."""
    questions: int = 4
    """Questions answered per frame, as one batch."""
    new_tokens: int = 16
    """Tokens generated per answer; end-of-sequence is ignored so every answer has exactly this length."""
    frames: int = 5
    """Frames measured, after one warm-up frame that is not counted."""
    yes_no: bool = False
    """Ask every question as yes/no, decided from the model's distribution over the two options (constrained,
    no free decoding), instead of as free text; `new_tokens` then does not apply."""
    device: str = "CPU"
    """OpenVINO device for the whole model (CPU, GPU, AUTO, ...)."""
    cache_dir: Path | None = None
    """OpenVINO compiled-model cache of the measured engine; the start-up runs use a new, temporary
    subdirectory of it (or of the system's temporary directory), removed afterwards."""

    def __post_init__(self) -> None:
        if self.cache_dir is not None and self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise UserError(f"cache-dir: {self.cache_dir} exists and is not a directory")


def run_bench(settings: BenchSettings) -> dict:
    """Measure everything described in the module docstring; the report is a JSON-ready dict."""
    engine = Engine.load(settings.model, device=settings.device, cache_dir=settings.cache_dir)
    options = YES_NO if settings.yes_no else ()
    prompts = [
        Prompt(question, settings.new_tokens, options=options, ignore_eos=True)
        for question in standing_questions(settings.questions)
    ]
    frames = [time_new_frame(engine, synthetic_frame(seed), prompts) for seed in range(settings.frames + 1)][1:]
    frame_ms = [frame["total_ms"] for frame in frames]
    vision_and_prefix_ms = statistics.median(f["stages_ms"]["vision"] + f["stages_ms"]["prefix"] for f in frames)
    unchanged_ms = time_unchanged_frame(synthetic_frame(0))
    report = {
        "model": str(settings.model),
        "device": settings.device,
        "questions": settings.questions,
        "answers": "yes_no" if settings.yes_no else "free_text",
        "new_tokens": settings.new_tokens,
        "frames": settings.frames,
        "prefix_tokens": frames[0]["prefix_tokens"],
        "stages_ms": {stage: statistics.median(frame["stages_ms"][stage] for frame in frames) for stage in STAGES},
        "frame_ms": {"median": statistics.median(frame_ms), "min": min(frame_ms), "max": max(frame_ms)},
        "prefill_ms": statistics.median(frame["prefill_ms"] for frame in frames),
        "vision_and_prefix_ms": vision_and_prefix_ms,
        "frame_over_vision_and_prefix": statistics.median(frame_ms) / vision_and_prefix_ms,
        "unchanged_frame_ms": unchanged_ms,
        "new_vs_unchanged_frame": statistics.median(frame_ms) / unchanged_ms,
        "rss_after_frames_mib": rss_mib(),
        "peak_rss_mib": peak_rss_mib(),
        "model_files_mib": files_mib(settings.model),
    }
    answer_tokens = 1 if settings.yes_no else settings.new_tokens
    report["decode"] = decode_speed(report["stages_ms"]["decode"], settings.questions, answer_tokens)
    report["first_answer_s"] = first_answer_times(settings)
    return report


def standing_questions(count: int) -> list[str]:
    """`count` distinct questions of the kind an agent asks about every frame."""
    kinds = len(STANDING_QUESTIONS)
    return [STANDING_QUESTIONS[i % kinds] + (f" ({i // kinds + 1})" if i >= kinds else "") for i in range(count)]


def synthetic_frame(seed: int) -> np.ndarray:
    """A 640x480 BGR camera-sized frame, different for each seed."""
    return np.random.default_rng(seed).integers(0, 256, FRAME_SHAPE, dtype=np.uint8)


def time_new_frame(engine: Engine, frame: np.ndarray, prompts: list[Prompt]) -> dict:
    """Encode `frame` and answer `prompts` as the agent does: the stage timings and the wall time.

    The prefix is prefilled together with the questions (`prefill_ms`); a second encoding of the frame
    with the prefix prefilled alone splits that into `prefix` and `question_prefill`.
    """
    started = time.perf_counter()
    context = engine.encode(frame)
    answers = engine.answer(context, prompts)
    total_ms = (time.perf_counter() - started) * 1000.0
    timings, prefix_tokens = answers[0].timings, context.prefix_embeds.shape[1]
    del context  # as the agent lets a view's old context go: its prefix's cache blocks return to the pool
    prefix_ms = engine.encode(frame, prefill=True).timings.prefix_ms
    stages = {
        "preprocess": timings.preprocess_ms,
        "vision": timings.vision_ms,
        "prefix": prefix_ms,
        "question_prefill": timings.question_prefill_ms - prefix_ms,
        "decode": timings.decode_ms,
    }
    return {
        "stages_ms": stages,
        "prefill_ms": timings.question_prefill_ms,
        "total_ms": total_ms,
        "prefix_tokens": prefix_tokens,
    }


def time_unchanged_frame(frame: np.ndarray) -> float:
    """Median milliseconds for the scene gate (default settings) to find `frame` unchanged."""
    gate = SceneGate(SceneGateSettings())
    gate.accept(frame, time.time())
    timings = []
    for _ in range(GATE_REPEATS):
        started = time.perf_counter()
        changed = gate.changed(frame)
        timings.append((time.perf_counter() - started) * 1000.0)
        if changed:
            raise RuntimeError("the scene gate found an identical frame changed")
    return statistics.median(timings)


def decode_speed(decode_ms: float, questions: int, new_tokens: int) -> dict:
    """Tokens per second over the batch, and milliseconds per decode step.

    The first token of each answer comes from the question prefill; the other `new_tokens - 1` come from
    decode steps that each produce one token for every question.
    """
    steps = new_tokens - 1
    if steps == 0 or decode_ms <= 0:
        return {"tokens_per_s": None, "step_ms": None}
    return {"tokens_per_s": questions * steps / (decode_ms / 1000.0), "step_ms": decode_ms / steps}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    Read from the kernel's high-water mark of this process's own memory (`VmHWM`), which starts afresh when
    the program is executed. `getrusage`'s `ru_maxrss` is only the fallback where /proc is missing: Linux
    carries it over from the parent when a process is spawned, so a child of a large process (a benchmark
    that has just exported a model, say) would report the parent's peak. Both already count the resident
    memory of this moment: the kernel raises its lazily updated high-water mark to it when they are read.
    """
    peak = status_mib("VmHWM")
    if peak is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB
    return peak


def rss_mib() -> float | None:
    """Resident memory of this process now, in MiB (None where /proc is unavailable)."""
    return status_mib("VmRSS")


def status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (reported in kB), in MiB; None where it cannot be read."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return None


def files_mib(directory: Path) -> float:
    """Total size of the files under `directory`, in MiB."""
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file()) / 2**20


# -- start-up -----------------------------------------------------------------------------------------------


def first_answer_times(settings: BenchSettings) -> dict:
    """Seconds from `edge-agent run`'s process start to its first answer on MQTT: cold, then warm cache.

    Both runs share one new compiled-model cache directory (the first fills it), a short video of the
    synthetic kiosk camera and a broker on loopback (`edge_agent.mqtt.loopback`), all removed afterwards.
    """
    if settings.cache_dir is not None:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-startup-", dir=settings.cache_dir) as workdir:
        workdir = Path(workdir)
        video = write_video(
            workdir / "camera.mp4",
            scene_timeline(seconds=STARTUP_VIDEO_S),
            fps=STARTUP_VIDEO_FPS,
            size=(FRAME_SHAPE[1], FRAME_SHAPE[0]),
            seconds=STARTUP_VIDEO_S,
        )
        with local_broker(workdir) as broker:
            config = workdir / "config.yaml"
            config.write_text(yaml.safe_dump(startup_config(settings, video, broker, workdir / "compiled")))
            cold = first_published_answer_seconds(config, broker)
            warm = first_published_answer_seconds(config, broker)
    return {"cold_cache": cold, "warm_cache": warm}


def startup_config(settings: BenchSettings, video: Path, broker: BrokerAddress, cache_dir: Path) -> dict:
    """An agent with one standing question of `settings.new_tokens` tokens about the looping `video`."""
    return {
        "agent_id": STARTUP_AGENT_ID,
        "camera": {"source": str(video), "loop": True},
        "model": {
            "path": str(Path(settings.model).resolve()),
            "device": settings.device,
            "cache_dir": str(cache_dir),
            "max_new_tokens": settings.new_tokens,
        },
        "mqtt": {"host": broker.host, "port": broker.port, "protocol": broker.protocol, "discovery": False},
        "questions": [{"id": "first", "question": standing_questions(1)[0], "type": "text"}],
        "metrics": {"listen": None},
        "web": {"enabled": False},
    }


def first_published_answer_seconds(config: Path, broker: BrokerAddress) -> float:
    """Launch `edge-agent run --config config`; seconds until a subscriber receives its first answer."""
    received, subscribed = threading.Event(), threading.Event()
    subscriber = broker.client()

    def on_message(client, userdata, message) -> None:
        if not message.retain:  # answers are retained: the last run's is replayed on subscribing
            received.set()

    subscriber.on_message = on_message
    subscriber.on_subscribe = lambda *args: subscribed.set()
    subscriber.connect(broker.host, broker.port)
    subscriber.subscribe(f"edge-agent/{STARTUP_AGENT_ID}/answers/#", qos=1)
    subscriber.loop_start()
    try:
        if not subscribed.wait(timeout=10):
            raise RuntimeError(f"the broker on {broker.host}:{broker.port} did not confirm the subscription")
        started = time.monotonic()
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while not received.wait(timeout=0.05):
                if agent.poll() is not None:
                    last_line = (agent.stderr.read().strip().splitlines() or ["no output"])[-1]
                    raise RuntimeError(f"the agent exited ({agent.returncode}) before answering: {last_line}")
                if time.monotonic() - started > STARTUP_TIMEOUT_S:
                    raise RuntimeError(f"no answer within {STARTUP_TIMEOUT_S} s of starting the agent")
            return time.monotonic() - started
        finally:
            agent.terminate()
            agent.communicate(timeout=60)
    finally:
        subscriber.loop_stop()
        subscriber.disconnect()


# -- report ---------------------------------------------------------------------------------------------------


def format_report(report: dict) -> str:
    """The report as aligned lines for a terminal."""
    frame, decode, startup = report["frame_ms"], report["decode"], report["first_answer_s"]
    asked = (
        f"{report['questions']} yes/no questions"
        if report["answers"] == "yes_no"
        else f"{report['questions']} questions x {report['new_tokens']} tokens"
    )
    lines = [
        f"model          {report['model']} on {report['device']} ({report['model_files_mib']:.0f} MiB of files)",
        f"new frame      {asked} after a "
        f"{report['prefix_tokens']}-token shared prefix, median of {report['frames']} frames: "
        f"{frame['median']:.1f} ms (min {frame['min']:.1f}, max {frame['max']:.1f})",
        *(f"  {stage:<17}{ms:10.1f} ms" for stage, ms in report["stages_ms"].items()),
        f"  (prefix and questions are prefilled together in {report['prefill_ms']:.1f} ms; the prefix alone "
        f"was timed on a second encoding of each frame)",
        f"  whole frame      {report['frame_over_vision_and_prefix']:.2f}x the vision encoder and the prefix alone "
        f"({report['vision_and_prefix_ms']:.1f} ms)",
    ]
    if decode["tokens_per_s"] is not None:
        lines.append(
            f"decode         {decode['tokens_per_s']:.1f} tokens/s "
            f"({decode['step_ms']:.1f} ms per step of {report['questions']} answers)"
        )
    lines += [
        f"unchanged      {report['unchanged_frame_ms']:.3f} ms per frame (scene gate only): "
        f"{report['new_vs_unchanged_frame']:.0f}x cheaper than a new frame",
        f"peak RSS       {report['peak_rss_mib']:.0f} MiB (model files {report['model_files_mib']:.0f} MiB)"
        + (f"; {report['rss_after_frames_mib']:.0f} MiB after the frames" if report["rss_after_frames_mib"] else ""),
        f"first answer   {startup['cold_cache']:.2f} s from `edge-agent run` starting to its first answer on MQTT "
        f"with a cold compiled-model cache, "
        f"{startup['warm_cache']:.2f} s warm",
    ]
    return "\n".join(lines)
