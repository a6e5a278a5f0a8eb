#!/usr/bin/env bash
# The compose test validates docker-compose.yml with a real Compose implementation (`config` needs no Docker
# engine). Install Debian's docker-compose when none is present and we may use apt; otherwise say why the
# test will skip. Never fails the caller.
if docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's docker-compose for the compose config test..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose) >/dev/null 2>&1 \
    || echo "warning: could not install docker-compose; tests/demo/test_compose.py will skip its config check"
else
  echo "note: no Docker Compose found; tests/demo/test_compose.py will skip its config check"
fi
exit 0
