"""Secrets kept on the host (0600 in the data dir), handed only to a sandbox's egress gate."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import NotFound, UsageError

if TYPE_CHECKING:
    from .egress_policy import Policy

MAX_VALUE = 64 * 1024
MAX_SECRETS_PER_RUN = 64  # as many grants as a policy carries (egress_policy)
PLACEHOLDER_PREFIX = "ak-secret-"


class Secret(NamedTuple):
    name: str
    hosts: tuple[str, ...]  # exact names: the only hosts that ever see the value
    header: str  # lower case; "*" for any header
    env: str  # the variable the sandbox finds the placeholder in
    value: str
    # A project's agentkernel.toml may ask for it ([secrets.NAME]) without --secret
    # (`secret set --projects`); otherwise only the user's own flags and config give it.
    projects: bool = False


class Use(NamedTuple):
    """A secret as one run uses it: where its value may go, and the variable of its
    placeholder (the stored secret, your config's [secrets.NAME], the project's narrowing)."""

    name: str
    hosts: tuple[str, ...]
    header: str
    env: str


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


def check_env(env: str) -> str:
    if not env or len(env) > 128 or not (env[0].isalpha() or env[0] == "_") or \
            not all(c.isascii() and (c.isalnum() or c == "_") for c in env):
        raise UsageError(f"invalid environment variable name {env[:40]!r}")
    return env


def check_hosts(hosts: list[str]) -> list[str]:
    """Exact host names, normalised (lower case, punycode): the gate presents a
    certificate for each, so no wildcard and no address."""
    from ipaddress import ip_address

    from .egress_policy import normalize_name

    if not hosts:
        raise UsageError("a secret needs at least one host")
    if len(hosts) > 32:
        raise UsageError("at most 32 hosts per secret")
    out = []
    for host in hosts:
        if host.strip().startswith("*"):
            raise UsageError("secret hosts are exact names (the gate presents a certificate "
                             "for each)")
        try:
            ip_address(host.strip().strip("[]"))
        except ValueError:
            out.append(normalize_name(host))
        else:
            raise UsageError(f"secret hosts are names, not addresses ({host!r})")
    return list(dict.fromkeys(out))


def check_header(header: str) -> str:
    header = header.strip().lower()
    if header != "*" and (not header or len(header) > 128 or
                          not all(c.isascii() and (c.isalnum() or c in "-_") for c in header)):
        raise UsageError(f"invalid header name {header[:40]!r}")
    return header


def save(name: str, hosts: list[str], header: str, env: str, value: str,
         projects: bool = False) -> Secret:
    value = value.rstrip("\r\n")
    if not value or len(value) > MAX_VALUE or any(c in value for c in "\r\n\0"):
        raise UsageError("the secret's value must be one non-empty line (at most 64 KiB)")
    secret = Secret(_check_name(name), tuple(check_hosts(hosts)), check_header(header),
                    check_env(env), value, projects)
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
    return Secret(doc["name"], tuple(doc["hosts"]), doc["header"], doc["env"], doc["value"],
                  doc.get("projects") is True)


def names() -> list[str]:
    return sorted(p.stem for p in _dir().glob("*.json"))


def remove(name: str) -> None:
    try:
        (_dir() / f"{_check_name(name)}.json").unlink()
    except FileNotFoundError:
        raise NotFound(f"no secret {name!r}") from None


def placeholder() -> str:
    return PLACEHOLDER_PREFIX + os.urandom(16).hex()


def resolve_uses(run: tuple[str, ...], config: object | None
                 ) -> tuple[list[Use], list[str]]:
    """The secrets a run uses and where each may go, with warnings; the one place the
    rule is decided (docs/security.md "Secrets"):

    - the run's --secret names and your own config's `[secrets.NAME]` (user config, -c)
      give NAME; your config's keys replace the stored ones and may widen `hosts`;
    - a project file's `[secrets.NAME]` (whoever wrote the repository) gives NAME only if
      the run or your config already does, or the stored secret allows projects to ask
      (`secret set --projects`); it may narrow `hosts` to some of the allowed ones, narrow
      a `*` header to one header, and name the variable; never widen. What it asks beyond
      that is ignored with a warning, and a secret it leaves no host for is not given.
    """
    trusted: dict[str, Any] = dict(getattr(config, "secrets", None) or {})
    asked: dict[str, Any] = dict(getattr(config, "project_secrets", None) or {})
    uses: list[Use] = []
    warnings: list[str] = []
    for name in dict.fromkeys([*run, *trusted, *asked]):
        if len(uses) >= MAX_SECRETS_PER_RUN:
            raise UsageError(f"at most {MAX_SECRETS_PER_RUN} secrets per run")
        given = name in run or name in trusted
        try:
            secret = load(name)
        except NotFound:
            if given:
                raise
            warnings.append(f"the project asks for secret {name!r}, which you have not "
                            "stored: not given")
            continue
        if not given and not secret.projects:
            warnings.append(f"the project asks for secret {name!r}: not given (--secret "
                            f"{name} gives it to this run; `secret set {name} --projects` "
                            "lets projects ask for it)")
            continue
        mine = trusted.get(name)
        use = Use(name, tuple(_get(mine, "hosts") or secret.hosts),
                  _get(mine, "header") or secret.header, _get(mine, "env") or secret.env)
        if name in asked:
            narrowed = _narrow(use, asked[name], warnings)
            if narrowed is None:
                continue
            use = narrowed
        uses.append(use)
    return uses, warnings


def _get(section: object, key: str) -> Any:
    return getattr(section, key, None) if section is not None else None


def _narrow(use: Use, asked: object, warnings: list[str]) -> Use | None:
    """`use` as the project's section narrows it; None if it leaves no host."""
    hosts = _get(asked, "hosts")
    if hosts is not None:
        beyond = [h for h in hosts if h not in use.hosts]
        if beyond:
            warnings.append(f"the project's [secrets.{use.name}] hosts {', '.join(beyond)}: "
                            "ignored: a project file may not send a secret to hosts you "
                            "did not give it")
        kept = tuple(h for h in use.hosts if h in hosts)
        if not kept:
            warnings.append(f"secret {use.name!r}: the project leaves it no host: not given")
            return None
        use = use._replace(hosts=kept)
    header = _get(asked, "header")
    if header is not None and header != use.header:
        if use.header == "*" and header != "*":
            use = use._replace(header=header)
        else:
            warnings.append(f"the project's [secrets.{use.name}] header {header!r}: ignored: "
                            f"the secret goes in {use.header!r} only")
    env = _get(asked, "env")
    return use._replace(env=env) if env else use


def grant_secrets(policy: Policy | None, uses: list[Use], env: dict[str, str]) -> Policy:
    """Each secret used as a random placeholder in its env var, and a grant in the policy
    for the gate to put the value in (egress_mitm); the trust settings for the sandbox's
    CA, whose bundle is bound over the system's."""
    from .egress_policy import Grant

    if policy is None:
        raise UsageError("secrets need a profile with egress (moderate), not --no-network")
    grants = []
    for use in uses:
        grants.append(Grant(use.name, use.hosts, use.header, placeholder()))
        env[use.env] = grants[-1].placeholder
    bundle = "/etc/ssl/certs/ca-certificates.crt"  # the system bundle, with the CA added
    for key in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
                "NODE_EXTRA_CA_CERTS"):
        env[key] = bundle
    return policy._replace(secrets=tuple(grants))
