"""Question kinds: one row of `questions.KINDS` per answer type, and every part of the agent reads that row."""

import json
import re

import pytest

from edge_agent.config import parse_config
from edge_agent.mqtt import AgentTopics
from edge_agent.mqtt.ask import AskRequest
from edge_agent.mqtt.discovery import config_payload, config_topic, could_have_announced
from edge_agent.questions import KINDS, Component, Constraint, QuestionKind, build_prompt, parse_answer, state_string
from edge_agent.service import ad_hoc_question, engine_prompt, entity_spec
from tests.test_config import error_of, question, with_changes

TOPICS = AgentTopics("edge-agent", "kitchen")


def _percent(raw: str, options: tuple[str, ...]) -> int | None:
    found = re.search(r"\b([0-9]{1,3}) ?%", raw)
    return int(found.group(1)) if found else None


PERCENT = QuestionKind(
    name="percent",
    instruction="Answer with a percentage.",
    parse=_percent,
    state=lambda value: f"{value}",
    constraint=Constraint(digits=True),
    component=Component("sensor", {"unit_of_measurement": "%", "state_class": "measurement"}),
)
"""A kind the agent does not have: a fill level in percent."""


@pytest.fixture
def percent_kind(monkeypatch):
    """The table with the `percent` row added, for one test."""
    monkeypatch.setitem(KINDS, "percent", PERCENT)


def test_a_new_question_kind_is_one_row_of_the_table(percent_kind):
    config = parse_config(with_changes(questions=[question(id="battery", question="How full?", type="percent")]))
    battery = config.questions[0]

    prompt = engine_prompt(battery, default_max_new_tokens=4)
    typed = parse_answer(battery, "About 40 %.")
    announced = json.loads(config_payload(entity_spec(battery), TOPICS, "tiny-llava"))
    topic = config_topic("homeassistant", "kitchen", entity_spec(battery))

    assert build_prompt(battery) == "How full?\nAnswer with a percentage."
    assert (prompt.options, prompt.digits) == ((), True)
    assert (typed.value, state_string(battery, typed)) == (40, "40")
    assert (announced["unit_of_measurement"], announced["state_class"]) == ("%", "measurement")
    assert topic == "homeassistant/sensor/kitchen_battery/config"
    assert ad_hoc_question(AskRequest(question="How full?", reply=None, type="percent")).type == "percent"


def test_an_unknown_type_names_every_kind_of_the_table(percent_kind):
    message = error_of(with_changes(questions=[question(type="multi")]))

    assert (
        message == "config.yaml: questions[0].type: must be one of yes_no, choice, number, text, percent, got 'multi'"
    )


def test_a_misspelt_type_gets_the_closest_kind_as_a_hint():
    message = error_of(with_changes(questions=[question(type="yes-no")]))

    assert message.endswith("got 'yes-no' (did you mean 'yes_no'?)")


def test_options_are_refused_on_a_kind_that_does_not_choose_among_them(percent_kind):
    message = error_of(with_changes(questions=[question(type="percent", options=["10", "90"])]))

    assert message == "config.yaml: questions[0].options: only allowed when type is choice (type is percent)"


@pytest.mark.parametrize("kind", KINDS.values(), ids=list(KINDS))
def test_every_kind_is_a_complete_row(kind):
    assert KINDS[kind.name] is kind
    assert kind.instruction.strip()
    assert callable(kind.parse) and callable(kind.state)
    assert isinstance(kind.constraint, Constraint)
    assert kind.component.name in ("binary_sensor", "sensor")
    assert could_have_announced("homeassistant", "kitchen", f"homeassistant/{kind.component.name}/kitchen_q/config")


@pytest.mark.parametrize("kind", KINDS.values(), ids=list(KINDS))
def test_an_empty_answer_is_unknown_for_every_kind(kind):
    assert kind.parse("", ("red", "blue")) is None
    assert kind.parse("  \n", ("red", "blue")) is None


@pytest.mark.parametrize(
    ("type_", "options", "engine_options", "digits"),
    [
        ("yes_no", (), ("Yes", "No"), False),
        ("choice", ("red", "blue"), ("red", "blue"), False),
        ("number", (), (), True),
        ("text", (), (), False),
    ],
)
def test_each_kind_tells_the_engine_what_to_do(type_, options, engine_options, digits):
    asked = parse_config(with_changes(questions=[question(type=type_, options=list(options))])).questions[0]

    prompt = engine_prompt(asked, default_max_new_tokens=8)

    assert (prompt.options, prompt.digits) == (engine_options, digits)
