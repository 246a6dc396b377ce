"""Where the questions' pass and a decode step of the language model go, per node type (OpenVINO `PERF_COUNT`).

For one exported model it builds the engine's language model (paged on the CPU, `edge_agent/engine/paged.py`,
and the stateful graph, `language.py`) with the engine's compile settings plus `PERF_COUNT`, and on random
embeddings times, interleaved round by round:
- `prefix`: the prefix alone (`prefill_prefix`), as `edge-agent bench` splits a frame;
- `questions`: 4 questions of `QUESTION_TOKENS` tokens after the cached prefix (`prefill_questions`): the pass
  that a frame's yes/no questions add to vision and the prefix;
- `step`: a decode step of 4 answers after them.
Each is reported as the median wall time and the plugin's per-node times summed by node type, from the last
round. The CPU plugin reports each node's time as the running mean over every inference of the request (so
the counters of one call do not add up to its wall time): a stage's own times are the change of the running
totals (mean x inferences). Settings named with `--set NAME=VALUE` (compile properties, e.g.
KV_CACHE_PRECISION=u8) are measured as further variants in the same rounds, so levers compare in one run. Run alone:

    python benchmarks/pass_profile.py --model DIR [--prefix-tokens 583] [--set KV_CACHE_PRECISION=u8] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTIONS = 4
QUESTION_TOKENS = 12
"""About the length of a standing question and its chat-template suffix in the bench tokenizer."""
ROUNDS = 5
"""Rounds of every variant in turn; the first warms up and is dropped."""
STAGES = ("prefix", "questions", "step")
TOP_NODE_TYPES = 6


def load(exported: Path, path: str, overrides: dict):
    """The engine's language model (`paged` or `stateful`) with its settings, `overrides` and PERF_COUNT."""
    import openvino as ov

    from edge_agent.engine.language import StatefulLanguageModel
    from edge_agent.engine.paged import load_language_model

    graph = exported / "openvino_language_model.xml"
    properties = {"PERF_COUNT": True, **overrides}
    if path == "paged":
        model = load_language_model(ov.Core(), graph, "CPU", **properties)
    else:
        model = StatefulLanguageModel.load(ov.Core(), graph, "CPU", **properties)
    model.request = CountingRequest(model.request)
    return model


class CountingRequest:
    """An infer request that counts its inferences (the plugin's counters are means over them)."""

    def __init__(self, request):
        self._request = request
        self.inferences = 0

    def infer(self, *args, **kwargs):
        self.inferences += 1
        return self._request.infer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._request, name)


def node_totals(request: CountingRequest) -> collections.Counter:
    """Milliseconds per node type summed over every inference of the request so far."""
    totals = collections.Counter()
    for node in request.profiling_info:
        if node.status.name == "EXECUTED":
            totals[node.node_type] += node.real_time.total_seconds() * 1000 * request.inferences
    return totals


def one_round(model, hidden: int, prefix_tokens: int, seed: int) -> dict:
    """Wall ms and per-node-type ms of each stage, on one new session."""
    rng = np.random.default_rng(seed)
    session = model.session(rng.standard_normal((1, prefix_tokens, hidden), np.float32))
    questions = list(rng.standard_normal((QUESTIONS, QUESTION_TOKENS, hidden), np.float32))
    step_embeds = rng.standard_normal((QUESTIONS, 1, hidden), np.float32)
    measured = {}
    for stage, run in (
        ("prefix", session.prefill_prefix),
        ("questions", lambda: session.prefill_questions(questions)),
        ("step", lambda: session.step(step_embeds, np.arange(QUESTIONS))),
    ):
        before = node_totals(model.request)
        started = time.perf_counter()
        run()
        elapsed = (time.perf_counter() - started) * 1000
        after = node_totals(model.request)
        measured[stage] = {"ms": elapsed, "nodes": {kind: after[kind] - before[kind] for kind in after}}
    return measured


def measure(exported: Path, prefix_tokens: int, variants: dict[str, tuple[str, dict]]) -> dict:
    """{variant: {stage: {"ms": median wall ms, "nodes": {type: ms} of the last round}}}."""
    hidden = json.loads((exported / "config.json").read_text())["text_config"]["hidden_size"]
    models = {name: load(exported, path, overrides) for name, (path, overrides) in variants.items()}
    rounds = {name: [] for name in models}
    for round_ in range(ROUNDS):
        for name, model in models.items():
            measured = one_round(model, hidden, prefix_tokens, round_)
            if round_:
                rounds[name].append(measured)
    return {
        name: {
            stage: {
                "ms": statistics.median(r[stage]["ms"] for r in measured),
                "nodes": measured[-1][stage]["nodes"],
            }
            for stage in STAGES
        }
        for name, measured in rounds.items()
    }


def section(profile: dict, prefix_tokens: int) -> str:
    """Markdown: wall ms per stage and variant, then each stage's largest node types per variant."""
    names = list(profile)
    lines = ["| variant | " + " | ".join(STAGES) + " |", "|" + " --- |" * (len(STAGES) + 1)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{profile[name][stage]['ms']:.1f}" for stage in STAGES) + " |")
    text = (
        f"Wall ms (medians of {ROUNDS - 1} interleaved rounds): the {prefix_tokens}-token prefix alone, "
        f"{QUESTIONS} questions of {QUESTION_TOKENS} tokens after it, one decode step of {QUESTIONS} answers.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    for stage in ("questions", "step"):
        rows = ["| variant | node types, ms (PERF_COUNT, last round) | sum |", "| --- | --- | --- |"]
        for name in names:
            nodes = profile[name][stage]["nodes"]
            top = sorted(nodes.items(), key=lambda item: -item[1])[:TOP_NODE_TYPES]
            cells = ", ".join(f"{kind} {ms:.1f}" for kind, ms in top)
            rows.append(f"| {name} | {cells} | {sum(nodes.values()):.1f} |")
        text += f"\n`{stage}` by node type:\n\n" + "\n".join(rows) + "\n"
    return text


def parse_setting(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    return name, int(value) if value.lstrip("-").isdigit() else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="exported model directory")
    parser.add_argument("--prefix-tokens", type=int, default=583)
    parser.add_argument("--set", action="append", default=[], help="a compile property to try on the paged path")
    parser.add_argument("--no-stateful", action="store_true", help="leave the stateful path out")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    variants = {"paged": ("paged", {})}
    if not args.no_stateful:
        variants["stateful"] = ("stateful", {})
    for setting in args.set:
        variants[f"paged, {setting}"] = ("paged", dict([parse_setting(part) for part in setting.split(",")]))
    profile = measure(args.model, args.prefix_tokens, variants)
    print(json.dumps(profile, indent=1) if args.json else section(profile, args.prefix_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
