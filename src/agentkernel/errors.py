"""The one error hierarchy of agentkernel, mapped once to CLI exit codes and HTTP statuses."""

from __future__ import annotations


class AgentKernelError(Exception):
    """Base of every error agentkernel raises on purpose.

    ``exit_code`` is what the CLI exits with; ``http_status`` what the API answers.
    """

    exit_code = 125
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(AgentKernelError):
    """The user asked for something malformed (bad flag value, bad name, bad path)."""

    exit_code = 2
    http_status = 400


class ConfigError(AgentKernelError):
    """agentkernel.toml or a config value is invalid."""

    exit_code = 125
    http_status = 400


class NotFound(AgentKernelError):
    """A named sandbox, image or file does not exist."""

    exit_code = 125
    http_status = 404


class Conflict(AgentKernelError):
    """The object exists already or is in the wrong state."""

    exit_code = 125
    http_status = 409


class BackendUnavailable(AgentKernelError):
    """The requested isolation backend cannot run on this host."""

    exit_code = 125
    http_status = 503


class SandboxError(AgentKernelError):
    """The sandbox could not be started or died unexpectedly."""

    exit_code = 125
    http_status = 500


class ProtocolError(SandboxError):
    """The in-sandbox agent sent something that breaks the protocol, or went away."""


class AgentRequestError(AgentKernelError):
    """The agent refused or failed one request (errno-style); the sandbox itself is fine."""

    exit_code = 125
    http_status = 400

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class PathNotFound(AgentRequestError):
    """A file or directory a request names does not exist inside the sandbox."""

    http_status = 404


class CommandNotFound(AgentRequestError):
    """The command to run does not exist inside the sandbox."""

    exit_code = 127


class CommandNotExecutable(AgentRequestError):
    """The command exists inside the sandbox but cannot be executed."""

    exit_code = 126


class CompileBoundExceeded(CommandNotExecutable):
    """A WebAssembly module needed more memory or time to compile than its bound allows."""

    def __init__(self, message: str, why: str, errno: int = 0) -> None:
        super().__init__(message, errno)
        self.why = why


class TooLarge(AgentKernelError):
    """What was asked for exceeds a configured size limit (a file to read, a request)."""

    exit_code = 125
    http_status = 413


class Busy(AgentKernelError):
    """Too many requests at once: refused now rather than queued without bound."""

    exit_code = 125
    http_status = 503


class Cancelled(AgentKernelError):
    """The request was given up (its client went away, or the host cancelled it)."""

    exit_code = 130
    http_status = 499


class HostError(AgentKernelError):
    """The host failed an operation (disk full, an unreadable or special file, I/O error)."""

    exit_code = 125
    http_status = 500


def as_agentkernel_error(exc: BaseException) -> AgentKernelError:
    """Any exception as one of ours, with a message a user can act on.

    OSErrors (ENOSPC, a FIFO where a file was expected, EIO...) become HostError naming
    the errno and the file; anything else unexpected an internal error with its type.
    """
    if isinstance(exc, AgentKernelError):
        return exc
    if isinstance(exc, OSError):
        import errno as errno_mod

        name = errno_mod.errorcode.get(exc.errno or 0, "")
        where = f": {exc.filename}" if exc.filename else ""
        text = exc.strerror or str(exc) or type(exc).__name__
        if exc.errno is None and exc.args and isinstance(exc.args[0], list):
            # shutil.Error: [(src, dst, why), ...]; the whys say it
            text = "; ".join(str(e[-1]) for e in exc.args[0][:3] if isinstance(e, tuple))
        err = HostError(f"{text}{where}" + (f" ({name})" if name else ""))
        if exc.errno == errno_mod.ENOSPC:
            err.http_status = 507  # Insufficient Storage
        return err
    return AgentKernelError(f"internal error: {type(exc).__name__}: {exc}")
