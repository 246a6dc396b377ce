"""Where a decode step of the language model spends its time, measured two ways that add up.

OpenVINO's own per-node counters (PERF_COUNT) do not add up to a decode step's wall time on the CPU plugin
(their sum is several times the step), so this profile does without them:
1. Wall time per step with 1 to 16 answer rows, after the bench model's prefix and after a short one.
   What a row costs, and how much of that is attention over the shared prefix, follow by subtraction.
2. Where the CPU is during the steps, sampled by Linux `perf` (cpu-clock events with CLOCK_MONOTONIC
   timestamps; only samples inside the steps' time windows count, not the prefill). Each sample is put
   under the code it landed in: kernels generated at run time (the matmuls, norms, RoPE), the CPU plugin's
   compiled code (attention, mostly), the thread pool and the OS kernel, or the rest.
The steps run the engine's language model (paged on the CPU, `edge_agent/engine/paged.py`) on random
embeddings with the engine's compile settings.

`run_benchmarks.py` calls `measure` and renders `section`; run alone it prints the section:
    python benchmarks/decode_profile.py [--model DIR] [--prefix-tokens N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROWS = (1, 2, 4, 5, 8, 16)
SAMPLED_ROWS = (1, 4)
SHORT_PREFIX = 16
QUESTION_TOKENS = 16
STEPS = 15
MEASURABLE_MS = 0.5
"""A row's cost below which a step's medians do not tell it from noise, so no ratio is taken against it."""
ROUNDS = 4
"""Rounds of every (prefix, rows) configuration in turn; the first warms up and is dropped."""
SAMPLING_S = 12.0
SAMPLES_PER_S = 1000
CODE_KINDS = {
    "generated": "code generated at run time (the matmuls, norms, RoPE)",
    "plugin": "the CPU plugin's compiled code (attention, mostly)",
    "threads": "thread pool (TBB) and OS kernel",
    "other": "other (Python, libc, numpy)",
}


def open_language_model(exported: Path):
    """The engine's language model with the engine's graph edits and compile settings, and its hidden size."""
    import openvino as ov

    from edge_agent.engine.paged import load_language_model

    hidden = json.loads((exported / "config.json").read_text())["text_config"]["hidden_size"]
    return load_language_model(ov.Core(), exported / "openvino_language_model.xml", "CPU"), hidden


def prefilled_session(model, hidden: int, prefix_tokens: int, rows: int):
    """A session holding a random prefix and `rows` random 16-token questions, ready to decode."""
    rng = np.random.default_rng(rows)
    session = model.session(rng.standard_normal((1, prefix_tokens, hidden), np.float32))
    session.prefill_questions(list(rng.standard_normal((rows, QUESTION_TOKENS, hidden), np.float32)))
    return session


def decode_steps(session, hidden: int, rows: int) -> tuple[float, float]:
    """Run the answers' decode steps; returns their CLOCK_MONOTONIC window (start, end) in seconds."""
    step_embeds = np.random.default_rng(0).standard_normal((rows, 1, hidden), np.float32)
    started = time.monotonic()
    for _ in range(STEPS):
        session.step(step_embeds, np.arange(rows))
    return started, time.monotonic()


def step_ms(exported: Path, prefixes: tuple[int, ...]) -> tuple[dict, dict]:
    """{prefix tokens: {rows: median ms per decode step}}, the configurations interleaved round by round, and
    {rows: the matmul kernels of those steps}, noted in the warm-up round."""
    model, hidden = open_language_model(exported)
    times: dict = {prefix: {rows: [] for rows in ROWS} for prefix in prefixes}
    kernels = {}
    for round_ in range(ROUNDS):
        for prefix in prefixes:
            for rows in ROWS:
                start, end = decode_steps(prefilled_session(model, hidden, prefix, rows), hidden, rows)
                if round_:
                    times[prefix][rows].append((end - start) / STEPS * 1000)
                else:
                    kernels[rows] = matmul_kernels(model.compiled)
    return (
        {prefix: {rows: statistics.median(ms) for rows, ms in by_rows.items()} for prefix, by_rows in times.items()},
        kernels,
    )


