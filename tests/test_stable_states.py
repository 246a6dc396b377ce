"""States that do not flap: a question's published state changes only once `confirm` answers from distinct
frames agree on the new value, and answers below `min_confidence` change nothing.

`StableState` is pure and tested case by case; `decide` re-checks a pending change on every new frame; the
config refuses `min_confidence` where answers have no confidence. The agent tests run the demo model on a
video whose door flickers, on a real broker: with `confirm: 3` the published state changes once, while
the answers JSON shows every flicker; with `confirm: 1` the same video flaps.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from edge_agent.config import InvalidValue, Question, parse_config
from edge_agent.devtools.demo import DEMO_MODEL, demo_config
from edge_agent.devtools.loopback import BrokerAddress
from edge_agent.devtools.scenes import render, scene_timeline
from edge_agent.loop import Turn, decide
from edge_agent.questions import KINDS
from edge_agent.stable import Pending, StableState
from tests.support.agent import RunningAgent, write_video
from tests.support.broker import wait_until
from tests.test_config import error_of, question, with_changes

REPO = pathlib.Path(__file__).resolve().parents[1]

# -- the stable state of one question ---------------------------------------------------------------------


def observe_all(stable: StableState, answers, first_frame: int = 1) -> list[str]:
    """Feed (value, confidence) answers, each from the next frame; the published state after each one."""
    states = []
    for frame, (value, confidence) in enumerate(answers, start=first_frame):
        stable.observe(value, state_of(value), confidence, frame)
        states.append(stable.state)
    return states


def state_of(value) -> str:
    """The Home Assistant state of a yes/no, choice or unknown value, as `questions.state_string` makes it."""
    if value is None:
        return "unknown"
    return ("ON" if value else "OFF") if isinstance(value, bool) else str(value)


def sure(*values) -> list[tuple[object, float]]:
    """Answers given with high confidence."""
    return [(value, 0.99) for value in values]


def test_with_confirm_1_every_new_answer_is_published_at_once_as_before():
    stable = StableState(confirm=1)

    assert observe_all(stable, sure(True, False, True, None, False)) == ["ON", "OFF", "ON", "unknown", "OFF"]
    assert stable.pending is None


def test_the_first_value_is_published_once_confirm_answers_agree_and_until_then_the_state_is_unknown():
    stable = StableState(confirm=3)

    assert observe_all(stable, sure(True, True)) == ["unknown", "unknown"]
    assert (stable.value, stable.pending) == (None, Pending(value=True, agreeing=2, needed=3))
    assert observe_all(stable, sure(True), first_frame=3) == ["ON"]
    assert (stable.value, stable.pending) == (True, None)


def test_one_disagreeing_answer_leaves_the_state_and_the_next_agreeing_one_ends_the_pending_change():
    stable = StableState(confirm=3)
    observe_all(stable, sure(True, True, True))

    assert observe_all(stable, sure(False), first_frame=4) == ["ON"]
    assert stable.pending == Pending(value=False, agreeing=1, needed=3)
    assert observe_all(stable, sure(True), first_frame=5) == ["ON"]
    assert stable.pending is None


def test_a_change_needs_confirm_consecutive_agreeing_answers():
    stable = StableState(confirm=3)
    observe_all(stable, sure(False, False, False))

    states = observe_all(stable, sure(True, True, False, True, True, True), first_frame=4)

    assert states == ["OFF", "OFF", "OFF", "OFF", "OFF", "ON"]


def test_a_pending_change_interrupted_by_a_third_value_starts_over_with_that_value():
    stable = StableState(confirm=2)
    observe_all(stable, sure("red", "red"))

    assert observe_all(stable, sure("blue"), first_frame=3) == ["red"]
    assert observe_all(stable, sure("green"), first_frame=4) == ["red"]
    assert stable.pending == Pending(value="green", agreeing=1, needed=2)
    assert observe_all(stable, sure("green"), first_frame=5) == ["green"]


def test_answers_from_the_same_frame_count_once():
    stable = StableState(confirm=2)

    for _ in range(3):
        stable.observe(True, "ON", 0.99, frame=7)

    assert (stable.state, stable.pending) == ("unknown", Pending(value=True, agreeing=1, needed=2))
    stable.observe(True, "ON", 0.99, frame=8)
    assert stable.state == "ON"


def test_an_answer_from_an_earlier_frame_than_one_counted_does_not_count():
    stable = StableState(confirm=2)
    stable.observe(True, "ON", 0.99, frame=8)

    stable.observe(True, "ON", 0.99, frame=5)

    assert stable.pending == Pending(value=True, agreeing=1, needed=2)


def test_an_answer_below_min_confidence_neither_counts_nor_breaks_a_pending_change():
    stable = StableState(confirm=3, min_confidence=0.6)
    observe_all(stable, sure(True, True, True))

    states = observe_all(stable, [(False, 0.9), (False, 0.4), (True, 0.5), (False, 0.9)], first_frame=4)

    assert states == ["ON", "ON", "ON", "ON"]
    assert stable.pending == Pending(value=False, agreeing=2, needed=3)
    assert observe_all(stable, [(False, 0.61)], first_frame=8) == ["OFF"]


def test_with_confirm_1_an_answer_below_min_confidence_leaves_the_state_as_it_is():
    stable = StableState(confirm=1, min_confidence=0.6)

    assert observe_all(stable, [(True, 0.3), (True, 0.9), (False, 0.59), (False, 0.6)]) == [
        "unknown",
        "ON",
        "ON",
        "OFF",
    ]


@pytest.mark.parametrize(
    ("min_confidence", "counts"),
    [(0.0, True), (0.5, False)],
    ids=["no-minimum-counts", "minimum-does-not-count"],
)
@pytest.mark.parametrize("confidence", [None, float("nan")], ids=["none", "nan"])
def test_an_answer_without_a_confidence_number_counts_only_without_a_minimum(min_confidence, counts, confidence):
    stable = StableState(confirm=1, min_confidence=min_confidence)

    stable.observe(True, "ON", confidence, frame=1)

    assert stable.value is (True if counts else None)


def test_an_unknown_answer_is_a_value_like_any_other_and_needs_confirming_too():
    stable = StableState(confirm=2)
    observe_all(stable, sure(True, True))

    assert observe_all(stable, sure(None, True, None), first_frame=3) == ["ON", "ON", "ON"]
    assert stable.pending == Pending(value=None, agreeing=1, needed=2)
    assert observe_all(stable, sure(None), first_frame=6) == ["unknown"]
    assert stable.value is None


def test_a_confirmed_value_keeps_the_state_of_the_answers_that_confirmed_it():
    stable = StableState(confirm=2)

    stable.observe(7, "7", None, frame=1)
    stable.observe(7, "7", None, frame=2)

    assert (stable.value, stable.state) == (7, "7")


# -- re-checking a pending change on new frames ------------------------------------------------------------

RECHECKS = [
    # changed, have_context, due, pending_asks, rechecks -> turn
    pytest.param(False, True, 0, 0, 1, Turn.ENCODE, id="unchanged-recheck-encodes-the-new-frame"),
    pytest.param(False, True, 1, 0, 1, Turn.ENCODE, id="unchanged-due-and-recheck"),
    pytest.param(False, True, 0, 1, 2, Turn.ENCODE, id="unchanged-ask-and-rechecks"),
    pytest.param(True, True, 0, 0, 1, Turn.ENCODE, id="changed-recheck"),
    pytest.param(True, True, 2, 3, 1, Turn.ENCODE, id="changed-everything-waits"),
    pytest.param(False, True, 1, 0, 0, Turn.REUSE, id="unchanged-due-no-recheck-reuses"),
    pytest.param(False, True, 0, 0, 0, Turn.SKIP, id="unchanged-nothing-waits"),
]
"""A pending change is re-checked on every new frame: the frame is encoded even if the gate finds it unchanged."""


@pytest.mark.parametrize(("changed", "have_context", "due", "pending_asks", "rechecks", "turn"), RECHECKS)
def test_a_pending_change_is_rechecked_on_a_newly_encoded_frame_whatever_the_gate_says(
    changed, have_context, due, pending_asks, rechecks, turn
):
    taken = decide(changed=changed, have_context=have_context, due=due, pending_asks=pending_asks, rechecks=rechecks)

    assert taken is turn


# -- the config ---------------------------------------------------------------------------------------------


def stable_state_of(mapping: dict, index: int = 0) -> StableState:
    config = parse_config(mapping)
    return StableState.for_question(config.questions[index], config.question_defaults)


def test_questions_take_confirm_and_min_confidence_from_question_defaults_unless_they_set_their_own():
    mapping = with_changes(
        question_defaults={"confirm": 3, "min_confidence": 0.7},
        questions=[question(type="yes_no"), question(id="b", type="yes_no", confirm=2, min_confidence=0.5)],
    )

    assert (stable_state_of(mapping, 0).confirm, stable_state_of(mapping, 0).min_confidence) == (3, 0.7)
    assert (stable_state_of(mapping, 1).confirm, stable_state_of(mapping, 1).min_confidence) == (2, 0.5)


def test_the_defaults_keep_every_answer_published_as_it_comes():
    stable = stable_state_of(with_changes(questions=[question(type="yes_no")]))

    assert (stable.confirm, stable.min_confidence) == (1, 0.0)


def test_the_default_min_confidence_does_not_apply_to_answers_that_have_no_confidence():
    mapping = with_changes(question_defaults={"min_confidence": 0.9}, questions=[question(type="number")])

    assert stable_state_of(mapping).min_confidence == 0.0


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        (
            with_changes(questions=[question(type="number", min_confidence=0.5)]),
            "config.yaml: questions[0].min_confidence: only allowed when type is yes_no or choice (type is number):"
            " other answers have no confidence",
        ),
        (
            with_changes(questions=[question(min_confidence=0.5)]),
            "config.yaml: questions[0].min_confidence: only allowed when type is yes_no or choice (type is text):"
            " other answers have no confidence",
        ),
        (
            with_changes(questions=[question(type="yes_no", min_confidence=1.5)]),
            "config.yaml: questions[0].min_confidence: must be between 0 and 1",
        ),
        (with_changes(questions=[question(confirm=0)]), "config.yaml: questions[0].confirm: must be a positive number"),
        (
            with_changes(question_defaults={"confirm": 2.5}),
            "config.yaml: question_defaults.confirm: must be an integer, got 2.5",
        ),
        (
            with_changes(question_defaults={"min_confidence": -0.1}),
            "config.yaml: question_defaults.min_confidence: must be between 0 and 1",
        ),
    ],
    ids=["number", "text", "above-1", "confirm-0", "confirm-fraction", "default-below-0"],
)
def test_a_wrong_confirm_or_min_confidence_is_one_line_naming_the_key(mapping, message):
    assert error_of(mapping) == message


def test_min_confidence_is_allowed_on_exactly_the_kinds_whose_engine_picks_an_option():
    picking = {name for name, kind in KINDS.items() if kind.constraint.picks_option}
    for name in KINDS:
        options = ("a", "b") if KINDS[name].constraint.question_options else ()
        if name in picking:
            Question(id="q", question="Which?", type=name, options=options, min_confidence=0.5)
        else:
            with pytest.raises(InvalidValue, match="min_confidence"):
                Question(id="q", question="Which?", type=name, options=options, min_confidence=0.5)
    assert picking == {"yes_no", "choice"}


# -- the agent: a video whose door flickers -----------------------------------------------------------------

CLOSED_WITH_GLITCHES = "CCCOCCCOCC"
OPEN_WITH_GLITCHES = "OOOOCOOOOCOOOOOO"
"""The door in each frame: closed with single open frames, then really open with single closed frames."""
CAMERA_FPS = 4.0
"""Frames per second of the video and of the camera: each frame is one frame the agent looks at."""


@pytest.fixture(scope="module")
def flickering_door(tmp_path_factory):
    """The demo room, its door closed then open, each phase with single frames that show the other state."""
    scene = scene_timeline()[0].scene
    rng = np.random.default_rng(0)
    frames = [
        render(dataclasses.replace(scene, door_open=door == "O"), 320, 240, rng)
        for door in CLOSED_WITH_GLITCHES + OPEN_WITH_GLITCHES
    ]
    return write_video(tmp_path_factory.mktemp("flicker") / "door.mp4", frames, fps=CAMERA_FPS)


def play_door_video(broker, subscriber, video, confirm: int) -> tuple[list[str], list[dict]]:
    """Run the agent on the whole video; the door's published states and answers, in order."""
    state_topic, answers_topic = "edge-agent/demo/state/door_open", "edge-agent/demo/answers/door_open"
    listener = subscriber(broker, state_topic, answers_topic)
    config = demo_config(REPO / DEMO_MODEL, video, BrokerAddress(broker.host, broker.port, "5", "mosquitto"))
    config["camera"].update(fps=CAMERA_FPS, loop=False)
    config["question_defaults"] = {"confirm": confirm}
    door = {"id": "door_open", "question": "Is the door open?", "type": "yes_no", "trigger": "change", "every": 0.1}
    config["questions"] = [door]
    with RunningAgent(config) as agent:
        wait_until(lambda: agent._feeds[0].reader.ended, timeout=60, what="the video ended")
        wait_until(
            lambda: agent._feeds[0].last_seq == agent._feeds[0].reader.frames_read,
            timeout=10,
            what="the last frame seen",
        )
    states = [m.payload.decode() for m in listener.on(state_topic)]
    return states, [json.loads(m.payload) for m in listener.on(answers_topic)]


