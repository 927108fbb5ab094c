#!/usr/bin/env bash
# The observability tests run a real Prometheus server; install Debian's
# package when it is missing and we are allowed to (root on a Debian image).
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package starts a system service we do not want; tests start their own.
  (service prometheus stop || systemctl stop prometheus || pkill -x prometheus) >/dev/null 2>&1 || true
else
  echo "prometheus/promtool not found and cannot install them: the Prometheus tests will be skipped" >&2
fi
