#!/usr/bin/env bash
# Install the official agentkernel SDKs that tests/http drives, each apart from our package:
# Python agentkernel-sdk 0.21.0 in .cache/sdk-venv, Node agentkernel 0.18.1 in .cache/node-sdk.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_SDK=0.21.0
NODE_SDK=0.18.1
VENV=.cache/sdk-venv
NODE_DIR=.cache/node-sdk

# Both SDKs install a module named `agentkernel`, as our package does: never in .venv.
if ! "$VENV/bin/python" - "$PY_SDK" 2>/dev/null <<'PY'
import importlib.metadata as m, sys
sys.exit(m.version("agentkernel-sdk") != sys.argv[1])
PY
then
  "${PYTHON:-python3}" -m venv --clear "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "agentkernel-sdk==$PY_SDK"
fi

if ! command -v npm >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm
fi
if [ "$(node -p 'require("./'"$NODE_DIR"'/node_modules/agentkernel/package.json").version' 2>/dev/null)" != "$NODE_SDK" ]; then
  mkdir -p "$NODE_DIR"
  [ -f "$NODE_DIR/package.json" ] || echo '{"private": true}' > "$NODE_DIR/package.json"
  (cd "$NODE_DIR" && npm install --silent --no-audit --no-fund "agentkernel@$NODE_SDK")
fi
echo "SDKs ready: $("$VENV/bin/python" -c 'import importlib.metadata as m; print("agentkernel-sdk", m.version("agentkernel-sdk"))'), node agentkernel $NODE_SDK ($(node --version))"
