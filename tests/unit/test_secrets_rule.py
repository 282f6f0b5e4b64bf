"""secrets_store.resolve_uses: who may give a secret to a run, and where it may go."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentkernel import secrets_store
from agentkernel.config import Config, SecretSection
from agentkernel.errors import NotFound


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path))
    secrets_store.save("gh", ["api.github.com", "uploads.github.com"], "*", "GH", "v1")
    secrets_store.save("shared", ["a.test", "b.test"], "x-key", "SHARED", "v2",
                       projects=True)


def config(mine: dict[str, dict[str, object]] | None = None,
           asked: dict[str, dict[str, object]] | None = None) -> Config:
    cfg = Config.model_validate({"secrets": mine or {}})
    cfg._project_secrets = {k: SecretSection.model_validate(v) for k, v in (asked or {}).items()}
    return cfg


def test_a_project_only_asks() -> None:
    uses, warnings = secrets_store.resolve_uses((), config(asked={"gh": {}}))
    assert uses == [] and "not given" in warnings[0]
    uses, warnings = secrets_store.resolve_uses((), config(asked={"missing": {}}))
    assert uses == [] and "not stored" in warnings[0]
    uses, _ = secrets_store.resolve_uses((), config(asked={"shared": {"env": "MINE"}}))
    assert uses == [secrets_store.Use("shared", ("a.test", "b.test"), "x-key", "MINE")]


def test_a_project_narrows_never_widens() -> None:
    asked = {"gh": {"hosts": ["api.github.com", "evil.test"], "header": "authorization"}}
    uses, warnings = secrets_store.resolve_uses(("gh",), config(asked=asked))
    assert uses == [secrets_store.Use("gh", ("api.github.com",), "authorization", "GH")]
    assert any("evil.test: ignored" in w for w in warnings)
    asked = {"shared": {"header": "*"}}  # from one header to any: ignored
    uses, warnings = secrets_store.resolve_uses((), config(asked=asked))
    assert uses[0].header == "x-key" and "header '*': ignored" in warnings[0]
    asked = {"shared": {"hosts": ["evil.test"]}}  # no host left: not given at all
    uses, warnings = secrets_store.resolve_uses((), config(asked=asked))
    assert uses == [] and "no host" in warnings[-1]


def test_your_config_gives_and_widens() -> None:
    mine = {"gh": {"hosts": ["api.github.com", "gist.github.com"], "env": "TOKEN"}}
    uses, _ = secrets_store.resolve_uses((), config(mine=mine))
    assert uses == [secrets_store.Use("gh", ("api.github.com", "gist.github.com"), "*",
                                      "TOKEN")]
    with pytest.raises(NotFound):  # yours naming a secret you have not stored: an error
        secrets_store.resolve_uses(("nope",), config())


def test_sections_are_validated() -> None:
    for bad in ({"hosts": ["*.github.com"]}, {"hosts": ["10.0.0.1"]}, {"hosts": []},
                {"header": "x key"}, {"env": "1X"}):
        with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError
            SecretSection.model_validate(bad)
