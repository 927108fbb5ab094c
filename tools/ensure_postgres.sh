#!/usr/bin/env bash
# The store tests run a real PostgreSQL server (tests/support/postgres.py starts its own, on a
# loopback port, in a temporary directory); install Debian's package when the server binaries are
# missing and we are allowed to (root on a Debian image).
set -euo pipefail
have_server() {
  command -v initdb >/dev/null && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
if have_server; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  # The package starts a cluster of its own we do not want; tests start theirs.
  (service postgresql stop || systemctl stop postgresql) >/dev/null 2>&1 || true
else
  echo "PostgreSQL (initdb) not found and cannot install it: the PostgreSQL tests will be skipped" >&2
fi
