"""`/mcp` on the HTTP API: streamable HTTP (stateless), built on its first request.

It sits behind the same guards as every route (bearer key, Host and Origin checks, body
limit; http/guards.py). Building the MCP server imports the SDK (about a second): a daemon
that never serves /mcp never pays for it.
"""

from __future__ import annotations

from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

Scope = dict[str, Any]


class LazyMCP:
    """An ASGI app for /mcp whose MCP server and session manager start on first use, in
    `task_group` (the HTTP app's lifespan owns it, so they stop with the server)."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.task_group: TaskGroup | None = None
        self._manager: Any = None
        self._lock = anyio.Lock()

    async def _start(self) -> Any:
        async with self._lock:
            if self._manager is None:
                if self.task_group is None:
                    raise RuntimeError("/mcp is served only inside the HTTP app's lifespan")
                self._manager = await self.task_group.start(self._serve)
        return self._manager

    async def _serve(self, *, task_status: TaskStatus[Any]) -> None:
        from mcp.server.transport_security import TransportSecuritySettings

        from .ops import ServiceOps
        from .tools import build_server

        server = build_server(lambda: ServiceOps(self.service), None)
        # The HTTP app's own guards check Host and Origin for every route, /mcp included.
        server.streamable_http_app(stateless_http=True, transport_security=(
            TransportSecuritySettings(enable_dns_rebinding_protection=False)))
        manager = server.session_manager
        async with manager.run():
            task_status.started(manager)
            await anyio.sleep_forever()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        manager = await self._start()
        await manager.handle_request(scope, receive, send)
