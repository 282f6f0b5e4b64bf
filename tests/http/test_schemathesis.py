"""Schemathesis against our OpenAPI document and a real server: no input may cause a 5xx."""

from __future__ import annotations

import os

import pytest
import schemathesis
from akhttp import API_KEY
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from agentkernel.http.app import create_app
from agentkernel.http.serve import RunningServer

schema = schemathesis.openapi.from_dict(create_app(None).openapi())  # type: ignore[arg-type]
EXAMPLES = int(os.environ.get("AK_FUZZ_EXAMPLES", "50"))


@pytest.fixture
def live(server: RunningServer) -> RunningServer:
    return server


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, live: RunningServer) -> None:
    if isinstance(case.body, dict) and case.body.get("backend") not in (None, "", "auto",
                                                                          "namespaces"):
        # Whether gVisor or a microVM (seconds per boot under emulation) works depends on
        # the host, not on the API: keep the fuzzing on the namespaces backend.
        case.body["backend"] = "namespaces"
    case.call_and_validate(base_url=live.url, headers={"Authorization": f"Bearer {API_KEY}"},
                           checks=[not_a_server_error, response_schema_conformance], timeout=60)
