#!/usr/bin/env bash
# Things the tests need beyond the venv.
set -euo pipefail

# The browser tests drive Debian's Chromium (Playwright never downloads a browser here).
if [ ! -x /usr/bin/chromium ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
fi

# tests/test_docs.py checks docs/alerts.yml with promtool, which comes with Debian's prometheus.
if ! command -v promtool >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus
fi

# The tests purge the contract's queues: give them a RabbitMQ vhost of their own, so a demo or
# another service on the default vhost is not disturbed.
vhost=${RABBITMQ_VHOST:-orchestrator-tests}
if command -v rabbitmqctl >/dev/null; then
    rabbitmqctl -q add_vhost "$vhost" 2>/dev/null || true
    rabbitmqctl -q set_permissions -p "$vhost" "${RABBITMQ_USER:-guest}" ".*" ".*" ".*"
else
    echo "test setup: rabbitmqctl not found; create the vhost '$vhost' for ${RABBITMQ_USER:-guest} on your broker" >&2
fi