def matmul_kernels(compiled) -> str:
    """The kernels the CPU plugin ran the matmuls (FullyConnected nodes) of its last inference with.

    With dynamic shapes the plugin picks a kernel per input shape; its runtime model names the last one."""
    kinds = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "FullyConnected":
            kinds.add(info["primitiveType"].astype(str))
    return ", ".join(sorted(kinds))


def decode_loop(exported: Path, prefix_tokens: int, rows: int, seconds: float) -> list[tuple[float, float]]:
    """Child under `perf record`: prefill and decode again and again; the decode windows, to tell samples apart."""
    model, hidden = open_language_model(exported)
    windows = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        windows.append(decode_steps(prefilled_session(model, hidden, prefix_tokens, rows), hidden, rows))
    return windows


def sampled_shares(exported: Path, prefix_tokens: int, rows: int) -> dict:
    """Share of the CPU samples inside decode steps by code kind, or {"unavailable": why}."""
    if not shutil.which("perf"):
        return {"unavailable": "Linux perf is not installed (Debian: linux-perf)"}
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "perf.data"
        record = subprocess.run(
            [
                "perf",
                "record",
                "-q",
                "-k",
                "CLOCK_MONOTONIC",
                "-e",
                "cpu-clock",
                "-F",
                str(SAMPLES_PER_S),
                "-o",
                str(data),
                "--",
                sys.executable,
                __file__,
                "--loop",
                str(rows),
                "--model",
                str(exported),
                "--prefix-tokens",
                str(prefix_tokens),
            ],
            capture_output=True,
            text=True,
        )
        if record.returncode != 0:
            return {"unavailable": f"perf record failed: {(record.stderr.strip().splitlines() or ['?'])[-1]}"}
        windows = json.loads(record.stdout.strip().splitlines()[-1])
        script = subprocess.run(
            ["perf", "script", "-i", str(data), "-G", "-F", "time,ip,dso"], capture_output=True, text=True, check=True
        )
    return shares_in_windows(script.stdout, windows)


def shares_in_windows(perf_script: str, windows: list) -> dict:
    """Classify `perf script -F time,ip,dso` lines that fall inside one of `windows` by code kind."""
    starts = np.array([start for start, _ in windows])
    counts = dict.fromkeys(CODE_KINDS, 0)
    for line in perf_script.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        moment = float(fields[0].rstrip(":"))
        window = int(np.searchsorted(starts, moment)) - 1
        if window >= 0 and moment <= windows[window][1]:
            counts[code_kind(fields[2])] += 1
    total = sum(counts.values())
    if not total:
        return {"unavailable": "no samples fell inside the decode steps"}
    return {"samples": total, **{kind: count / total for kind, count in counts.items()}}


def code_kind(dso: str) -> str:
    """Which kind of code a sample's DSO (as `perf script` prints it, in parentheses) is."""
    if "/perf-" in dso or "[unknown]" in dso or "anon" in dso:  # executable memory with no file: JIT kernels
        return "generated"
    if "openvino_intel_cpu_plugin" in dso:
        return "plugin"
    if "libtbb" in dso or "kernel.kallsyms" in dso:
        return "threads"
    return "other"


def measure(exported: Path, prefix_tokens: int) -> dict:
    times, kernels = step_ms(exported, (prefix_tokens, SHORT_PREFIX))
    return {
        "prefix_tokens": prefix_tokens,
        "step_ms": times,
        "matmul_kernels": kernels,
        "samples": {rows: sampled_shares(exported, prefix_tokens, rows) for rows in SAMPLED_ROWS},
    }


def prefix_attention_remark(extra_ms: float) -> str:
    """What the extra cost per row after the long prefix says: attention over it, unless noise hid it."""
    if extra_ms <= 0:
        return (
            f"The difference, {extra_ms:.1f} ms per row, is within this run's noise: it did not show the "
            "attention over the longer prefix that each row computes again."
        )
    return (
        f"The difference, {extra_ms:.1f} ms per row, is attention over the longer prefix: each row computes "
        "it again, though the rows share the cached prefix."
    )


