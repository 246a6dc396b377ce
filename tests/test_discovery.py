"""Home Assistant discovery: one entity per question, re-sent when HA restarts, removed when gone."""

import json

from edge_agent import __version__
from edge_agent.mqtt import AgentTopics, EntitySpec
from edge_agent.mqtt.discovery import config_payload
from tests.support.broker import answer

TOPICS = AgentTopics("edge-agent", "kitchen")
DOOR = EntitySpec("door_open", "Door open", "yes_no", "door")
PEOPLE = EntitySpec("people", "People in the room", "number", None)
DOOR_CONFIG = "homeassistant/binary_sensor/kitchen_door_open/config"
PEOPLE_CONFIG = "homeassistant/sensor/kitchen_people/config"


def test_a_yes_no_question_is_announced_as_a_retained_binary_sensor(broker, make_link, subscriber):
    watcher = subscriber(broker, "homeassistant/#")
    link = make_link(broker)

    link.set_entities([DOOR, PEOPLE])

    published = watcher.next(DOOR_CONFIG)
    assert published.retain
    assert json.loads(published.payload) == {
        "name": "Door open",
        "unique_id": "edge_agent_kitchen_door_open",
        "state_topic": "edge-agent/kitchen/state/door_open",
        "value_template": "{{ 'None' if value == 'unknown' else value }}",
        "json_attributes_topic": "edge-agent/kitchen/answers/door_open",
        "availability_topic": "edge-agent/kitchen/availability",
        "payload_available": "online",
        "payload_not_available": "offline",
        "payload_on": "ON",
        "payload_off": "OFF",
        "device_class": "door",
        "device": {
            "identifiers": ["edge_agent_kitchen"],
            "name": "edge-agent kitchen",
            "model": "tiny-llava",
            "manufacturer": "edge-agent",
            "sw_version": __version__,
        },
        "origin": {"name": "edge-agent", "sw": __version__},
    }


def test_a_number_question_is_announced_as_a_measurement_sensor(broker, make_link, subscriber):
    watcher = subscriber(broker, "homeassistant/#")
    link = make_link(broker)

    link.set_entities([DOOR, PEOPLE])

    config = json.loads(watcher.next(PEOPLE_CONFIG).payload)
    assert config["unique_id"] == "edge_agent_kitchen_people"
    assert config["state_topic"] == "edge-agent/kitchen/state/people"
    assert config["state_class"] == "measurement"
    assert "payload_on" not in config and "device_class" not in config


def test_a_question_with_options_is_an_enum_sensor():
    weather = EntitySpec("weather", "Weather", "choice", None, options=("sunny", "rainy"))

    config = json.loads(config_payload(weather, TOPICS, "tiny-llava"))

    assert (config["device_class"], config["options"]) == ("enum", ["sunny", "rainy"])


def test_home_assistant_coming_online_gets_every_config_and_state_again(broker, make_link, subscriber):
    watcher = subscriber(broker, "homeassistant/#", TOPICS.state("door_open"))
    link = make_link(broker)
    link.set_entities([DOOR])
    link.publish_answer(answer(value=True, state="ON"))
    first_config = watcher.next(DOOR_CONFIG).payload
    watcher.next(TOPICS.state("door_open"))

    watcher.publish("homeassistant/status", "online")

    assert watcher.next(DOOR_CONFIG).payload == first_config
    assert watcher.next(TOPICS.state("door_open")).payload == b"ON"


def test_a_removed_question_gets_an_empty_retained_config(broker, make_link, subscriber):
    watcher = subscriber(broker, "homeassistant/#")
    link = make_link(broker)
    link.set_entities([DOOR, PEOPLE])
    watcher.next(PEOPLE_CONFIG)

    link.set_entities([DOOR])

    removal = watcher.next(PEOPLE_CONFIG)
    assert (removal.payload, removal.retain) == (b"", True)


def test_a_question_removed_while_the_agent_was_stopped_is_removed_at_the_next_start(broker, make_link, subscriber):
    first_run = make_link(broker)
    first_run.set_entities([DOOR, PEOPLE])
    first_run.stop()
    watcher = subscriber(broker, PEOPLE_CONFIG)
    assert watcher.next(PEOPLE_CONFIG).payload, "announced by the first run"

    second_run = make_link(broker, connected=False)
    second_run.set_entities([DOOR])

    removal = watcher.next(PEOPLE_CONFIG)
    assert (removal.payload, removal.retain) == (b"", True)


def test_no_entities_are_announced_when_discovery_is_off(broker, make_link, subscriber):
    watcher = subscriber(broker, "homeassistant/#", TOPICS.state("door_open"))
    link = make_link(broker, discovery=False)

    link.set_entities([DOOR])
    link.publish_answer(answer(value=True, state="ON"))

    watcher.next(TOPICS.state("door_open"))
    assert watcher.on(DOOR_CONFIG) == []
