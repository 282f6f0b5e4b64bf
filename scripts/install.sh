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
# The `agentkernel` command: the native client (launcher/) for `run`/`exec` through a running
# daemon, which execs the Python CLI beside it (agentkernel-py) for everything else. Without
# a C compiler (or with AGENTKERNEL_NATIVE_CLI=0) the Python launcher is the command itself.
VENV_BIN="$PWD/.venv/bin"
sed "1s|.*|#!$VENV_BIN/python|" bin/agentkernel > "$VENV_BIN/agentkernel-py.tmp"
chmod 755 "$VENV_BIN/agentkernel-py.tmp"
mv -f "$VENV_BIN/agentkernel-py.tmp" "$VENV_BIN/agentkernel-py"
if [ "${AGENTKERNEL_NATIVE_CLI:-1}" != 0 ] && make -s -C launcher PYTHON="$VENV_BIN/python"; then
  install -m 755 launcher/build/agentkernel "$VENV_BIN/agentkernel.tmp"
else
  [ "${AGENTKERNEL_NATIVE_CLI:-1}" = 0 ] || echo "install: no native agentkernel command (no C compiler?): the Python one is installed" >&2
  cp "$VENV_BIN/agentkernel-py" "$VENV_BIN/agentkernel.tmp"
fi
mv -f "$VENV_BIN/agentkernel.tmp" "$VENV_BIN/agentkernel"
# Bytecode up front: an editable install never writes it when PYTHONDONTWRITEBYTECODE is set,
# and recompiling on every CLI call costs more than a sandbox start.
.venv/bin/python -m compileall -q src >/dev/null
echo "agentkernel installed: $(.venv/bin/agentkernel --version)"
