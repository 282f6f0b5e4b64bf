"""Host side of the in-sandbox agent (ak-agent): protocol codec and client."""

from __future__ import annotations

from .client import AgentClient, AgentInfo, DirEntry, Execution, ExitStatus, FileStat

__all__ = ["AgentClient", "AgentInfo", "DirEntry", "Execution", "ExitStatus", "FileStat"]
