"""Pick a container image for a command or project directory, and validate image references."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from .errors import UsageError

DEFAULT_IMAGE = "alpine:3.20"


class Runtime(NamedTuple):
    """One row of the detection table."""

    label: str
    image: str
    project_files: tuple[str, ...]  # "*suffix" means any directory entry ending in suffix
    commands: tuple[str, ...]


# Upstream §5.1, verbatim. The first matching row wins, so the order is part of the interface.
RUNTIMES: tuple[Runtime, ...] = (
    Runtime(
        "node",
        "node:22-alpine",
        ("package.json", "package-lock.json", "yarn.lock", "pnpm-lock.yaml", "bun.lockb"),
        ("node", "npm", "npx", "yarn", "pnpm", "bun", "tsx", "ts-node"),
    ),
    Runtime(
        "rust",
        "rust:1.85-alpine",
        ("Cargo.toml", "Cargo.lock"),
        ("cargo", "rustc", "rustup", "rustfmt", "clippy"),
    ),
    Runtime("go", "golang:1.23-alpine", ("go.mod", "go.sum"), ("go", "gofmt")),
    Runtime(
        "python",
        "python:3.12-alpine",
        (
            "pyproject.toml",
            "requirements.txt",
            "setup.py",
            "setup.cfg",
            "Pipfile",
            "poetry.lock",
            "uv.lock",
        ),
        ("python", "python3", "pip", "pip3", "poetry", "uv", "pytest", "ruff"),
    ),
    Runtime(
        "ruby",
        "ruby:3.3-alpine",
        ("Gemfile", "Gemfile.lock", "*.gemspec"),
        ("ruby", "gem", "bundle", "bundler", "rake", "rails"),
    ),
    Runtime(
        "java",
        "eclipse-temurin:21-alpine",
        ("pom.xml", "build.gradle", "build.gradle.kts", "settings.gradle"),
        ("java", "javac", "mvn", "gradle", "gradlew"),
    ),
    Runtime("kotlin", "eclipse-temurin:21-alpine", ("*.kt",), ()),
    Runtime(
        "dotnet",
        "mcr.microsoft.com/dotnet/sdk:8.0",
        ("*.csproj", "*.fsproj", "*.sln", "global.json"),
        ("dotnet", "csc", "fsc"),
    ),
    Runtime(
        "c",
        "gcc:14-bookworm",
        ("Makefile", "CMakeLists.txt", "configure", "*.c", "*.cpp", "*.h"),
        ("gcc", "g++", "clang", "clang++", "make", "cmake", "cc"),
    ),
    Runtime(
        "php", "php:8.3-alpine", ("composer.json", "composer.lock", "*.php"), ("php", "composer")
    ),
    Runtime("elixir", "elixir:1.16-alpine", ("mix.exs", "mix.lock"), ("elixir", "mix", "iex")),
    Runtime("shell", "alpine:3.20", ("*.sh",), ("sh", "bash", "zsh", "ash")),
    Runtime(
        "lua",
        "nickblah/lua:5.4-alpine",
        ("*.lua", ".luacheckrc"),
        ("lua", "luajit", "luarocks"),
    ),
    Runtime(
        "terraform",
        "hashicorp/terraform:1.10",
        ("*.tf", "*.tfvars", "terraform.tfstate"),
        ("terraform",),
    ),
)

DOCKERFILE_NAMES = (
    "Dockerfile",
    "dockerfile",
    "Dockerfile.dev",
    "Dockerfile.development",
    "Dockerfile.prod",
    "Dockerfile.production",
)

_PROCFILE_MAX_BYTES = 64 * 1024  # a Procfile is a few lines; don't slurp a hostile huge file


def _command_image(name: str) -> str | None:
    for runtime in RUNTIMES:
        if name in runtime.commands:
            return runtime.image
    return None


def detect_from_command(argv: Sequence[str]) -> str | None:
    """Image for the basename of argv[0] (``/usr/bin/python3`` → python), or None."""
    if not argv or not argv[0]:
        return None
    return _command_image(os.path.basename(argv[0].rstrip("/")))


def _project_match(directory: Path) -> tuple[str, str] | None:
    """(image, matching file name) for the first table row whose project file exists."""
    # One listing instead of a stat per name (~45: half of a plan's file-system calls);
    # a listed name still must exist as os.path.exists says (a dangling link does not).
    # A dir we may search but not list falls back to the stats.
    try:
        entries: list[str] | None = sorted(os.listdir(directory))
    except OSError:
        entries = None
    present = frozenset(entries or ())
    for runtime in RUNTIMES:
        for pattern in runtime.project_files:
            if pattern.startswith("*"):
                suffix = pattern[1:]
                for entry in entries or ():
                    if entry.endswith(suffix):
                        return runtime.image, entry
            elif (pattern in present or entries is None) and \
                    os.path.exists(os.path.join(directory, pattern)):
                return runtime.image, pattern
    return None


def detect_from_project(directory: Path) -> str | None:
    """Image implied by the project files directly in ``directory`` (not recursive), or None."""
    match = _project_match(Path(directory))
    return match[0] if match else None


def _read_regular(path: Path, limit: int) -> bytes | None:
    """Up to `limit` bytes of `path` if it is a regular file, else None. The project is
    anyone's (a cloned repository): a FIFO, or a link to one or to a device (/proc/kmsg,
    /dev/watchdog), would hang the daemon's planning or act on opening, as the daemon's
    user. Checked before the open (a device is never opened) and on the descriptor."""
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def _procfile_match(directory: Path) -> tuple[str, str] | None:
    """(image, command) for the first Procfile process whose command is in the table."""
    raw = _read_regular(Path(directory) / "Procfile", _PROCFILE_MAX_BYTES)
    if raw is None:
        return None
    text = raw.decode("utf-8", errors="replace")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        tokens = line.split(":", 1)[1].split()
        if not tokens:
            continue  # "web:" with no command: skip it rather than give up on the file
        image = _command_image(tokens[0])  # exact match, as upstream: no basename here
        if image is not None:
            return image, tokens[0]
    return None


def detect_from_procfile(directory: Path) -> str | None:
    """Image for the first ``type: command`` line of ./Procfile whose command is known."""
    match = _procfile_match(Path(directory))
    return match[0] if match else None


# WebAssembly (issue 13): a module as the command picks the wasm backend; it needs no image.
WASM_SUFFIXES = (".wasm", ".wat")
WASM_BACKENDS = ("wasm", "hyperlight")
WASM_REASON = "none: a WebAssembly module needs no image"
WASM_ROOTFS = "none (WASI: the module sees only /workspace)"


def is_wasm_module(argv: Sequence[str]) -> bool:
    """True if the command is a WebAssembly module (`.wasm` binary or `.wat` text)."""
    return bool(argv) and argv[0].lower().endswith(WASM_SUFFIXES)


def _detect_with_reason(argv: Sequence[str], directory: Path) -> tuple[str, str]:
    project = _project_match(directory)
    if project:
        return project[0], f"detected from project file {project[1]}"
    procfile = _procfile_match(directory)
    if procfile:
        return procfile[0], f"detected from Procfile command '{procfile[1]}'"
    by_command = detect_from_command(argv)
    if by_command:
        return by_command, f"detected from command '{os.path.basename(argv[0].rstrip('/'))}'"
    return DEFAULT_IMAGE, "default image"


def detect_image(argv: Sequence[str], directory: Path) -> str:
    """Project files > Procfile > command > ``alpine:3.20`` (the non-``run`` order)."""
    return _detect_with_reason(argv, Path(directory))[0]


def resolve_run_image(
    argv: Sequence[str],
    cwd: Path,
    *,
    cli_image: str | None,
    config_image_from_flag: str | None,
    project_config_image: str | None,
) -> tuple[str, str]:
    """The CLI ``run`` order: --image > --config image > command > ./agentkernel.toml > detect.

    Returns (image, reason). Explicit images are validated; table images are valid already.
    """
    if cli_image:
        return validate_image_ref(cli_image), "--image"
    if config_image_from_flag:
        return validate_image_ref(config_image_from_flag), "--config image"
    by_command = detect_from_command(argv)
    if by_command:
        return by_command, f"detected from command '{os.path.basename(argv[0].rstrip('/'))}'"
    if project_config_image:
        return validate_image_ref(project_config_image), "./agentkernel.toml image"
    return _detect_with_reason(argv, Path(cwd))


def find_dockerfile(directory: Path) -> Path | None:
    """The first of the §5.4 Dockerfile names in ``directory`` that is a regular file."""
    for name in DOCKERFILE_NAMES:
        candidate = Path(directory) / name
        if candidate.is_file():
            return candidate
    return None


def dockerfile_hash(text: str) -> str:
    """12 hex digits of upstream's 64-bit ``h = h*31 + byte`` hash, so tags match upstream."""
    h = 0
    for byte in text.encode("utf-8"):
        h = (h * 31 + byte) & 0xFFFF_FFFF_FFFF_FFFF
    return f"{h:016x}"[:12]


