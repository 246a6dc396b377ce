"""The agent against a real Home Assistant (tests/support/homeassistant.py): every question becomes an entity
with the state and answer the agent published and the device class it was given, on a device named after
the model, an unknown answer reads as unknown, Home Assistant logs nothing wrong with our configs, the last
will and a camera delivering nothing make the entities unavailable (the diagnostic entities say why), and
turning discovery off removes them.

Each test uses its own agent id: the broker and Home Assistant live for the whole session.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from edge_agent.engine.model_dir import ModelDir
from edge_agent.mqtt import EntitySpec
from tests.support.agent import QUESTIONS, RunningAgent, agent_config, answered_since, write_config
from tests.support.broker import answer, wait_until
from tests.support.homeassistant import VERSION, poll

pytestmark = pytest.mark.timeout(600)

ASKED = [question for question in QUESTIONS if question["type"] in ("yes_no", "number", "choice")]
COMPONENTS = {"yes_no": "binary_sensor", "number": "sensor", "choice": "sensor"}
HOME_ASSISTANT_STATES = {"ON": "on", "OFF": "off"}
"""A binary sensor's state in Home Assistant for the agent's plain state; other states read the same."""
ANSWER_TIMEOUT_S = 120.0
DIAGNOSTICS = ["camera_connected", "answer_latency"]
DOOR = EntitySpec("door_open", "Is the door open?", "yes_no", "door")
SHORT_ENTITY_IDS_SINCE = (2025, 10)
"""The first Home Assistant release that takes `default_entity_id` (older ones derive the id from the name)."""


def config_for(agent_id, model, broker, video) -> dict:
    return agent_config(model, broker, video, agent_id=agent_id, questions=ASKED)


def unique_id(agent_id: str, question_id: str) -> str:
    return f"edge_agent_{agent_id}_{question_id}"


def agent_topic(agent_id: str, kind: str, question_id: str) -> str:
    return f"edge-agent/{agent_id}/{kind}/{question_id}"


def entities_of(home_assistant, agent_id: str, question_ids: list[str]) -> dict[str, str]:
    """question id -> entity id of every question of the agent, once Home Assistant registered them all."""
    registered = home_assistant.wait_for_entities(
        [unique_id(agent_id, q) for q in question_ids], timeout=ANSWER_TIMEOUT_S
    )
    return {question_id: registered[unique_id(agent_id, question_id)] for question_id in question_ids}


def test_every_question_is_an_entity_with_the_state_and_answer_the_agent_published(
    home_assistant, home_assistant_broker, subscriber, tiny_llava_int8, tiny_engine, static_video
):
    agent_id = "ha-states"
    question_ids = [question["id"] for question in ASKED]
    published = subscriber(
        home_assistant_broker,
        *(agent_topic(agent_id, kind, question_id) for kind in ("state", "answers") for question_id in question_ids),
    )
    log_start = len(home_assistant.log())

    with RunningAgent(config_for(agent_id, tiny_llava_int8, home_assistant_broker, static_video), engine=tiny_engine):
        wait_until(
            lambda: all(published.on(agent_topic(agent_id, "answers", q)) for q in question_ids),
            timeout=ANSWER_TIMEOUT_S,
            what="an answer to every question",
        )
        entities = entities_of(home_assistant, agent_id, question_ids)

        for question in ASKED:
            entity_id = entities[question["id"]]
            assert entity_id.startswith(COMPONENTS[question["type"]] + ".")

            def shows_the_latest_answer(state: dict, question_id=question["id"]) -> bool:
                latest_state = published.on(agent_topic(agent_id, "state", question_id))[-1].payload.decode()
                latest_answer = json.loads(published.on(agent_topic(agent_id, "answers", question_id))[-1].payload)
                return (
                    state["state"] == HOME_ASSISTANT_STATES.get(latest_state, latest_state)
                    and latest_answer.items() <= state["attributes"].items()
                )

            home_assistant.wait_for_state(entity_id, shows_the_latest_answer)

        model = home_assistant.device(f"edge_agent_{agent_id}")["model"]
        assert model == ModelDir.open(tiny_llava_int8).name != tiny_llava_int8.name

    assert home_assistant.problems(log_start) == []


KNOWN_THEN_UNKNOWN = [
    pytest.param(EntitySpec("door_open", "Door open", "yes_no", "door"), True, "ON", "on", id="yes_no"),
    pytest.param(EntitySpec("people", "People", "number", None), 2, "2", "2", id="number"),
    pytest.param(EntitySpec("cup", "Cup", "choice", None, options=("red", "blue")), "red", "red", "red", id="choice"),
    pytest.param(EntitySpec("scene", "Scene", "text", None), "a kitchen", "a kitchen", "a kitchen", id="text"),
]


@pytest.mark.parametrize("entity, value, state, shown", KNOWN_THEN_UNKNOWN)
def test_an_unknown_answer_after_a_known_one_is_unknown_in_home_assistant(
    home_assistant, home_assistant_broker, make_link, entity, value, state, shown
):
    agent_id = f"ha-unknown-{entity.type}"
    link = make_link(home_assistant_broker, agent_id=agent_id)
    link.set_entities([entity])
    link.publish_camera(True)
    entity_id = entities_of(home_assistant, agent_id, [entity.question_id])[entity.question_id]
    log_start = len(home_assistant.log())

    link.publish_answer(answer(entity.question_id, value=value, state=state, type=entity.type))
    home_assistant.wait_for_state(entity_id, lambda current: current["state"] == shown)
    link.publish_answer(answer(entity.question_id, value=None, state="unknown", type=entity.type))

    home_assistant.wait_for_state(entity_id, lambda current: current["state"] == "unknown", timeout=10)
    assert home_assistant.problems(log_start) == []


def test_the_last_will_of_a_killed_agent_makes_every_entity_unavailable(
    home_assistant, home_assistant_broker, tiny_llava_int8, static_video, tmp_path
):
    agent_id = "ha-killed"
    config = config_for(agent_id, tiny_llava_int8, home_assistant_broker, static_video)
    config_file = write_config(tmp_path, config)
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config_file)])
    try:
        entities = entities_of(home_assistant, agent_id, [question["id"] for question in ASKED])
        for entity_id in entities.values():
            home_assistant.wait_for_state(
                entity_id, lambda state: state["state"] != "unavailable", timeout=ANSWER_TIMEOUT_S
            )

        agent.send_signal(signal.SIGKILL)
        agent.wait()

        for entity_id in entities.values():
            home_assistant.wait_for_state(entity_id, lambda state: state["state"] == "unavailable")
    finally:
        agent.kill()
        agent.wait()


def test_a_device_class_home_assistant_knows_for_the_entity_shows_in_home_assistant(
    home_assistant, home_assistant_broker, make_link
):
    agent_id = "ha-classes"
    someone = EntitySpec("someone", "Anyone there?", "yes_no", "occupancy")
    air = EntitySpec("air", "Air quality index", "number", "aqi")
    log_start = len(home_assistant.log())
    link = make_link(home_assistant_broker, agent_id=agent_id)
    link.set_entities([someone, air])
    link.publish_camera(True)
    entities = entities_of(home_assistant, agent_id, ["someone", "air"])

    link.publish_answer(answer("someone", value=True, state="ON"))
    link.publish_answer(answer("air", value=3, state="3", type="number"))

    for entity, shown in ((someone, "on"), (air, "3")):
        state = home_assistant.wait_for_state(
            entities[entity.question_id], lambda state, shown=shown: state["state"] == shown
        )
        assert state["attributes"]["device_class"] == entity.device_class
    assert home_assistant.problems(log_start) == []


def announce_the_door(home_assistant, broker, make_link, agent_id: str):
    """A link of `agent_id` announcing the door question, and the entity id of each of its entities (the door's
    and the diagnostic ones) once Home Assistant registered them."""
    link = make_link(broker, agent_id=agent_id)
    link.set_entities([DOOR])
    return link, entities_of(home_assistant, agent_id, [DOOR.question_id, *DIAGNOSTICS])


def test_entity_ids_are_short_where_home_assistant_takes_default_entity_id_and_named_after_the_entity_before(
    home_assistant, home_assistant_broker, make_link
):
    log_start = len(home_assistant.log())

    _, entities = announce_the_door(home_assistant, home_assistant_broker, make_link, "ha-ids")

    if tuple(int(part) for part in VERSION.split(".")[:2]) >= SHORT_ENTITY_IDS_SINCE:
        prefix, door = "ha_ids", "door_open"
    else:  # the device's name and the entity's name; the unknown default_entity_id is dropped without a word
        prefix, door = "edge_agent_ha_ids", "is_the_door_open"
    assert list(entities.values()) == [
        f"binary_sensor.{prefix}_{door}",
        f"binary_sensor.{prefix}_camera_connected",
        f"sensor.{prefix}_answer_latency",
    ]
    assert home_assistant.problems(log_start) == []


def test_while_the_camera_delivers_nothing_answers_are_unavailable_and_the_diagnostics_say_so(
    home_assistant, home_assistant_broker, make_link
):
    log_start = len(home_assistant.log())
    link, entities = announce_the_door(home_assistant, home_assistant_broker, make_link, "ha-camera")
    door, camera, latency = entities.values()
    link.publish_camera(True)
    link.publish_answer(answer(value=True, state="ON", latency_ms=1234.4))
    home_assistant.wait_for_state(door, lambda state: state["state"] == "on")
    home_assistant.wait_for_state(camera, lambda state: state["state"] == "on")
    shown_latency = home_assistant.wait_for_state(latency, lambda state: state["state"] == "1234")
    assert shown_latency["attributes"]["unit_of_measurement"] == "ms"

    link.publish_camera(False)

    home_assistant.wait_for_state(door, lambda state: state["state"] == "unavailable")
    home_assistant.wait_for_state(camera, lambda state: state["state"] == "off")
    assert home_assistant.state(latency)["state"] == "1234"
    assert home_assistant.problems(log_start) == []


def test_turning_discovery_off_removes_the_agents_entities_from_home_assistant(
    home_assistant, home_assistant_broker, make_link
):
    agent_id = "ha-discovery-off"
    log_start = len(home_assistant.log())
    first_run, entities = announce_the_door(home_assistant, home_assistant_broker, make_link, agent_id)
    first_run.stop()

    second_run = make_link(home_assistant_broker, agent_id=agent_id, discovery=False)
    second_run.set_entities([DOOR])

    announced = {unique_id(agent_id, object_id) for object_id in entities}
    poll(home_assistant.entity_ids, lambda registered: not registered.keys() & announced, 30, "removed entities")
    assert [home_assistant.state(entity_id) for entity_id in entities.values()] == [None] * len(entities)
    assert home_assistant.problems(log_start) == []


def test_home_assistants_switch_disables_a_question_and_its_button_answers_at_once(
    home_assistant, home_assistant_broker, subscriber, tiny_llava_int8, tiny_engine, static_video, tmp_path
):
    agent_id = "ha-controls"
    questions = [{**question, "every": 3600} for question in ASKED if question["id"] in ("door_open", "people")]
    config = agent_config(
        tiny_llava_int8,
        home_assistant_broker,
        static_video,
        agent_id=agent_id,
        questions=questions,
        state_dir=str(tmp_path),
    )
    published = subscriber(
        home_assistant_broker,
        *(agent_topic(agent_id, kind, q["id"]) for kind in ("answers", "enabled") for q in questions),
    )
    controls = {"switch": "door_open.enabled", "door_button": "door_open.check", "all_button": "check.all"}
    log_start = len(home_assistant.log())

    with RunningAgent(config, engine=tiny_engine):
        registered = home_assistant.wait_for_entities(
            [unique_id(agent_id, object_id) for object_id in controls.values()], timeout=ANSWER_TIMEOUT_S
        )
        switch, door_button, all_button = (registered[unique_id(agent_id, o)] for o in controls.values())
        assert switch.startswith("switch.") and door_button.startswith("button.") and all_button.startswith("button.")
        home_assistant.wait_for_state(switch, lambda state: state["state"] == "on", timeout=ANSWER_TIMEOUT_S)
        wait_until(lambda: published.on(agent_topic(agent_id, "answers", "people")), timeout=ANSWER_TIMEOUT_S)

        pressed = time.time()
        home_assistant.call_service("button", "press", {"entity_id": door_button})
        wait_until(
            lambda: answered_since(published, agent_topic(agent_id, "answers", "door_open"), pressed),
            timeout=ANSWER_TIMEOUT_S,
        )

        home_assistant.call_service("switch", "turn_off", {"entity_id": switch})
        wait_until(lambda: published.on(agent_topic(agent_id, "enabled", "door_open"))[-1].payload == b"OFF")
        home_assistant.wait_for_state(switch, lambda state: state["state"] == "off")

        pressed_all = time.time()
        home_assistant.call_service("button", "press", {"entity_id": all_button})
        wait_until(
            lambda: answered_since(published, agent_topic(agent_id, "answers", "people"), pressed_all),
            timeout=ANSWER_TIMEOUT_S,
        )
        assert not answered_since(published, agent_topic(agent_id, "answers", "door_open"), pressed_all)

    assert home_assistant.problems(log_start) == []
