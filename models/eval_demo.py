"""Measure the demo LLaVA's accuracy on held-out scenes, through the engine the agent runs.

    python models/eval_demo.py --scenes 300

Scenes come from seeds 1,000,000 and up, which training (seeds 0..--scenes-1 of train_demo.py) never
uses, at every resolution of `edge_agent.devtools.scenes.RESOLUTIONS`. Each scene is asked one question per fact
(door, people, cup, bag, bag colour when there is one) in the agent's own prompt form, and an answer
counts as right when `edge_agent.questions.parse_answer` gives the true typed value.

Three variants are measured: FP32 (an fp32 export run at f32 precision, equal to the checkpoint's greedy
answers), the shipped INT8 export, and an INT4 export (language model at 4 bits, group 128), to show how
much accuracy quantization keeps. The table gives each accuracy with its 95% Wilson interval.

A second table shows what a region is worth (`region:` in the config): each held-out frame is a wide
1280x720 camera over a 4 x 4 grid of rooms (`scenes.render_grid`, 320x180 each), and the questions ask about
one of them, answered by the INT8 export once on the whole frame and once on that room's region, cut by the
agent's own `capture.views.crop`. On the whole frame the room is 16 x 16 of the model's 64 x 64 input pixels
(its cup about one pixel); on the region, all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
import tempfile
from collections import defaultdict

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edge_agent.capture.views import crop  # noqa: E402
from edge_agent.devtools import scenes  # noqa: E402
from edge_agent.questions import build_prompt, parse_answer  # noqa: E402

MODEL = REPO / "models" / "demo-llava"
HELD_OUT_SEED = 10**6
"""The first held-out scene seed; training uses seeds below its scene count, far below this."""
QUESTION_TYPES = ("yes_no", "choice", "number", "text")
TOPICS = ("door", "people", "cup", "bag")
"""Rows of the table: accuracy by answer type, then by what the question is about."""


@dataclasses.dataclass
class Tally:
    """Right and asked answers per question type and per topic."""

    right: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    asked: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, correct: bool) -> None:
        self.asked[kind] += 1
        self.right[kind] += int(correct)

    def accuracy(self, kind: str) -> float:
        return self.right[kind] / self.asked[kind] if self.asked[kind] else float("nan")

    def interval(self, kind: str) -> tuple[float, float]:
        """The 95% Wilson score interval of the accuracy of `kind`."""
        n, p, z = self.asked[kind], self.accuracy(kind), 1.96
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)


def held_out(count: int) -> list[tuple[np.ndarray, list[scenes.Asked]]]:
    """`count` held-out frames (BGR, at varied resolutions) with their questions and true answers."""
    cases = []
    for seed in range(HELD_OUT_SEED, HELD_OUT_SEED + count):
        rng = np.random.default_rng(seed)
        scene = scenes.random_scene(rng)
        width, height = scenes.random_size(rng)
        cases.append((scenes.render(scene, width, height, rng), scenes.questions_for(scene, rng)))
    return cases


GRID = 4
"""Rooms per side of a region table frame."""
ROOM_SIZE = (320, 180)
"""(width, height) of each room of a region table frame: 1280x720 in all."""


def held_out_grids(count: int) -> list[tuple[np.ndarray, tuple[float, ...], list[scenes.Asked]]]:
    """`count` held-out wide frames of GRID x GRID rooms, each with one room's region and questions about it."""
    cases = []
    for seed in range(HELD_OUT_SEED, HELD_OUT_SEED + count):
        rng = np.random.default_rng(seed)
        rooms = [scenes.random_scene(rng) for _ in range(GRID * GRID)]
        frame = scenes.render_grid(rooms, GRID, *ROOM_SIZE, rng)
        asked_about = int(rng.integers(len(rooms)))
        region = scenes.grid_region(asked_about, GRID, GRID)
        cases.append((frame, region, scenes.questions_for(rooms[asked_about], rng)))
    return cases


def measure_regions(engine, cases) -> dict[str, Tally]:
    """The questions of `cases` answered on the whole frame and on their room's region."""
    return {
        "whole frame": measure(engine, [(frame, asked) for frame, _, asked in cases]),
        "region": measure(engine, [(crop(frame, region), asked) for frame, region, asked in cases]),
    }


def measure(engine, cases) -> Tally:
    """Ask `engine` every question of `cases` (one encode per frame, its questions as one batch)."""
    from edge_agent.engine import Prompt

    tally = Tally()
    for frame, asked in cases:
        context = engine.encode(frame)
        answers = engine.answer(context, [Prompt(build_prompt(a.question), max_new_tokens=8) for a in asked])
        for item, answer in zip(asked, answers):
            right = is_right(item, answer.text)
            tally.add(item.question.type, right)
            tally.add(item.topic, right)
    return tally


def is_right(asked: scenes.Asked, text: str) -> bool:
    value = parse_answer(asked.question, text).value
    if isinstance(value, str) and isinstance(asked.truth, str):
        return value.strip().casefold() == asked.truth.casefold()
    return value == asked.truth and type(value) is type(asked.truth)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=300, help="held-out scenes to ask about")
    parser.add_argument(
        "--model", type=pathlib.Path, default=MODEL, help="directory holding checkpoint/ and openvino-int8/"
    )
    args = parser.parse_args(argv)
    from edge_agent.engine import Engine
    from edge_agent.export import export_model

    cases = held_out(args.scenes)
    tallies = {}
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = str(args.model / "checkpoint")
        fp32 = export_model(checkpoint, pathlib.Path(scratch) / "fp32", weight_format="fp32", progress=False)
        int4 = export_model(checkpoint, pathlib.Path(scratch) / "int4", weight_format="int4", progress=False)
        variants = {"FP32": (fp32, "f32"), "INT8": (args.model / "openvino-int8", None), "INT4": (int4, None)}
        for name, (directory, precision) in variants.items():
            tallies[name] = measure(Engine.load(directory, inference_precision=precision), cases)
            print(f"{name} measured", file=sys.stderr, flush=True)
    print_table(tallies, f"{args.scenes} held-out scenes (seeds {HELD_OUT_SEED}..)")
    regions = measure_regions(Engine.load(args.model / "openvino-int8"), held_out_grids(args.scenes))
    print()
    print_table(regions, f"{args.scenes} held-out {GRID}x{GRID} grids of rooms, one room asked about (INT8)")


def print_table(tallies: dict[str, Tally], cases: str) -> None:
    print(f"accuracy on {cases}, 95% Wilson interval")
    print(f"{'asked about':<14}{'asked':>7}" + "".join(f"{name:>22}" for name in tallies))
    for kind in QUESTION_TYPES + TOPICS:
        asked = next(iter(tallies.values())).asked[kind]
        cells = []
        for tally in tallies.values():
            low, high = tally.interval(kind)
            cells.append(f"{100 * tally.accuracy(kind):6.1f}% ({100 * low:4.1f}-{100 * high:5.1f})")
        print(f"{kind:<14}{asked:>7}" + "".join(f"{cell:>22}" for cell in cells))


if __name__ == "__main__":
    main()
