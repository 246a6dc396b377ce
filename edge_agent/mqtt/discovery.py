"""Home Assistant MQTT discovery: one entity per standing question, and two diagnostic entities of the agent.

With `cameras:` each camera is a device of its own, linked to the agent's device with `via_device`: its
questions' entities (answer, image, switch, button) and its "camera connected" entity are on it, and a
question's answer entity is available while the agent is online and that camera delivers frames. The agent's
device keeps the answer latency and the check-all button.

Each question kind names its component and the fields it needs (`questions.KINDS`): a yes/no question
becomes a `binary_sensor`, every other kind a `sensor`. An answer entity is available while the agent is
online and the camera delivers frames; the diagnostic entities (camera connected, latency of the latest
answer) while the agent is online. Each config is published retained on
`<discovery_prefix>/<component>/<agent>_<object_id>/config`; an empty retained config removes the entity.
With `evidence.enabled`, each question also has an `image` entity (`evidence_configs`, Home Assistant 2023.7 or
later) showing the JPEG its state was answered on, available while the agent is online. Home Assistant publishes
`online` on `<discovery_prefix>/status` when it starts, and the agent then sends
every config again.

Fields a release of Home Assistant does not know it drops silently (2024.3 drops `default_entity_id`,
read from 2025.10, and an enum sensor's `options`, read from 2024.9); `object_id`, deprecated from
2025.10, is never sent.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from edge_agent import __version__
from edge_agent.config import DIAGNOSTIC_ENTITY_IDS, camera_connected_id
from edge_agent.errors import UserError
from edge_agent.mqtt.topics import OFFLINE, ONLINE, AgentTopics, check_id
from edge_agent.questions import KINDS, Component

_UNKNOWN_AS_NONE = "{{ 'None' if value == 'unknown' else value }}"
"""Binary and numeric entities read the payload `None` as "unknown"; our plain state says `unknown`."""


@dataclass(frozen=True)
class EntitySpec:
    """What Home Assistant needs to know about one question."""

    question_id: str
    """The configured question's id."""
    name: str
    """The entity's display name."""
    type: str
    """The question type (`yes_no`, `number`, ...): its row of `questions.KINDS` gives the component."""
    device_class: str | None
    """A Home Assistant device class (`occupancy`, `door`, ...), or None."""
    options: tuple[str, ...] = ()
    """For a question with fixed options: the possible states (an `enum` sensor)."""
    camera: str | None = None
    """The id of the camera (of `cameras:`) the question looks at: its entities are on that camera's device and
    available while that camera delivers frames; None for the single `camera:` form (the agent's device)."""


def component(entity: EntitySpec) -> Component:
    """The Home Assistant component of the entity, as its question kind says."""
    return KINDS[entity.type].component


CONTROL_COMPONENTS = ("switch", "button")
"""The components of a question's controls (`mqtt/commands.py`): its enable switch and check-now button."""


def components() -> list[str]:
    """The Home Assistant components an entity can be: those of the question kinds and of the controls."""
    return sorted({kind.component.name for kind in KINDS.values()} | set(CONTROL_COMPONENTS))


def status_topic(prefix: str) -> str:
    """Where Home Assistant announces that it (re)started."""
    return f"{prefix}/status"


def config_topic(prefix: str, agent_id: str, entity: EntitySpec) -> str:
    return _config_topic(prefix, component(entity).name, agent_id, entity.question_id)


def control_config_topic(prefix: str, component_name: str, agent_id: str, question_id: str) -> str:
    """The config topic of a question's control (one of `CONTROL_COMPONENTS`)."""
    return _config_topic(prefix, component_name, agent_id, question_id)


def check_all_config_topic(prefix: str, agent_id: str) -> str:
    """The config topic of the agent's check-all button: it has a level more than a question's, so no
    question's config topic (of this agent or another) is the same."""
    return f"{prefix}/button/{agent_id}/check_all/config"


def _config_topic(prefix: str, component_name: str, agent_id: str, question_id: str) -> str:
    return f"{prefix}/{component_name}/{agent_id}_{question_id}/config"


def could_have_announced(prefix: str, agent_id: str, topic: object) -> bool:
    """Whether `topic` is the config topic of some question of this agent, of its controls, or of its
    check-all button."""
    if not isinstance(topic, str):
        return False
    if topic == check_all_config_topic(prefix, agent_id):
        return True
    return any(_is_id(_object_id(prefix, name, agent_id, topic) or "") for name in [*components(), EVIDENCE_COMPONENT])


