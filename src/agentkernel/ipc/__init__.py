"""The socket protocol between a front door (CLI, MCP server) and the daemon: client, codec."""
