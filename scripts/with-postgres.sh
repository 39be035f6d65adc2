#!/usr/bin/env bash
# Run a command against a throwaway PostgreSQL cluster:
#
#   scripts/with-postgres.sh pytest -m postgres
#
# Starts a cluster in a temporary folder, listening on 127.0.0.1 on a free port with trust auth,
# exports MOERGE_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:PORT/postgres, runs the
# command, then stops the cluster and deletes the folder whatever the command's exit code.
# As root, initdb and pg_ctl run as the `postgres` user (initdb refuses root); PostgreSQL is
# installed with apt-get first when it is missing.
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 COMMAND [ARG]..." >&2
  exit 2
fi

find_bindir() {
  local d
  if [ -n "${PG_BINDIR:-}" ] && [ -x "$PG_BINDIR/initdb" ]; then echo "$PG_BINDIR"; return 0; fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return 0; fi
  return 1
}

if ! BINDIR="$(find_bindir)"; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "with-postgres: installing postgresql" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    BINDIR="$(find_bindir)" || { echo "with-postgres: initdb not found after install" >&2; exit 1; }
  else
    echo "with-postgres: PostgreSQL is not installed (initdb not found); install it or set PG_BINDIR" >&2
    exit 1
  fi
fi

# As root, the server runs as `postgres`; otherwise as the current user.
if [ "$(id -u)" -eq 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  as_pg() { runuser -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
WORKDIR="$(mktemp -d -t moerge-pg.XXXXXX)"
DATA="$WORKDIR/data"
LOG="$WORKDIR/server.log"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$WORKDIR"; fi
chmod 700 "$WORKDIR"

cleanup() {
  local rc=$?
  as_pg "$BINDIR/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$WORKDIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

as_pg "$BINDIR/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --no-sync >"$WORKDIR/initdb.log" 2>&1 \
  || { cat "$WORKDIR/initdb.log" >&2; exit 1; }
# Unix socket in the work dir: no clash with a system cluster's /var/run/postgresql.
if ! as_pg "$BINDIR/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $WORKDIR -c fsync=off -c max_connections=200" start >/dev/null; then
  cat "$LOG" >&2
  exit 1
fi

export MOERGE_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"
echo "with-postgres: PostgreSQL $("$BINDIR/pg_ctl" --version | awk '{print $3}') on 127.0.0.1:$PORT" >&2
set +e
"$@"
rc=$?
set -e
exit "$rc"
