"""agentkernel: run AI coding agents and untrusted code in isolated sandboxes.

The client API of the official SDK (`AgentKernel`, `AsyncAgentKernel`, sessions, errors,
models) is importable from here; each name loads on first use, so `import agentkernel`
stays as cheap as the CLI needs.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Not `from typing import TYPE_CHECKING`: importing typing costs the CLI ~5 ms per call.
TYPE_CHECKING = False
if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ loads these on use
    from typing import Any

    from .client.aio import AsyncAgentKernel, AsyncSandboxSession
    from .client.errors import (
        AgentKernelError,
        AuthError,
        NetworkError,
        NotFoundError,
        ServerError,
        StreamError,
        ValidationError,
    )
    from .client.models import (
        FileReadResponse,
        RunOutput,
        SandboxInfo,
        SnapshotMeta,
        StreamEvent,
    )
    from .client.sync import AgentKernel, SandboxSession

    __all__ = [
        "AgentKernel", "AgentKernelError", "AsyncAgentKernel", "AsyncSandboxSession", "AuthError",
        "FileReadResponse", "NetworkError", "NotFoundError", "RunOutput", "SandboxInfo",
        "SandboxSession", "ServerError", "SnapshotMeta", "StreamError", "StreamEvent",
        "ValidationError",
    ]


def __getattr__(name: str) -> Any:
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)
    client = importlib.import_module(f"{__name__}.client")
    if name not in client.EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(client, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    import importlib

    client = importlib.import_module(f"{__name__}.client")
    return sorted([*globals(), *client.EXPORTS])
