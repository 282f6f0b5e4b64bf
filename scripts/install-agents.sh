#!/usr/bin/env bash
# The agent CLIs tests/agents drives (Claude Code, Codex, Gemini CLI, OpenCode at the
# registry's pinned versions), installed with `agentkernel agents install` into
# .cache/agents-home (about 1.3 GB of node_modules; only what is missing or stale).
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTKERNEL_HOME=.cache/agents-home .venv/bin/python - <<'PY'
from agentkernel.agents.install import install
from agentkernel.agents.registry import agents
from agentkernel.agents.status import installed_binary, probe_version

for spec in agents():
    binary = installed_binary(spec)
    if binary.exists() and probe_version(spec, str(binary)) == spec.version:
        continue
    print(f"installing {spec.npm_spec}", flush=True)
    install(spec, quiet=True)
print("agent CLIs ready: " + ", ".join(f"{a.id} {a.version}" for a in agents()))
PY
