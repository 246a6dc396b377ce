"""Standing questions: what the model is asked, how its answer is typed, and when each question is due."""

import pytest

from edge_agent.config import Question
from edge_agent.questions import Schedule, TypedAnswer, build_prompt, parse_answer, state_string

DOOR = Question(id="door", question="Is the door open?", type="yes_no")
LIGHT = Question(id="light", question="What colour is the light?", type="choice", options=("red", "Green", "dark red"))
ROOM = Question(id="room", question="Which room is this?", type="choice", options=("living room", "kitchen"))
PEOPLE = Question(id="people", question="How many people are there?", type="number")
SHELF = Question(id="shelf", question="What is on the shelf?", type="text")


def test_a_yes_no_question_gets_llavas_short_answer_instruction():
    assert build_prompt(DOOR) == "Is the door open?\nAnswer the question using a single word or phrase."


def test_a_choice_question_lists_its_options_one_per_line():
    assert build_prompt(LIGHT) == ("What colour is the light?\nred\nGreen\ndark red\nAnswer with one of the options.")


def test_the_questions_own_instruction_wins_and_an_empty_one_leaves_it_out():
    listing = Question(id="shelf", question="What is on the shelf?", type="text", instruction="List the objects.")
    bare = Question(id="shelf", question="Describe the shelf.", type="text", instruction="")

    assert build_prompt(listing) == "What is on the shelf?\nList the objects."
    assert build_prompt(bare) == "Describe the shelf."


@pytest.mark.parametrize(
    ("question", "raw", "value"),
    [
        (DOOR, "Yes", True),
        (DOOR, "yes.", True),
        (DOOR, " YES, the door is open.", True),
        (DOOR, "No", False),
        (DOOR, "n", False),
        (DOOR, "True", True),
        (DOOR, "false!", False),
        (LIGHT, "Red", "red"),
        (LIGHT, "green.", "Green"),
        (LIGHT, "The light is green", "Green"),
        (LIGHT, "Dark red", "dark red"),
        (LIGHT, "It is dark red.", "dark red"),
        (ROOM, "Living", "living room"),
        (ROOM, "the KITCHEN", "kitchen"),
        (PEOPLE, "2", 2),
        (PEOPLE, "There are 3 people.", 3),
        (PEOPLE, "Three", 3),
        (PEOPLE, "twenty", 20),
        (PEOPLE, "None.", 0),
        (PEOPLE, "No", 0),
        (PEOPLE, "zero", 0),
        (PEOPLE, "two (2)", 2),
        (SHELF, "  A red cup and a book.\n", "A red cup and a book."),
    ],
)
def test_raw_answers_are_typed(question, raw, value):
    typed = parse_answer(question, raw)

    assert typed == TypedAnswer(value, raw)
    assert typed.ok


@pytest.mark.parametrize(
    ("question", "raw"),
    [
        (DOOR, "The door is open"),
        (DOOR, "maybe"),
        (DOOR, ""),
        (LIGHT, "blue"),
        (LIGHT, "red or green"),
        (ROOM, ""),
        (PEOPLE, "a few"),
        (PEOPLE, "3 or 4"),
        (PEOPLE, "2.5"),
        (PEOPLE, "No, there are 2."),
        (SHELF, "   "),
    ],
)
def test_an_answer_that_cannot_be_typed_stays_unknown_with_its_raw_text(question, raw):
    typed = parse_answer(question, raw)

    assert typed.value is None and not typed.ok
    assert typed.raw == raw
    assert state_string(question, typed) == "unknown"


@pytest.mark.parametrize(
    ("question", "raw", "state"),
    [
        (DOOR, "Yes", "ON"),
        (DOOR, "No", "OFF"),
        (LIGHT, "green", "Green"),
        (PEOPLE, "four", "4"),
        (SHELF, "a cup", "a cup"),
    ],
)
def test_home_assistant_states(question, raw, state):
    assert state_string(question, parse_answer(question, raw)) == state


def test_a_long_text_state_is_cut_to_home_assistants_limit():
    state = state_string(SHELF, parse_answer(SHELF, "cup " * 100))

    assert len(state) == 255
    assert state.startswith("cup cup")


def every(seconds, trigger, id="q"):
    return Question(id=id, question="Anything?", type="text", every=seconds, trigger=trigger)


def answer_due(schedule, now, scene_changed=False) -> list[str]:
    """Ask the schedule what is due, answer all of it at once, and return the ids answered."""
    due = schedule.due(now, scene_changed)
    for question in due:
        schedule.mark_answered(question.id, now)
    return [question.id for question in due]


def test_on_the_first_frame_every_question_is_due():
    schedule = Schedule([every(10, "interval", "a"), every(10, "change", "b")])

    assert answer_due(schedule, now=100.0, scene_changed=False) == ["a", "b"]


def test_an_interval_question_is_due_every_interval_whatever_the_scene():
    schedule = Schedule([every(10, "interval")])
    answered = [t for t in range(0, 35) if answer_due(schedule, float(t), scene_changed=t % 2 == 0)]

    assert answered == [0, 10, 20, 30]


def test_a_change_question_waits_for_a_change():
    schedule = Schedule([every(5, "change")])
    answer_due(schedule, 0.0)

    assert [t for t in range(1, 60) if answer_due(schedule, float(t))] == []
    assert answer_due(schedule, 60.0, scene_changed=True) == ["q"]


def test_a_burst_of_changes_gives_one_answer_per_interval_and_the_last_change_is_not_lost():
    schedule = Schedule([every(5, "change")])
    answer_due(schedule, 0.0)
    changes = {1, 2, 3, 4, 5, 6, 7}

    answered = [t for t in range(1, 30) if answer_due(schedule, float(t), scene_changed=t in changes)]

    assert answered == [5, 10]


def test_a_question_not_marked_answered_stays_due():
    schedule = Schedule([every(10, "interval")])

    assert schedule.due(0.0, False) == schedule.due(1.0, False) == [every(10, "interval")]
