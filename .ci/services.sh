#!/usr/bin/env bash
# Installs the system services the integration tests start themselves (they bind to 127.0.0.1).
set -euo pipefail
case "${1:-install}" in
  install)
    if ! command -v /usr/bin/prometheus >/dev/null 2>&1; then
      if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null \
          || echo "services: could not install prometheus; Prometheus tests will fail with a message"
      else
        echo "services: prometheus missing and not root; Prometheus tests will fail with a message"
      fi
    fi
    ;;
esac
