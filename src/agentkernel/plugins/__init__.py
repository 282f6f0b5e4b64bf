"""Wiring agentkernel's MCP server into AI coding agents: each agent's own format and CLI."""
