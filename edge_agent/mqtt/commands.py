"""Controls over MQTT: the command topics, their parsing, and their Home Assistant switch and buttons.

| topic | retained | payload |
| --- | --- | --- |
| `<base>/<agent>/enabled/<question_id>` | yes, by the agent | `ON` / `OFF`: whether the question is asked |
| `<base>/<agent>/enabled/<question_id>/set` | no (retained: ignored) | `ON` / `OFF`: enable or disable it |
| `<base>/<agent>/check/<question_id>` | no (retained: ignored) | `PRESS`: answer it now on a newly encoded frame |
| `<base>/<agent>/check` | no (retained: ignored) | `PRESS`: answer every enabled question now |

Presses and switch flips are rate-limited on the MQTT thread like asks (`mqtt.ask_burst` at once,
`mqtt.ask_per_minute` on average; presses and flips each have one allowance), then only queued: the
inference thread applies them at the start of its next turn.

A command is client input: the topic must name a configured question and the payload must be exactly one
of those above, else the message is ignored with one debug line. A retained command is ignored too: the
broker would deliver it again on every reconnect (as a retained ask). Home Assistant gets a `switch` per
question (its `entity_category` is `config`), a `button` per question and one for all.
"""

from __future__ import annotations

import dataclasses
import json

from edge_agent.mqtt.discovery import EntitySpec, check_all_config_topic, control_config_topic, entity_fields
from edge_agent.mqtt.topics import AgentTopics
from edge_agent.questions import OFF, ON

PRESS = "PRESS"
"""The payload of a button press (Home Assistant's MQTT button sends it by default)."""
ENABLED, CHECK = "enabled", "check"
"""The topic levels (under the agent's root) of the switches and of the buttons."""
SET = "set"
"""The last level of a switch's command topic."""
CHECK_ALL_OBJECT_ID = "check.all"
"""The check-all button's object id in its unique id: no question id has a '.', so no entity shares it."""


@dataclasses.dataclass(frozen=True)
class Command:
    """One valid command: enable or disable a question, or answer one (or every enabled one) now."""

    kind: str
    """`ENABLED` (the switch) or `CHECK` (a button)."""
    question_id: str | None
    """The question; None for the check-all button."""
    enabled: bool | None = None
    """For `ENABLED`: the new state."""


class BadCommand(Exception):
    """A message on a command topic that is no command; `reason` says why (for one debug line)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def command_subscriptions(topics: AgentTopics) -> list[str]:
    """What the agent subscribes to for commands: only under its own root, one wildcard level at most."""
    return [f"{topics.root}/{ENABLED}/+/{SET}", f"{topics.root}/{CHECK}", f"{topics.root}/{CHECK}/+"]


def enabled_topic(topics: AgentTopics, question_id: str) -> str:
    """Where the agent publishes (retained) whether a question is enabled."""
    return f"{topics.root}/{ENABLED}/{question_id}"


def switch_topic(topics: AgentTopics, question_id: str) -> str:
    return f"{enabled_topic(topics, question_id)}/{SET}"


def check_topic(topics: AgentTopics, question_id: str | None = None) -> str:
    """A question's button topic, or the check-all one for None."""
    return f"{topics.root}/{CHECK}" if question_id is None else f"{topics.root}/{CHECK}/{question_id}"


def parse_command(topics: AgentTopics, topic: str, payload: bytes, question_ids: frozenset[str]) -> Command:
    """The command a (non-retained) message on a command topic gives; `BadCommand` for anything else."""
    levels = topic[len(topics.root) + 1 :].split("/") if topic.startswith(topics.root + "/") else []
    if levels == [CHECK]:
        _expect(payload, PRESS)
        return Command(CHECK, None)
    if len(levels) == 2 and levels[0] == CHECK:
        _expect(payload, PRESS)
        return Command(CHECK, _configured(levels[1], question_ids))
    if len(levels) == 3 and levels[0] == ENABLED and levels[2] == SET:
        question_id = _configured(levels[1], question_ids)
        return Command(ENABLED, question_id, _expect(payload, ON, OFF) == ON)
    raise BadCommand("not a command topic")


def _expect(payload: bytes, *allowed: str) -> str:
    for word in allowed:
        if payload == word.encode():
            return word
    raise BadCommand(f"payload {payload[:20]!r} is not {' or '.join(allowed)}")


def _configured(question_id: str, question_ids: frozenset[str]) -> str:
    if question_id not in question_ids:
        raise BadCommand(f"no question {question_id[:40]!r}")
    return question_id


def control_configs(entity: EntitySpec, topics: AgentTopics, prefix: str, model_name: str) -> dict[str, bytes]:
    """Config topic -> retained discovery config of a question's switch and button."""
    question_id = entity.question_id
    switch = entity_fields(topics, model_name, f"{question_id}.{ENABLED}", f"Ask: {entity.name}", entity.camera)
    switch.update(
        command_topic=switch_topic(topics, question_id),
        state_topic=enabled_topic(topics, question_id),
        payload_on=ON,
        payload_off=OFF,
        entity_category="config",
    )
    button = entity_fields(topics, model_name, f"{question_id}.{CHECK}", f"Check now: {entity.name}", entity.camera)
    button.update(command_topic=check_topic(topics, question_id), payload_press=PRESS)
    return {
        control_config_topic(prefix, "switch", topics.agent_id, question_id): _json(switch),
        control_config_topic(prefix, "button", topics.agent_id, question_id): _json(button),
    }


def check_all_config(topics: AgentTopics, prefix: str, model_name: str) -> dict[str, bytes]:
    """Config topic -> retained discovery config of the button that answers every enabled question now."""
    button = entity_fields(topics, model_name, CHECK_ALL_OBJECT_ID, "Check all questions now")
    button.update(command_topic=check_topic(topics), payload_press=PRESS)
    return {check_all_config_topic(prefix, topics.agent_id): _json(button)}


def _json(config: dict[str, object]) -> bytes:
    return json.dumps(config).encode()
