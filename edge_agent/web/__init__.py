"""The status page the agent serves (issue 27): what it sees and answered, and asks, switches and regions."""

from edge_agent.web.actions import PageReply
from edge_agent.web.server import StatusServer

__all__ = ["PageReply", "StatusServer"]
