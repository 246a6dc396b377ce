"""edge-agent: a camera agent that answers standing questions with LLaVA on OpenVINO and publishes over MQTT.

Data flows one way: capture (source -> scene gate) -> engine -> questions (typed answers) -> mqtt,
wired by `service`.
"""

__version__ = "0.1.0"
