#!/usr/bin/env bash
# Install everything the suite needs, then run lint, types and the tests (real sandboxes).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh clang libclang-rt-14-dev docker-registry apache2-utils openssl busybox-static skopeo umoci zstd nodejs qemu-system-x86 e2fsprogs lz4 mmdebstrap iptables procps docker.io podman runc uidmap git python3-pip python3-requests
./scripts/install-sdks.sh  # the official SDKs tests/http drives, outside .venv
./scripts/install-agents.sh  # the agent CLIs tests/agents drives, from npm
.venv/bin/ruff check src tests bench
.venv/bin/mypy
set +e
.venv/bin/python -m pytest -q -ra "$@"
rc=$?
set -e
# pytest's 5 means "no tests collected": that is a failure for us, not a pass.
[ "$rc" -eq 5 ] && { echo "no tests ran" >&2; exit 1; }
exit "$rc"
