"""Our client for the HTTP API, compatible with the official agentkernel Python SDK 0.21.0.

Names load on first use (module `__getattr__`): importing this package costs nothing, and
httpx is imported only with `AgentKernel` or `AsyncAgentKernel`.
"""

from __future__ import annotations

import importlib
from typing import Any

_ERRORS = ("AgentKernelError", "AuthError", "NetworkError", "NotFoundError", "ServerError",
           "StreamError", "ValidationError", "error_from_status")
_MODELS = (
    "AriaSnapshot", "BackendCapabilities", "BackendDescriptor", "BackendDiscovery",
    "BatchCommand", "BatchFileWriteResponse", "BatchResult", "BatchRunResponse", "BrowserEvent",
    "CreateSandboxOptions", "DetachedCommand", "DetachedLogsResponse", "DetachedStatus",
    "DurableObject", "DurableStore", "DurableStoreCommandResult", "DurableStoreExecuteResult",
    "DurableStoreQueryResult", "ExecOptions", "ExtendTtlResponse", "FileReadResponse",
    "Orchestration", "OrchestrationDefinition", "PageLink", "PageResult", "RunOptions",
    "RunOutput", "SandboxInfo", "SandboxStatus", "Schedule", "SecurityProfile", "SnapshotMeta",
    "StreamEvent", "StreamEventType",
)
EXPORTS: dict[str, str] = {
    "AgentKernel": "sync", "SandboxSession": "sync",
    "AsyncAgentKernel": "aio", "AsyncSandboxSession": "aio",
    **dict.fromkeys(_ERRORS, "errors"),
    **dict.fromkeys(_MODELS, "models"),
}
__all__ = sorted(EXPORTS)


def __getattr__(name: str) -> Any:
    module = EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *EXPORTS])