def _object_id(prefix: str, component_name: str, agent_id: str, config_topic: str) -> str | None:
    """What stands for the object id in `config_topic` if it has the shape of this agent's config topics of
    `component_name` (`_config_topic`), else None."""
    head, _, tail = _config_topic(prefix, component_name, agent_id, "\0").partition("\0")
    if config_topic.startswith(head) and config_topic.endswith(tail):
        return config_topic[len(head) : -len(tail)]
    return None


def _is_id(text: str) -> bool:
    try:
        check_id("question id", text)
    except UserError:
        return False
    return True


def read_announced(payload: bytes, prefix: str, agent_id: str, max_bytes: int) -> tuple[set[str], str | None]:
    """The config topics this agent could have announced in a retained list of announced topics, and what
    is wrong with the rest of it (None if nothing).

    The list is client input (any client allowed to publish on the agent's topics may write it), and the
    agent empties the retained config of every topic it keeps from it: so it keeps only its own config
    topics, never a wildcard, a non-string or another client's topic.
    """
    if len(payload) > max_bytes:
        return set(), f"{len(payload)} bytes, more than {max_bytes}"
    try:
        entries = json.loads(payload or b"[]")
    except (ValueError, RecursionError):
        return set(), "not JSON (or nested too deeply)"
    if not isinstance(entries, list):
        return set(), "not a JSON list"
    own: set[str] = set()
    strangers = []
    for entry in entries:
        if could_have_announced(prefix, agent_id, entry):
            own.add(entry)
        else:
            strangers.append(entry)
    if strangers:
        return own, f"{len(strangers)} entries this agent cannot have announced, such as {strangers[0]!r:.80}"
    return own, None


CAMERA_CONNECTED, ANSWER_LATENCY = DIAGNOSTIC_ENTITY_IDS
"""The object ids of the diagnostic entities (no question may take them: the config refuses them)."""


def config_payload(entity: EntitySpec, topics: AgentTopics, model_name: str) -> bytes:
    """The retained discovery config of one question's entity: available while the agent is online and the
    camera delivers frames (an answer about a camera that shows nothing would be stale)."""
    config = entity_fields(topics, model_name, entity.question_id, entity.name, entity.camera)
    config["availability"].append(_online(topics.camera_status(entity.camera)))
    config.update(
        availability_mode="all",
        default_entity_id=default_entity_id(component(entity).name, topics, entity.question_id),
        state_topic=topics.state(entity.question_id),
        json_attributes_topic=topics.answers(entity.question_id),
    )
    config.update(_component_fields(entity))
    return json.dumps(config).encode()


def diagnostic_configs(
    prefix: str, topics: AgentTopics, model_name: str, cameras: tuple[str | None, ...] = (None,)
) -> dict[str, bytes]:
    """Config topic -> retained config of each diagnostic entity: whether each camera delivers frames (the
    single form's camera for None, on the agent's device; a listed camera's on its own device), and the latency
    of the latest answer published (ms from the frame to the answer). All are available while the agent is
    online."""
    latency = {
        "state_topic": topics.latency,
        "unit_of_measurement": "ms",
        "device_class": "duration",
        "state_class": "measurement",
        "value_template": _UNKNOWN_AS_NONE,
    }
    entities = [("sensor", ANSWER_LATENCY, "Answer latency", None, latency)]  # on the agent's device: first
    entities += [
        ("binary_sensor", _camera_connected_id(camera), "Camera connected", camera, _connected(topics, camera))
        for camera in cameras
    ]
    return {
        _config_topic(prefix, component_name, topics.agent_id, object_id): json.dumps(
            {
                **entity_fields(topics, model_name, object_id, name, camera),
                "default_entity_id": default_entity_id(component_name, topics, object_id),
                "entity_category": "diagnostic",
                **fields,
            }
        ).encode()
        for component_name, object_id, name, camera, fields in entities
    }


def _camera_connected_id(camera_id: str | None) -> str:
    return CAMERA_CONNECTED if camera_id is None else camera_connected_id(camera_id)


def _connected(topics: AgentTopics, camera_id: str | None) -> dict[str, str]:
    """The fields of a camera's "camera connected" entity."""
    return {
        "state_topic": topics.camera_status(camera_id),
        "payload_on": ONLINE,
        "payload_off": OFFLINE,
        "device_class": "connectivity",
    }


