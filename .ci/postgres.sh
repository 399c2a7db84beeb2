#!/usr/bin/env bash
# CI step: the multi-machine topology of docker/compose.yaml without Docker. A throwaway
# PostgreSQL cluster on loopback; the tests marked `postgres` start `mlflow server` on it
# and run `ddsmon scan` against that server (tests/test_postgres_deployment.py).
#
#   bash .ci/postgres.sh            # after .venv is installed (.ci/run does that first)
#
# Installs PostgreSQL from Debian's packages when it is missing (needs root), and the
# PostgreSQL driver plus MLflow's basic-auth extra into .venv. The cluster lives in a
# temporary directory, listens on 127.0.0.1 on a free port, and is stopped and removed on
# exit, whatever happens. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
[ -x "$PY" ] || { echo "postgres.sh: $PY missing: install the project into .venv first" >&2; exit 2; }

log() { echo "postgres.sh: $*" >&2; }

# The newest installed server's bin directory (Debian: /usr/lib/postgresql/<major>/bin).
pg_bindir() {
    local dir best=""
    for dir in /usr/lib/postgresql/*/bin; do
        [ -x "$dir/initdb" ] || continue
        if [ -z "$best" ] || [ "$(printf '%s\n%s\n' "$best" "$dir" | sort -V | tail -n1)" = "$dir" ]; then
            best=$dir
        fi
    done
    [ -n "$best" ] && echo "$best"
}

# --- PostgreSQL server binaries -------------------------------------------------------------
if ! PGBIN=$(pg_bindir); then
    [ "$(id -u)" -eq 0 ] || { log "PostgreSQL is not installed and this is not root: apt-get install postgresql"; exit 2; }
    log "installing PostgreSQL from the distribution's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-cache policy postgresql | sed -n '1,3p' >&2
    # No default cluster: this script makes its own, and nothing should be left running.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/ddsmon-ci.conf
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    PGBIN=$(pg_bindir) || { log "postgresql installed but no initdb under /usr/lib/postgresql/*/bin"; exit 2; }
fi
log "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') from $PGBIN"

# --- Python side: the driver for the server, basic-auth for the authenticated-server test ---
if ! "$PY" -c "import psycopg2, flask_wtf" 2>/dev/null; then
    MLFLOW_VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('mlflow'))")
    log "installing psycopg2-binary and mlflow[auth]==$MLFLOW_VERSION into .venv"
    .venv/bin/pip install -q --disable-pip-version-check psycopg2-binary "mlflow[auth]==$MLFLOW_VERSION"
fi

# --- A throwaway cluster --------------------------------------------------------------------
# initdb refuses to run as root: as root, the cluster belongs to the postgres user.
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    AS_PG=(runuser -u postgres --)
else
    AS_PG=()
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ddsmon-pg.XXXXXX")
PGDATA="$WORK/data"
[ "${#AS_PG[@]}" -eq 0 ] || chown postgres: "$WORK"
chmod 700 "$WORK"

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local rc=$?
    if [ -f "$PGDATA/postmaster.pid" ]; then
        "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 30 stop >/dev/null 2>&1 \
            || "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
DB_USER=ddsmon
DB_NAME=ddsmon
DB_PASS=$("$PY" -c "import secrets; print(secrets.token_hex(16))")

"${AS_PG[@]}" "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 --no-sync >"$WORK/initdb.log" 2>&1 \
    || { cat "$WORK/initdb.log" >&2; exit 1; }
# Loopback only; the Unix socket in the temporary directory, not /var/run/postgresql.
"${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $WORK -c fsync=off -c full_page_writes=off" start >/dev/null \
    || { cat "$WORK/server.log" >&2; exit 1; }

"${AS_PG[@]}" "$PGBIN/psql" -h "$WORK" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -q \
    -v user="$DB_USER" -v pass="$DB_PASS" -v db="$DB_NAME" <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'pass';
CREATE DATABASE :"db" OWNER :"user";
SQL
log "cluster on 127.0.0.1:$PORT, database $DB_NAME, user $DB_USER"

# The driver named in the URI: SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3,
# while ddsmon's `postgres` extra (and docker/mlflow/Dockerfile) install psycopg2.
export DDSMON_TEST_POSTGRES_URI="postgresql+psycopg2://$DB_USER:$DB_PASS@127.0.0.1:$PORT/$DB_NAME"
export MPLBACKEND=Agg
set +e
"$PY" -m pytest -m postgres -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
    log "pytest exited $rc; the PostgreSQL log:"
    tail -n 40 "$WORK/server.log" >&2 || true
fi
exit "$rc"
