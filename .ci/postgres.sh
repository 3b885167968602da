#!/usr/bin/env bash
# A throwaway PostgreSQL on 127.0.0.1 for the storage tests (tests/test_workers.py).
#
#   eval "$(.ci/postgres.sh start)"   # prints: export DYNSEARCH_TEST_POSTGRES_URL=postgresql://...
#   .ci/postgres.sh stop
#
# Installs Debian's server when it is missing (as root, with apt-get), creates a cluster in a
# temporary folder owned by an unprivileged user, with a password (scram-sha-256) so the URL
# carries credentials as a real deployment's would. When any step fails it prints nothing on
# stdout, says why on stderr, and the PostgreSQL tests skip with their reason.
set -uo pipefail

DIR="${TMPDIR:-/tmp}/dynsearch-ci-postgres"
say() { echo "postgres.sh: $*" >&2; }

find_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    done
    command -v initdb >/dev/null && { dirname "$(command -v initdb)"; return 0; }
    return 1
}

as_owner() {  # run a command as the cluster's owner
    if [ "$(id -u)" = 0 ]; then runuser -u "$OWNER" -- "$@"; else "$@"; fi
}

start() {
    local bin
    if ! bin=$(find_bin); then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            say "installing postgresql from the distribution's packages"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1 \
                || { apt-get update -qq >/dev/null 2>&1 && \
                     DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1; }
        fi
        bin=$(find_bin) || { say "no PostgreSQL server available; its tests will skip"; return 0; }
    fi
    OWNER=$(id -un)
    if [ "$(id -u)" = 0 ]; then
        OWNER=postgres
        id postgres >/dev/null 2>&1 || OWNER=nobody
    fi
    stop >/dev/null 2>&1
    mkdir -p "$DIR" && chown "$OWNER" "$DIR" 2>/dev/null
    local pass port
    pass=$(python3 -c 'import secrets; print(secrets.token_hex(12))')
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    echo "$pass" > "$DIR/pw" && chown "$OWNER" "$DIR/pw" 2>/dev/null
    as_owner "$bin/initdb" -D "$DIR/data" -U dynsearch --pwfile="$DIR/pw" -A scram-sha-256 \
        >"$DIR/initdb.log" 2>&1 || { say "initdb failed (see $DIR/initdb.log)"; return 0; }
    rm -f "$DIR/pw"
    as_owner "$bin/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
        -o "-p $port -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off" \
        start >/dev/null 2>&1 || { say "the server did not start (see $DIR/server.log)"; return 0; }
    PGPASSWORD=$pass "$bin/psql" -h 127.0.0.1 -p "$port" -U dynsearch -d postgres -qc \
        "CREATE DATABASE dynsearch_test" >/dev/null 2>&1 || { say "CREATE DATABASE failed"; return 0; }
    echo "$bin" > "$DIR/bin"
    echo "export DYNSEARCH_TEST_POSTGRES_URL=postgresql://dynsearch:$pass@127.0.0.1:$port/dynsearch_test"
    say "PostgreSQL ready on 127.0.0.1:$port"
}

stop() {
    [ -f "$DIR/bin" ] && [ -d "$DIR/data" ] || return 0
    local bin
    bin=$(cat "$DIR/bin")
    OWNER=$(stat -c %U "$DIR/data")
    as_owner "$bin/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1
    rm -rf "$DIR"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