def changes(states: list[str]) -> list[str]:
    """The states in order with repeats dropped: what an automation watching the state sees."""
    return [state for index, state in enumerate(states) if index == 0 or state != states[index - 1]]


def test_with_confirm_3_the_published_door_state_changes_once_while_the_answers_show_every_flicker(
    broker, subscriber, flickering_door
):
    states, answers = play_door_video(broker, subscriber, flickering_door, confirm=3)

    assert changes(states) == ["unknown", "OFF", "ON"], states
    assert any(a["latest_value"] is True and a["value"] is False for a in answers), "no open glitch was shown"
    assert any(a["latest_value"] is False and a["value"] is True for a in answers), "no closed glitch was shown"
    for answer in answers:
        assert answer["raw"] == ("Yes" if answer["latest_value"] else "No"), answer
        assert 0.5 <= answer["confidence"] <= 1.0, answer
    confirming = [a["pending"] for a in answers if a["pending"] is not None and a["pending"]["value"] is True]
    assert {"value": True, "agreeing": 2, "needed": 3} in confirming, "the change was not re-checked on new frames"


def test_with_confirm_1_the_same_flickering_door_flaps(broker, subscriber, flickering_door):
    states, answers = play_door_video(broker, subscriber, flickering_door, confirm=1)

    assert len(changes(states)) > 3, states
    assert all(a["latest_value"] == a["value"] and a["pending"] is None for a in answers), answers
