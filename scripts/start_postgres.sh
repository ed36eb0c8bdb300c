#!/usr/bin/env bash
# Start (or stop) a throwaway PostgreSQL server bound to 127.0.0.1 only, for tests and local trials.
#
#   scripts/start_postgres.sh start PORT   -> prints PGDATA=<dir> and DATABASE_URL=<sqlalchemy url>, exits 0
#   scripts/start_postgres.sh stop PGDATA  -> stops that server and deletes its data directory
#
# Server binaries: $PG_BIN if set, else the newest /usr/lib/postgresql/*/bin (Debian's postgresql package), else
# the directory of `initdb` on PATH. Exit code 3 = no PostgreSQL server binaries installed (tests then skip).
# Run as root (CI containers), the server runs as the `postgres` user, which initdb requires.
set -euo pipefail

find_bin() {
  if [[ -n "${PG_BIN:-}" && -x "$PG_BIN/initdb" ]]; then echo "$PG_BIN"; return; fi
  local newest
  newest=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [[ -n "$newest" && -x "$newest/initdb" ]]; then echo "$newest"; return; fi
  if command -v initdb >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v initdb)")"; return; fi
  echo "no PostgreSQL server binaries (initdb, pg_ctl); install Debian's 'postgresql' package" >&2
  exit 3
}

as_db_user() {
  if [[ "$(id -u)" == "0" ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
  start)
    port="${2:?usage: start PORT}"
    bin=$(find_bin)
    # Not under the caller's temp dir: pytest's are mode 0700 and the postgres user could not enter them.
    data=$(mktemp -d /tmp/rlhf-pg.XXXXXX)
    if [[ "$(id -u)" == "0" ]]; then chown postgres: "$data"; fi
    chmod 0700 "$data"
    as_db_user "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --no-locale >"$data.initdb.log" 2>&1 \
      || { cat "$data.initdb.log" >&2; exit 1; }
    # listen_addresses=127.0.0.1: loopback only; the unix socket lives in the data dir, not /var/run.
    as_db_user "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c max_connections=100" start >/dev/null \
      || { cat "$data/server.log" >&2; exit 1; }
    echo "PGDATA=$data"
    echo "DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
    ;;
  stop)
    data="${2:?usage: stop PGDATA}"
    bin=$(find_bin)
    as_db_user "$bin/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$data" "$data.initdb.log"
    ;;
  *)
    echo "usage: $0 start PORT | stop PGDATA" >&2
    exit 2
    ;;
esac
