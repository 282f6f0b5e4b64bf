#!/usr/bin/env bash
# Install agentkernel from this checkout: system tools (Debian/Ubuntu), the venv, the native agent.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(bubblewrap runsc slirp4netns iptables musl-tools libseccomp-dev gcc make python3 iproute2 util-linux)
if [ "${AGENTKERNEL_SKIP_APT:-0}" != 1 ]; then
  missing=()
  for pkg in "${APT_PACKAGES[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[dev]"
make -s -C agent
# Bytecode up front: an editable install never writes it when PYTHONDONTWRITEBYTECODE is set,
# and recompiling on every CLI call costs more than a sandbox start.
.venv/bin/python -m compileall -q src >/dev/null
echo "agentkernel installed: $(.venv/bin/agentkernel --version)"