def _fix_separators(match: re.Match[str]) -> str:
    run = match.group(0)
    # OCI allows ".", "_", "__" or any run of "-" between alphanumerics; fold other mixes to "-".
    return run if run in ("_", "__") or set(run) == {"-"} else "-"


def dockerfile_image_name(project_dir: Path, dockerfile_text: str) -> str:
    """``agentkernel-<project>:<hash12>``, with <project> made a valid OCI path component.

    Upstream keeps any Unicode alphanumeric and can emit names like ``agentkernel-x_`` that
    registries reject; here only ASCII survives and separator runs are normalised.
    """
    project = "".join(
        c if (c.isascii() and c.isalnum()) or c in "-_" else "-"
        for c in Path(project_dir).name.lower()
    )[:128]
    name = re.sub(r"[-_]+", _fix_separators, f"agentkernel-{project}").rstrip("-_")
    if name == "agentkernel":
        name = "agentkernel-project"
    return f"{name}:{dockerfile_hash(dockerfile_text)}"


# OCI / distribution reference grammar, ASCII only.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
# Plain strings, compiled on first use by re's own cache: most runs never parse a reference.
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]{{1,5}})?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"\w[\w.-]{0,127}"
_DIGEST = r"sha256:[0-9a-f]{64}"


def _full(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text, re.ASCII) is not None
_MAX_NAME_LEN = 255


