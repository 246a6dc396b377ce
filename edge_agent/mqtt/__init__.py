"""MQTT: publish answers, availability and Home Assistant entities; take ad hoc questions.

`client` holds the connection (`AgentLink` for the service, `ask_remote` for `edge-agent ask`),
`topics` the topic names and payloads, `discovery` the Home Assistant configs, `ask` the ask protocol,
`commands` the control commands (a switch per question, check-now buttons) and their configs.
"""

from edge_agent.mqtt.ask import AskRequest, BadRequest, parse_ask
from edge_agent.mqtt.client import AgentLink, ask_remote
from edge_agent.mqtt.discovery import EntitySpec
from edge_agent.mqtt.topics import AgentTopics, AnswerMessage

__all__ = [
    "AgentLink",
    "AgentTopics",
    "AnswerMessage",
    "AskRequest",
    "BadRequest",
    "EntitySpec",
    "ask_remote",
    "parse_ask",
]
