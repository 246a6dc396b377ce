"""The shipped demo LLaVA (models/demo-llava) really sees: through the engine at INT8, it answers questions
about held-out synthetic scenes above accuracy floors set a little under what models/eval_demo.py measured.
A wrong crop, colour order or token boundary anywhere in the pipeline shows up here as lost accuracy."""

from __future__ import annotations

import json

import pytest

from edge_agent.engine import Engine
from models.eval_demo import MODEL, held_out, held_out_grids, measure, measure_regions

FLOORS = {"yes_no": 0.97, "choice": 0.97, "number": 0.95, "text": 0.97, "door": 0.97}
"""Minimum INT8 accuracy per question type, and on door questions (all types), on these 100 held-out scenes,
where it measured 100% on each. The door floor guards the door yes/no drill (see MODEL_CARD.md): without
it door yes/no questions are answered at chance."""

SIZE_LIMIT_MB = 25
REGION_FLOOR = 0.95
"""Minimum INT8 accuracy, over all questions, about one room of a wide frame of 4 x 4 rooms answered on that
room's region (100% on these 40 grids and on eval_demo.py's 300)."""
WHOLE_FRAME_GAP = 0.4
"""How much lower the same questions must score on the whole frame, where the room is 16 x 16 input pixels
(about 45% measured: near chance)."""


@pytest.fixture(scope="module")
def int8_tally():
    return measure(Engine.load(MODEL / "openvino-int8"), held_out(100))


@pytest.mark.parametrize("kind", FLOORS)
def test_int8_answers_held_out_scenes_above_the_floor(int8_tally, kind):
    assert int8_tally.asked[kind] > 30
    assert int8_tally.accuracy(kind) >= FLOORS[kind]


def test_a_region_lets_the_model_read_a_room_that_is_a_few_pixels_of_the_whole_frame():
    tallies = measure_regions(Engine.load(MODEL / "openvino-int8"), held_out_grids(40))
    whole, region = (overall(tallies[name]) for name in ("whole frame", "region"))
    assert region >= REGION_FLOOR
    assert whole <= region - WHOLE_FRAME_GAP


def overall(tally) -> float:
    """Accuracy over every question (each counted once, by its type)."""
    kinds = ("yes_no", "choice", "number", "text")
    return sum(tally.right[kind] for kind in kinds) / sum(tally.asked[kind] for kind in kinds)


def test_the_checkpoint_is_a_plain_llava_that_reads_the_last_vision_layer():
    config = json.loads((MODEL / "checkpoint" / "config.json").read_text())
    assert config["model_type"] == "llava"
    assert config["vision_feature_layer"] == -1


def test_checkpoint_and_int8_export_together_stay_small_enough_for_git():
    size = sum(path.stat().st_size for path in MODEL.rglob("*") if path.is_file())
    assert size < SIZE_LIMIT_MB * 1024 * 1024
