"""Home Assistant discovery: one entity per question and two diagnostic entities, re-sent when HA restarts,
removed when gone or when discovery is turned off."""

import json

from edge_agent import __version__
from edge_agent.mqtt import AgentTopics, EntitySpec
from edge_agent.mqtt.discovery import config_payload, diagnostic_configs
from tests.support.broker import answer

TOPICS = AgentTopics("edge-agent", "kitchen")
DOOR = EntitySpec("door_open", "Door open", "yes_no", "door")
PEOPLE = EntitySpec("people", "People in the room", "number", None)
DOOR_CONFIG = "homeassistant/binary_sensor/kitchen_door_open/config"
CAMERA_CONFIG = "homeassistant/binary_sensor/kitchen_camera_connected/config"
LATENCY_CONFIG = "homeassistant/sensor/kitchen_answer_latency/config"
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
        "availability": [
            {
                "topic": "edge-agent/kitchen/availability",
                "payload_available": "online",
                "payload_not_available": "offline",
            },
            {"topic": "edge-agent/kitchen/camera", "payload_available": "online", "payload_not_available": "offline"},
        ],
        "availability_mode": "all",
        "default_entity_id": "binary_sensor.kitchen_door_open",
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


def test_a_question_with_options_stays_an_enum_sensor_whatever_device_class_it_is_given():
    weather = EntitySpec("weather", "Weather", "choice", "temperature", options=("sunny", "rainy"))

    config = json.loads(config_payload(weather, TOPICS, "tiny-llava"))

    assert (config["device_class"], config["options"]) == ("enum", ["sunny", "rainy"])


def test_entity_ids_are_short_and_stable_and_never_set_by_the_deprecated_object_id():
    kitchen_two = AgentTopics("edge-agent", "Kitchen-2")
    configs = [
        json.loads(config_payload(EntitySpec("Door__open-", "Door open", "yes_no", None), kitchen_two, "m")),
        *(json.loads(config) for config in diagnostic_configs("homeassistant", kitchen_two, "m").values()),
    ]

    assert [config["default_entity_id"] for config in configs] == [
        "binary_sensor.kitchen_2_door_open",
        "sensor.kitchen_2_answer_latency",
        "binary_sensor.kitchen_2_camera_connected",
    ]
    assert not any("object_id" in config for config in configs)


def test_the_diagnostic_entities_show_the_camera_and_the_latency_while_the_agent_is_online():
    configs = {topic: json.loads(config) for topic, config in diagnostic_configs("homeassistant", TOPICS, "m").items()}

    camera, latency = configs[CAMERA_CONFIG], configs[LATENCY_CONFIG]
    assert (camera["state_topic"], camera["device_class"], camera["entity_category"]) == (
        TOPICS.camera,
        "connectivity",
        "diagnostic",
    )
    assert (camera["payload_on"], camera["payload_off"]) == ("online", "offline")
    assert (latency["state_topic"], latency["unit_of_measurement"], latency["entity_category"]) == (
        TOPICS.latency,
        "ms",
        "diagnostic",
    )
    for config in (camera, latency):
        assert [entry["topic"] for entry in config["availability"]] == [TOPICS.availability]
        assert config["device"]["identifiers"] == ["edge_agent_kitchen"]


def test_the_diagnostic_entities_are_announced_with_the_questions(broker, make_link, subscriber):
    watcher = subscriber(broker, "homeassistant/#", TOPICS.discovery)
    link = make_link(broker)

    link.set_entities([DOOR])

    assert json.loads(watcher.next(TOPICS.discovery).payload) == sorted([DOOR_CONFIG, CAMERA_CONFIG, LATENCY_CONFIG])
    assert watcher.next(CAMERA_CONFIG).retain and watcher.next(LATENCY_CONFIG).retain


def test_each_published_answer_retains_its_latency_in_whole_milliseconds(broker, make_link, subscriber):
    watcher = subscriber(broker, TOPICS.latency)
    link = make_link(broker)

    link.publish_answer(answer(latency_ms=1234.4))

    published = watcher.next(TOPICS.latency)
    assert (published.payload, published.retain) == (b"1234", True)


def test_turning_discovery_off_removes_every_entity_announced_before(broker, make_link, subscriber):
    first_run = make_link(broker)
    first_run.set_entities([DOOR, PEOPLE])
    first_run.stop()
    announced = [DOOR_CONFIG, PEOPLE_CONFIG, CAMERA_CONFIG, LATENCY_CONFIG]
    watcher = subscriber(broker, *announced, TOPICS.discovery)
    for topic in announced:
        assert watcher.next(topic).payload, "announced by the first run"
    watcher.next(TOPICS.discovery)

    second_run = make_link(broker, discovery=False)
    second_run.set_entities([DOOR, PEOPLE])

    for topic in announced:
        removal = watcher.next(topic)
        assert (removal.payload, removal.retain) == (b"", True), topic
    assert watcher.next(TOPICS.discovery).payload == b"", "the list of announced entities is cleared"
