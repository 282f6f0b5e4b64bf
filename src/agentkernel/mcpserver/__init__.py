"""agentkernel's MCP server: the tools (official MCP SDK), over stdio or at /mcp on `serve`."""
