"""Parse and normalise image references (``python:3.12`` → ``docker.io/library/python:3.12``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..detect import validate_image_ref

DOCKER_HUB = "docker.io"
# What Docker Hub's registry API is actually served from.
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True)
class Reference:
    """A normalised reference: registry host[:port], repository path, tag and/or digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What to ask the manifests endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def api_host(self) -> str:
        """The host[:port] that serves the distribution API for this registry."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def _looks_like_host(part: str) -> bool:
    # Docker's rule: only a first component with '.', ':' or "localhost" names a registry.
    return "." in part or ":" in part or part == "localhost" or part.lower() != part


def parse_reference(ref: str, default_registry: str = DOCKER_HUB) -> Reference:
    """Validate ``ref`` (UsageError if malformed) and return its normalised form.

    ``default_registry`` is where names without a host go (``[images] registry``).
    Only Docker Hub puts single-component names under ``library/``.
    """
    validate_image_ref(ref)
    rest, digest, tag = ref, None, None
    if "@" in ref:
        rest, digest = ref.split("@", 1)
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
    parts = rest.split("/")
    if len(parts) > 1 and _looks_like_host(parts[0]):
        registry, path = parts[0], "/".join(parts[1:])
    else:
        registry, path = default_registry, rest
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)


def normalize(ref: str, default_registry: str = DOCKER_HUB) -> str:
    """The canonical string form of ``ref``."""
    return str(parse_reference(ref, default_registry))
