"""Secrets kept on the host (0600 in the data dir), handed only to a sandbox's egress gate."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .errors import NotFound, UsageError

if TYPE_CHECKING:
    from .egress_policy import Policy

MAX_VALUE = 64 * 1024
PLACEHOLDER_PREFIX = "ak-secret-"


class Secret(NamedTuple):
    name: str
    hosts: tuple[str, ...]  # exact names: the only hosts that ever see the value
    header: str  # lower case; "*" for any header
    env: str  # the variable the sandbox finds the placeholder in
    value: str


def _dir() -> Path:
    from .paths import data_dir

    path = data_dir() / "secrets"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _check_name(name: str) -> str:
    from .names import validate_sandbox_name

    validate_sandbox_name(name)  # the same rules: a file name, never a path
    return name


def _check_env(env: str) -> str:
    if not env or not (env[0].isalpha() or env[0] == "_") or \
            not all(c.isalnum() or c == "_" for c in env):
        raise UsageError(f"invalid environment variable name {env!r}")
    return env


def save(name: str, hosts: list[str], header: str, env: str, value: str) -> Secret:
    from .egress_policy import normalize_name

    if not hosts:
        raise UsageError("a secret needs at least one --host")
    if any(h.startswith("*") for h in hosts):
        raise UsageError("secret hosts are exact names (the gate presents a certificate "
                         "for each)")
    value = value.rstrip("\r\n")
    if not value or len(value) > MAX_VALUE or any(c in value for c in "\r\n\0"):
        raise UsageError("the secret's value must be one non-empty line (at most 64 KiB)")
    header = header.strip().lower()
    if header != "*" and (not header or not all(c.isalnum() or c in "-_" for c in header)):
        raise UsageError(f"invalid header name {header!r}")
    secret = Secret(_check_name(name), tuple(normalize_name(h) for h in hosts), header,
                    _check_env(env), value)
    path = _dir() / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(secret._asdict(), f)
    os.replace(tmp, path)
    return secret


# Secrets this process holds in memory only (`run --agent` with the key in the caller's
# environment): never written anywhere. Their names have a ':' that no stored name can
# have, so none shadows a stored one; only this process (its gate start) ever sees them.
_HELD: dict[str, Secret] = {}


def hold(secret: Secret) -> None:
    """Keep `secret` in this process's memory for grant_secrets and the gate's start."""
    if ":" not in secret.name:
        raise UsageError("a secret held in memory needs a ':' in its name")
    _HELD[secret.name] = secret


def load(name: str) -> Secret:
    if name in _HELD:
        return _HELD[name]
    path = _dir() / f"{_check_name(name)}.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no secret {name!r} (agentkernel secret set {name} ...)") from None
    return Secret(doc["name"], tuple(doc["hosts"]), doc["header"], doc["env"], doc["value"])


def names() -> list[str]:
    return sorted(p.stem for p in _dir().glob("*.json"))


def remove(name: str) -> None:
    try:
        (_dir() / f"{_check_name(name)}.json").unlink()
    except FileNotFoundError:
        raise NotFound(f"no secret {name!r}") from None


def placeholder() -> str:
    return PLACEHOLDER_PREFIX + os.urandom(16).hex()


def grant_secrets(policy: Policy | None, names: tuple[str, ...],
                  env: dict[str, str]) -> Policy:
    """Each named secret as a random placeholder in its env var, and a grant in the policy
    for the gate to put the value in (egress_mitm); the trust settings for the sandbox's
    CA, whose bundle is bound over the system's."""
    from .egress_policy import Grant

    if policy is None:
        raise UsageError("--secret needs a profile with egress (moderate), not --no-network")
    grants = []
    for name in dict.fromkeys(names):
        secret = load(name)
        grants.append(Grant(name, secret.hosts, secret.header, placeholder()))
        env[secret.env] = grants[-1].placeholder
    bundle = "/etc/ssl/certs/ca-certificates.crt"  # the system bundle, with the CA added
    for key in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
                "NODE_EXTRA_CA_CERTS"):
        env[key] = bundle
    return policy._replace(secrets=tuple(grants))
