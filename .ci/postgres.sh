#!/usr/bin/env bash
# PostgreSQL for the multi-worker tests and benchmark (Debian package `postgresql`).
#
#   bash .ci/postgres.sh              install if missing, then check that a throw-away server starts
#                                     on 127.0.0.1 and accepts a connection (what .ci/run calls)
#   bash .ci/postgres.sh start DIR    start a server kept in DIR on loopback; prints its URL
#   bash .ci/postgres.sh stop DIR     stop it
#
# The tests (tests/test_workers.py via tests/pg.py) start and stop their own server in a temporary
# folder, so nothing has to stay running; as root the server runs as the `postgres` system user.
set -euo pipefail
cd "$(dirname "$0")/.."

have_pg() { ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; }

if ! have_pg; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends postgresql
fi
have_pg || { echo "postgres.sh: PostgreSQL binaries not found after install" >&2; exit 1; }
python -c "import psycopg2" 2>/dev/null || pip install -q psycopg2-binary

case "${1:-check}" in
    start) python tests/pg.py start "${2:?usage: postgres.sh start DIR}" ;;
    stop)  python tests/pg.py stop "${2:?usage: postgres.sh stop DIR}" ;;
    check)
        python - <<'PY'
import sys
sys.path.insert(0, "tests")
import psycopg2
from pg import PostgresServer

with PostgresServer() as srv:
    conn = psycopg2.connect(srv.url)
    version = conn.server_version
    conn.close()
print(f"postgres.sh: PostgreSQL {version} starts on loopback and accepts connections")
PY
        ;;
    *) echo "usage: postgres.sh [check|start DIR|stop DIR]" >&2; exit 2 ;;
esac
