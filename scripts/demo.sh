#!/usr/bin/env bash
# The main job on an embedded default: builds and installs synchdb, starts a
# source cluster (wal_level=logical, sample data) and a destination cluster
# (synchdb preloaded) in a temporary directory, creates and starts a
# connector exactly as the user documentation does, and shows the state view
# and the replicated rows, before and after a change on the source.
# SYNCHDB_DEMO_KEEP=1 leaves both clusters running (the script prints how to
# reach and stop them).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

BIN=/usr/lib/postgresql/15/bin
SRC_PORT=${SRC_PORT:-15432}
DST_PORT=${DST_PORT:-15433}
WORK=$(mktemp -d /tmp/synchdb-demo.XXXXXX)
chown postgres "$WORK"
as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
    if [ "${SYNCHDB_DEMO_KEEP:-0}" = 1 ]; then
        echo "clusters left running: source port $SRC_PORT, destination port $DST_PORT (socket dir $WORK)"
        echo "stop them with: runuser -u postgres -- $BIN/pg_ctl -D $WORK/src stop; runuser -u postgres -- $BIN/pg_ctl -D $WORK/dst stop"
        return
    fi
    as_pg "$BIN/pg_ctl" -D "$WORK/dst" -m fast stop >/dev/null 2>&1 || true
    as_pg "$BIN/pg_ctl" -D "$WORK/src" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

src() { psql -X -h "$WORK" -p "$SRC_PORT" -U postgres -d postgres "$@"; }
dst() { psql -X -h "$WORK" -p "$DST_PORT" -U postgres -d postgres "$@"; }

echo "== source cluster on port $SRC_PORT (wal_level = logical)"
as_pg "$BIN/initdb" -D "$WORK/src" -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null
cat >> "$WORK/src/postgresql.conf" <<CONF
port = $SRC_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = logical
CONF
as_pg "$BIN/pg_ctl" -D "$WORK/src" -l "$WORK/src.log" -w start >/dev/null
src -q <<'SQL'
CREATE ROLE myuser LOGIN SUPERUSER REPLICATION PASSWORD 'mypass';
CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, amount numeric(10,2),
                     created timestamptz DEFAULT now());
INSERT INTO orders (id, customer, amount)
  SELECT g, 'customer ' || g, g * 10.5 FROM generate_series(1, 1000) g;
CREATE TABLE customers (id serial PRIMARY KEY, name text, email text);
INSERT INTO customers (name, email) SELECT 'name ' || g, 'user' || g || '@example.com'
  FROM generate_series(1, 50) g;
SQL

echo "== destination cluster on port $DST_PORT (shared_preload_libraries = 'synchdb')"
as_pg "$BIN/initdb" -D "$WORK/dst" -U postgres --auth-local=trust >/dev/null
cat >> "$WORK/dst/postgresql.conf" <<CONF
port = $DST_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
shared_preload_libraries = 'synchdb'
CONF
as_pg "$BIN/pg_ctl" -D "$WORK/dst" -l "$WORK/dst.log" -w start >/dev/null
dst -q -c "CREATE EXTENSION synchdb;"

wait_for() { # seconds, sql, expected
    local deadline=$((SECONDS + $1))
    until [ "$(dst -Atc "$2")" = "$3" ]; do
        if [ $SECONDS -ge "$deadline" ]; then
            echo "timed out waiting for: $2 = $3" >&2
            dst -c "SELECT * FROM synchdb_state_view" >&2
            tail -20 "$WORK/dst.log" >&2
            exit 1
        fi
        sleep 0.2
    done
}

echo "== create and start the connector"
set -x
dst -c "SELECT synchdb_add_conninfo('pgconn','127.0.0.1',$SRC_PORT,'myuser','mypass','postgres','public','null','null','postgres');"
dst -c "SELECT synchdb_start_engine_bgw('pgconn');"
{ set +x; } 2>/dev/null
wait_for 60 "SELECT count(*) FROM synchdb_table_state" 2
dst -c "SELECT * FROM synchdb_state_view WHERE name = 'pgconn';"
dst -c "SET search_path = postgres" -c '\d'
dst -c "SELECT count(*) AS orders_rows FROM postgres.orders" -c "SELECT * FROM postgres.customers ORDER BY id LIMIT 5"

echo "== change data on the source"
src -q -c "INSERT INTO orders (id, customer, amount) VALUES (1001, 'new customer', 99.99);
           UPDATE customers SET email = 'changed@example.com' WHERE id = 1;
           DELETE FROM orders WHERE id = 2;"
wait_for 60 "SELECT count(*) FROM postgres.orders WHERE id = 1001" 1
wait_for 30 "SELECT stage FROM synchdb_state_view WHERE name = 'pgconn'" "change data capture"
dst -c "SELECT * FROM synchdb_state_view WHERE name = 'pgconn';"
dst -c "SELECT * FROM postgres.orders WHERE id IN (1, 2, 1001) ORDER BY id" \
    -c "SELECT * FROM postgres.customers WHERE id = 1"
dst -c "SELECT name, ddls, dmls, inserts, updates, deletes, transactions, tables_copied, rows_copied, lag_bytes FROM synchdb_stats_view WHERE name = 'pgconn';"
echo "== demo done"