EVIDENCE_COMPONENT = "image"
"""The Home Assistant component of a question's evidence image."""
EVIDENCE_SUFFIX = "_evidence"
"""Ends the object id of a question's image entity: `<question_id>_evidence`."""


def evidence_configs(prefix: str, topics: AgentTopics, model_name: str, entities: list[EntitySpec]) -> dict[str, bytes]:
    """Config topic -> retained config of each question's image entity: the JPEG on the question's evidence topic,
    available while the agent is online (the image of the last state stays meaningful when the camera is off)."""
    configs = {}
    for entity in entities:
        object_id = entity.question_id + EVIDENCE_SUFFIX
        config = {
            **entity_fields(topics, model_name, object_id, f"{entity.name} (image)", entity.camera),
            "default_entity_id": default_entity_id(EVIDENCE_COMPONENT, topics, object_id),
            "image_topic": topics.evidence(entity.question_id),
            "content_type": "image/jpeg",
        }
        configs[_config_topic(prefix, EVIDENCE_COMPONENT, topics.agent_id, object_id)] = json.dumps(config).encode()
    return configs


def evidence_question(prefix: str, agent_id: str, config_topic: str) -> str | None:
    """The question whose image entity `config_topic` announces (`evidence_configs`), or None for other topics."""
    object_id = _object_id(prefix, EVIDENCE_COMPONENT, agent_id, config_topic)
    if object_id is None or not object_id.endswith(EVIDENCE_SUFFIX):
        return None
    return object_id[: -len(EVIDENCE_SUFFIX)] or None


def default_entity_id(component_name: str, topics: AgentTopics, object_id: str) -> str:
    """The entity id Home Assistant (2025.10 and later) gives a new entity: short and stable
    (`binary_sensor.<agent>_<object_id>`), where older releases derive it from the entity's name. Written as
    Home Assistant requires: lower case, single `_` between words."""
    slug = re.sub(r"[^a-z0-9]+", "_", f"{topics.agent_id}_{object_id}".lower()).strip("_")
    return f"{component_name}.{slug or 'edge_agent'}"


def _online(topic: str) -> dict[str, str]:
    """An availability entry: `topic` says `online` or `offline`."""
    return {"topic": topic, "payload_available": ONLINE, "payload_not_available": OFFLINE}


def entity_fields(
    topics: AgentTopics, model_name: str, object_id: str, name: str, camera: str | None = None
) -> dict[str, object]:
    """What every entity of this agent carries: its name and unique id, availability (a list: the agent's own;
    an entity may add more with `availability_mode`), its device and the origin. `object_id` is unique among
    the agent's entities (a question id, or the name of a control or diagnostic entity); the caller adds
    `default_entity_id`, which needs the component. The device is the agent's, or for an entity of a camera of
    `cameras:` that camera's, linked to the agent's (`via_device`) so that Home Assistant groups the entities
    by camera under the agent."""
    agent_id = topics.agent_id
    return {
        "name": name,
        "unique_id": f"edge_agent_{agent_id}_{object_id}",
        "availability": [_online(topics.availability)],
        "device": device(topics, model_name) if camera is None else camera_device(topics, model_name, camera),
        "origin": {"name": "edge-agent", "sw": __version__},
    }


def device(topics: AgentTopics, model_name: str) -> dict[str, object]:
    """The agent's device in Home Assistant."""
    return {
        "identifiers": [f"edge_agent_{topics.agent_id}"],
        "name": f"edge-agent {topics.agent_id}",
        "model": model_name,
        "manufacturer": "edge-agent",
        "sw_version": __version__,
    }


def camera_device(topics: AgentTopics, model_name: str, camera_id: str) -> dict[str, object]:
    """The device of one camera of `cameras:`, reached through the agent's device."""
    agent = device(topics, model_name)
    return {
        **agent,
        "identifiers": [f"edge_agent_{topics.agent_id}_{camera_id}"],
        "name": f"edge-agent {topics.agent_id} {camera_id}",
        "via_device": agent["identifiers"][0],
    }


def _component_fields(entity: EntitySpec) -> dict[str, object]:
    """The fields the entity's component needs, and its configured device class (the config accepts only one
    the component knows and that fits: none for an enum sensor, which stays `enum` with its options)."""
    shown_as = component(entity)
    fields = dict(shown_as.fields)
    if shown_as.unknown_as_none:
        fields["value_template"] = _UNKNOWN_AS_NONE
    if entity.device_class:
        fields["device_class"] = entity.device_class
    if shown_as.enum:
        fields.update(device_class="enum", options=list(entity.options))
    return fields