def _quote(text: str) -> str:
    # Keep error messages on one line whatever the input holds.
    text = text[:300]
    return f"'{text}'" if text.isprintable() else repr(text)


def validate_image_ref(ref: str) -> str:
    """Return ``ref`` if it is a valid OCI image reference, else raise UsageError."""
    if not isinstance(ref, str) or not ref:
        raise UsageError("image reference must be a non-empty string")
    shown = _quote(ref)

    def bad(why: str) -> UsageError:
        return UsageError(f"invalid image reference {shown}: {why}")

    rest = ref
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _full(_DIGEST, digest):
            raise bad("digest must be sha256: followed by 64 lowercase hex digits")
    # A ':' after the last '/' starts the tag; one before it belongs to a registry port.
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _full(_TAG, tag):
            raise bad("tag must be 1-128 of [A-Za-z0-9_.-] and not start with '.' or '-'")
    if not rest:
        raise bad("missing repository name")
    if len(rest) > _MAX_NAME_LEN:
        raise bad(f"name longer than {_MAX_NAME_LEN} characters")
    parts = rest.split("/")
    first = parts[0]
    # Docker's rule: the first part is a registry host only if it looks like one.
    if len(parts) > 1 and (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    ):
        if not _full(_DOMAIN, first):
            raise bad(f"invalid registry host {_quote(first)}")
        parts = parts[1:]
    for part in parts:
        if not _full(_PATH_COMPONENT, part):
            if part.lower() != part and _full(_PATH_COMPONENT, part.lower()):
                raise bad("repository names must be lowercase")
            raise bad(
                f"invalid path component {_quote(part)} "
                "(lowercase letters and digits, separated by '.', '_', '__' or '-')"
            )
    return ref