def many_rows_remark(short: dict) -> str:
    """What a row costs from 8 to 16 rows against 1 to 4, after the short prefix."""
    few, many = (short[4] - short[1]) / 3, (short[16] - short[8]) / 8
    against_few = f" ({many / few:.0%} of its cost from 1 to 4 rows)" if few >= MEASURABLE_MS else ""
    return f" From 8 to 16 rows, after the {SHORT_PREFIX}-token prefix, a row adds {many:.1f} ms{against_few}."


def section(profile: dict) -> str:
    """RESULTS.md's decode profile: step times by rows and prefix, then the sampled shares."""
    prefix = profile["prefix_tokens"]
    step = {int(p): {int(r): ms for r, ms in by_rows.items()} for p, by_rows in profile["step_ms"].items()}
    long, short = step[prefix], step[SHORT_PREFIX]
    kernels = {int(rows): kind for rows, kind in profile["matmul_kernels"].items()}
    rows_header = " | ".join(f"{rows} {'row' if rows == 1 else 'rows'}" for rows in ROWS)
    lines = [f"| prefix | {rows_header} |", "|" + " --- |" * (len(ROWS) + 1)]
    for tokens in (prefix, SHORT_PREFIX):
        lines.append(f"| {tokens} tokens | " + " | ".join(f"{step[tokens][rows]:.1f}" for rows in ROWS) + " |")
    lines.append("| matmul kernel | " + " | ".join(f"`{kernels[rows]}`" for rows in ROWS) + " |")
    per_row = (long[4] - long[1]) / 3
    per_row_short = (short[4] - short[1]) / 3
    text = (
        "## Decode, profiled (language model alone, ms per step)\n\n" + "\n".join(lines) + "\n\n"
        f"From 1 to 4 rows, each row adds {per_row:.1f} ms per step after the {prefix}-token prefix and "
        f"{per_row_short:.1f} ms after a {SHORT_PREFIX}-token one. "
        + prefix_attention_remark(per_row - per_row_short)
        + many_rows_remark(short)
        + " Medians of "
        f"{ROUNDS - 1} interleaved rounds of {STEPS} steps, random embeddings, the engine's settings.\n"
    )
    samples = {int(rows): shares for rows, shares in profile["samples"].items()}
    if any("unavailable" in shares for shares in samples.values()):
        reasons = {shares["unavailable"] for shares in samples.values() if "unavailable" in shares}
        return text + f"\nNo sampled profile: {'; '.join(sorted(reasons))}.\n"
    lines = [
        "| where the CPU was | " + " | ".join(f"{rows} {'row' if rows == 1 else 'rows'}" for rows in samples) + " |",
        "|" + " --- |" * (len(samples) + 1),
    ]
    for kind, label in CODE_KINDS.items():
        lines.append(f"| {label} | " + " | ".join(f"{shares[kind]:.0%}" for shares in samples.values()) + " |")
    counts = ", ".join(f"{shares['samples']}" for shares in samples.values())
    return (
        text + "\nSampled by Linux `perf` during the decode steps after the "
        f"{prefix}-token prefix ({counts} samples on both cores):\n\n" + "\n".join(lines) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=REPO / ".cache" / "bench" / "llava-bench-int4",
        help="an exported model directory (default: the bench model)",
    )
    parser.add_argument(
        "--prefix-tokens",
        type=int,
        default=583,
        help="prefix length (default: %(default)s, the bench model's system prompt, USER: and 576 image tokens)",
    )
    parser.add_argument("--loop", type=int, metavar="ROWS", help=argparse.SUPPRESS)  # child under perf record
    args = parser.parse_args(argv)
    if args.loop:
        print(json.dumps(decode_loop(args.model, args.prefix_tokens, args.loop, SAMPLING_S)))
        return 0
    print(section(measure(args.model, args.prefix_tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
