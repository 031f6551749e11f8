#!/usr/bin/env bash
# Start node ID of a single metadata group described by a SurfStore-format
# config ("M: N" then "metadataK: host:port" lines), the way SurfStore
# tooling expects: ChaosMonkey calls enabled, state in a data directory of
# the node's own, logs on stdout. Usage: run-server.sh CONFIG ID
set -euo pipefail
if [ "$#" -ne 2 ]; then
    echo "usage: $0 CONFIG ID" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ ! -x "$here/.venv/bin/twistd" ]; then
    python3 "$here/dev.py" setup >&2
fi
exec "$here/.venv/bin/twistd" --nodaemon --pidfile= --logfile=- \
    surfshard --config "$1" --group 1 --node "$2" --chaos
