"""`edge-agent bench`: where the time and memory of answering standing questions about a frame go.

For an exported model it measures, on synthetic 640x480 frames:
- the prompt prefix every question shares (system prompt, `USER:`, image tokens), in tokens;
- each stage of a new frame (preprocess, vision encoder, prefix prefill, question prefill, decode) and the
  whole frame's wall time, as medians over the measured frames (one warm-up frame is not counted). The
  agent prefills the prefix and the questions in one pass; to split that pass, each frame is encoded a
  second time with its prefix prefilled alone: `prefix` is that, `question_prefill` the rest of the pass;
- the new frame against its vision encoding plus prefix prefill alone (what no question can avoid);
- decode speed: tokens per second over all questions of the batch, and milliseconds per decode step;
- an unchanged-scene frame: the scene gate's comparison of an identical frame, which is all the agent does
  for it, and how many times cheaper that is than a new frame;
- peak resident memory of this process next to the size of the model's files;
- time from process start to the first answer, in two fresh child processes sharing one new
  compiled-model cache directory: the first compiles (cold cache), the second loads the blobs (warm).

Answers run with end-of-sequence ignored, so every answer is exactly `new_tokens` long and runs compare.
Imports only the runtime's own dependencies (no torch).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .capture.gate import GateSettings, SceneGate
from .config import SceneGateSettings
from .engine import Engine, Prompt
from .errors import UserError

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
"""Longest a start-up child process may take before the benchmark gives up on it."""


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
    questions = standing_questions(settings.questions)
    if settings.yes_no:
        questions = [Prompt(question, options=YES_NO) for question in questions]
    frames = [time_new_frame(engine, synthetic_frame(seed), questions, settings.new_tokens)
              for seed in range(settings.frames + 1)][1:]
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


def time_new_frame(engine: Engine, frame: np.ndarray, questions: list[str | Prompt], new_tokens: int) -> dict:
    """Encode `frame` and answer `questions` as the agent does: the stage timings and the wall time.

    The prefix is prefilled with the questions, in one pass (`prefill_ms`); a second encoding of the frame
    with the prefix prefilled alone splits that pass into `prefix` and `question_prefill`.
    """
    started = time.perf_counter()
    context = engine.encode(frame)
    answers = engine.answer(context, questions, max_new_tokens=new_tokens, ignore_eos=True)
    total_ms = (time.perf_counter() - started) * 1000.0
    timings = answers[0].timings
    prefix_ms = engine.encode(frame, prefill=True).timings.prefix_ms
    stages = {"preprocess": timings.preprocess_ms, "vision": timings.vision_ms, "prefix": prefix_ms,
              "question_prefill": timings.question_prefill_ms - prefix_ms, "decode": timings.decode_ms}
    return {"stages_ms": stages, "prefill_ms": timings.question_prefill_ms, "total_ms": total_ms,
            "prefix_tokens": context.prefix_embeds.shape[1]}


def time_unchanged_frame(frame: np.ndarray) -> float:
    """Median milliseconds for the scene gate (default settings) to find `frame` unchanged."""
    defaults = SceneGateSettings()
    gate = SceneGate(GateSettings(threshold=defaults.threshold, size=defaults.size,
                                  max_unchanged_s=defaults.max_unchanged_s))
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
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def files_mib(directory: Path) -> float:
    """Total size of the files under `directory`, in MiB."""
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file()) / 2**20


# -- start-up -----------------------------------------------------------------------------------------------

def first_answer_times(settings: BenchSettings) -> dict:
    """Seconds from process start to the first answer with a cold, then a warm compiled-model cache."""
    if settings.cache_dir is not None:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-startup-", dir=settings.cache_dir) as cache:
        cold = first_answer_seconds(settings, Path(cache))
        warm = first_answer_seconds(settings, Path(cache))
    return {"cold_cache": cold, "warm_cache": warm}


def first_answer_seconds(settings: BenchSettings, cache_dir: Path) -> float:
    """Start a fresh Python process that loads the model and answers one question; seconds until it has.

    The child measures against the launch time the parent passes it, so interpreter start and imports count.
    """
    command = [sys.executable, "-m", "edge_agent.bench", str(settings.model), settings.device, str(cache_dir),
               str(settings.new_tokens), repr(time.time())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S)
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"start-up run failed ({done.returncode}): {last_line}")
    return json.loads(done.stdout)["first_answer_s"]


def _first_answer_child(model: str, device: str, cache_dir: str, new_tokens: str, launched_at: str) -> None:
    engine = Engine.load(model, device=device, cache_dir=cache_dir)
    context = engine.encode(synthetic_frame(0))
    engine.answer(context, standing_questions(1), max_new_tokens=int(new_tokens), ignore_eos=True)
    print(json.dumps({"first_answer_s": time.time() - float(launched_at)}))


# -- report ---------------------------------------------------------------------------------------------------

def format_report(report: dict) -> str:
    """The report as aligned lines for a terminal."""
    frame, decode, startup = report["frame_ms"], report["decode"], report["first_answer_s"]
    asked = (f"{report['questions']} yes/no questions" if report["answers"] == "yes_no"
             else f"{report['questions']} questions x {report['new_tokens']} tokens")
    lines = [
        f"model          {report['model']} on {report['device']} ({report['model_files_mib']:.0f} MiB of files)",
        f"new frame      {asked} after a "
        f"{report['prefix_tokens']}-token shared prefix, median of {report['frames']} frames: "
        f"{frame['median']:.1f} ms (min {frame['min']:.1f}, max {frame['max']:.1f})",
        *(f"  {stage:<17}{ms:10.1f} ms" for stage, ms in report["stages_ms"].items()),
        f"  (prefix and questions are prefilled in one pass of {report['prefill_ms']:.1f} ms; the prefix alone "
        f"was timed on a second encoding of each frame)",
        f"  whole frame      {report['frame_over_vision_and_prefix']:.2f}x the vision encoder and the prefix alone "
        f"({report['vision_and_prefix_ms']:.1f} ms)",
    ]
    if decode["tokens_per_s"] is not None:
        lines.append(f"decode         {decode['tokens_per_s']:.1f} tokens/s "
                     f"({decode['step_ms']:.1f} ms per step of {report['questions']} rows)")
    lines += [
        f"unchanged      {report['unchanged_frame_ms']:.3f} ms per frame (scene gate only): "
        f"{report['new_vs_unchanged_frame']:.0f}x cheaper than a new frame",
        f"peak RSS       {report['peak_rss_mib']:.0f} MiB (model files {report['model_files_mib']:.0f} MiB)",
        f"first answer   {startup['cold_cache']:.2f} s from process start with a cold compiled-model cache, "
        f"{startup['warm_cache']:.2f} s warm",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    _first_answer_child(*sys.argv[1:])
