#!/usr/bin/env bash
# Benchmark: synchdb against PostgreSQL's native logical replication
# (CREATE SUBSCRIPTION) on the same two clusters and the same pgbench data.
#   ./scripts/bench.sh [SCALE] [BACKLOG_TRANSACTIONS] [ROUNDS]
#   (env BIG_ROWS, default 2000000: rows of the large transaction (d); 0 skips it)
# (a) snapshot: time from start until every pgbench table is copied;
# (b) catch-up: with both replicas stopped, pgbench runs BACKLOG TPC-B
#     transactions on the source; time from restart until each replica has
#     applied all of them; ROUNDS rounds (default 3), the order of the two
#     replicas alternating, the median reported. Prints both times and the
#     ratio synchdb/native.
# Release build; each measurement runs alone (the other replica is idle).
# Before (b) both replicas' tables and indexes are loaded into the
# destination's shared buffers (pg_prewarm), so that neither side pays for
# first-touching shared memory or reading from disk that the other does not.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-10}
BACKLOG=${2:-20000}
ROUNDS=${3:-3}
./scripts/setup.sh >/dev/null

BIN=/usr/lib/postgresql/15/bin
SRC_PORT=${SRC_PORT:-25432}
DST_PORT=${DST_PORT:-25433}
WORK=$(mktemp -d /tmp/synchdb-bench.XXXXXX)
chown postgres "$WORK"
as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
    as_pg "$BIN/pg_ctl" -D "$WORK/dst" -m immediate stop >/dev/null 2>&1 || true
    as_pg "$BIN/pg_ctl" -D "$WORK/src" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
src() { psql -X -q -h "$WORK" -p "$SRC_PORT" -U postgres -d postgres "$@"; }
dst() { psql -X -q -h "$WORK" -p "$DST_PORT" -U postgres -d postgres "$@"; }
nat() { psql -X -q -h "$WORK" -p "$DST_PORT" -U postgres -d native "$@"; }
now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc; }
wait_sql() { # runner sql expected timeout
    local deadline=$((SECONDS + $4))
    until [ "$($1 -Atc "$2")" = "$3" ]; do
        [ $SECONDS -lt "$deadline" ] || { echo "timeout waiting for $2" >&2; exit 1; }
        sleep 0.05
    done
}
command -v bc >/dev/null || { apt-get install -y -qq bc >/dev/null; }

for side in src dst; do
    as_pg "$BIN/initdb" -D "$WORK/$side" -U postgres --auth-local=trust --auth-host=trust >/dev/null
done
cat >> "$WORK/src/postgresql.conf" <<CONF
port = $SRC_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = logical
max_wal_size = 4GB
CONF
cat >> "$WORK/dst/postgresql.conf" <<CONF
port = $DST_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
shared_preload_libraries = 'synchdb'
shared_buffers = 1GB
max_wal_size = 4GB
max_worker_processes = 16
CONF
as_pg "$BIN/pg_ctl" -D "$WORK/src" -l "$WORK/src.log" -w start >/dev/null
as_pg "$BIN/pg_ctl" -D "$WORK/dst" -l "$WORK/dst.log" -w start >/dev/null

echo "== pgbench -i -s $SCALE on the source"
as_pg "$BIN/pgbench" -h "$WORK" -p "$SRC_PORT" -U postgres -i -s "$SCALE" -q postgres 2>&1 | tail -1
ROWS=$(src -Atc "SELECT count(*) FROM pgbench_accounts")
echo "   pgbench_accounts: $ROWS rows"

dst -c "CREATE EXTENSION synchdb" -c "CREATE DATABASE native"
as_pg "$BIN/pg_dump" -h "$WORK" -p "$SRC_PORT" -U postgres -s -t 'pgbench_*' postgres | nat >/dev/null
src -c "CREATE PUBLICATION bench_native FOR ALL TABLES"

echo "== (a) snapshot"
T=$(now)
dst -c "SELECT synchdb_add_conninfo('bench','127.0.0.1',$SRC_PORT,'postgres','','postgres','public','null','null','postgres')" \
    -c "SELECT synchdb_start_engine_bgw('bench')" >/dev/null
wait_sql dst "SELECT count(*) FROM synchdb_table_state WHERE name = 'bench'" 4 3600
SNAP_SYNCHDB=$(elapsed "$T")
echo "   synchdb: ${SNAP_SYNCHDB}s"
[ "$(dst -Atc "SELECT count(*) FROM postgres.pgbench_accounts")" = "$ROWS" ] || { echo "row count mismatch"; exit 1; }

T=$(now)
nat -c "CREATE SUBSCRIPTION bench_native CONNECTION 'host=127.0.0.1 port=$SRC_PORT dbname=postgres user=postgres' PUBLICATION bench_native"
wait_sql nat "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'" 0 3600
SNAP_NATIVE=$(elapsed "$T")
echo "   native:  ${SNAP_NATIVE}s"

echo "== (b) catch-up of $BACKLOG pgbench transactions, $ROUNDS rounds (median)"
dst -c "SELECT synchdb_stop_engine_bgw('bench')" >/dev/null
nat -c "ALTER SUBSCRIPTION bench_native DISABLE"
dst -c "CREATE EXTENSION pg_prewarm" >/dev/null
nat -c "CREATE EXTENSION pg_prewarm" >/dev/null
PREWARM="SELECT sum(pg_prewarm(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = current_setting('bench.schema') AND c.relname LIKE 'pgbench%' AND c.relkind IN ('r','i')"
catch_synchdb() {
    local t; t=$(now)
    dst -c "SELECT synchdb_start_engine_bgw('bench')" >/dev/null
    wait_sql dst "SELECT count(*) FROM postgres.pgbench_history" "$HIST" 3600
    elapsed "$t"
    [ "$(dst -Atc "SELECT sum(abalance) FROM postgres.pgbench_accounts")" = "$SUM" ] || { echo "synchdb balance mismatch" >&2; exit 1; }
    dst -c "SELECT synchdb_stop_engine_bgw('bench')" >/dev/null
}
catch_native() {
    local t; t=$(now)
    nat -c "ALTER SUBSCRIPTION bench_native ENABLE" >/dev/null
    wait_sql nat "SELECT count(*) FROM pgbench_history" "$HIST" 3600
    elapsed "$t"
    [ "$(nat -Atc "SELECT sum(abalance) FROM pgbench_accounts")" = "$SUM" ] || { echo "native balance mismatch" >&2; exit 1; }
    nat -c "ALTER SUBSCRIPTION bench_native DISABLE" >/dev/null
}
S_TIMES=(); N_TIMES=()
for round in $(seq 1 "$ROUNDS"); do
    wait_sql src "SELECT count(*) FROM pg_replication_slots WHERE active" 0 60
    as_pg "$BIN/pgbench" -h "$WORK" -p "$SRC_PORT" -U postgres -c 4 -j 2 -t $((BACKLOG / 4)) -n postgres >/dev/null
    HIST=$(src -Atc "SELECT count(*) FROM pgbench_history")
    SUM=$(src -Atc "SELECT sum(abalance) FROM pgbench_accounts")
    dst -c "SET bench.schema = 'postgres'" -c "$PREWARM" >/dev/null
    nat -c "SET bench.schema = 'public'" -c "$PREWARM" >/dev/null
    # Alternate which replica goes first.
    if [ $((round % 2)) -eq 1 ]; then
        S=$(catch_synchdb); N=$(catch_native)
    else
        N=$(catch_native); S=$(catch_synchdb)
    fi
    printf "   round %d: synchdb %.2fs, native %.2fs\n" "$round" "$S" "$N"
    S_TIMES+=("$S"); N_TIMES+=("$N")
done
median() { printf "%s\n" "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
CATCH_SYNCHDB=$(median "${S_TIMES[@]}")
CATCH_NATIVE=$(median "${N_TIMES[@]}")

# --- (d) one large transaction (streaming of in-progress transactions) ---
# BIG_ROWS (default 2000000; e.g. BIG_ROWS=10000000) rows inserted by one
# source transaction; time from its start until the replica shows it, for
# synchdb (pgoutput streaming, spooled, see README "Large transactions") and
# for native with `streaming = on`, each alone; and the synchdb worker's
# peak resident memory (VmHWM, which counts the shared buffers it touched).
# BIG_ROWS=0 skips it.
BIG_ROWS=${BIG_ROWS:-2000000}
BIG_LINE=""
big_transaction() {
    local t hwm spid s n
    echo "== (d) one large transaction of $BIG_ROWS rows"
    src -c "CREATE TABLE big_txn (id bigint PRIMARY KEY, v text NOT NULL, n int NOT NULL)"
    nat -c "CREATE TABLE big_txn (id bigint PRIMARY KEY, v text NOT NULL, n int NOT NULL)"
    nat -c "ALTER SUBSCRIPTION bench_native ENABLE" >/dev/null 2>&1 || true
    nat -c "ALTER SUBSCRIPTION bench_native REFRESH PUBLICATION" -c "ALTER SUBSCRIPTION bench_native SET (streaming = on)" >/dev/null
    if [ "$(dst -Atc "SELECT count(*) FROM synchdb_state_view WHERE name = 'bench' AND pid > 0")" = 0 ]; then
        dst -c "SELECT synchdb_start_engine_bgw('bench')" >/dev/null
    fi
    wait_sql nat "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'" 0 300
    src -c "INSERT INTO big_txn VALUES (0, 'warm-up', 0)"
    wait_sql dst "SELECT count(*) FROM pg_tables WHERE schemaname = 'postgres' AND tablename = 'big_txn'" 1 300
    wait_sql dst "SELECT EXISTS (SELECT 1 FROM postgres.big_txn WHERE id = 0)" t 300
    wait_sql nat "SELECT EXISTS (SELECT 1 FROM big_txn WHERE id = 0)" t 300
    spid=$(dst -Atc "SELECT pid FROM synchdb_state_view WHERE name = 'bench'")
    # synchdb alone (a key lookup shows when the whole transaction is visible)
    nat -c "ALTER SUBSCRIPTION bench_native DISABLE" >/dev/null
    t=$(now)
    src -c "INSERT INTO big_txn SELECT g, md5(g::text), 0 FROM generate_series(1, $BIG_ROWS) g"
    wait_sql dst "SELECT EXISTS (SELECT 1 FROM postgres.big_txn WHERE id = $BIG_ROWS)" t 14400
    s=$(elapsed "$t")
    hwm=$(awk '$1 == "VmHWM:" {print $2}' "/proc/$spid/status")
    [ "$(dst -Atc "SELECT count(*) FROM postgres.big_txn")" = "$((BIG_ROWS + 1))" ] || { echo "synchdb big_txn mismatch" >&2; exit 1; }
    dst -c "SELECT synchdb_stop_engine_bgw('bench')" >/dev/null
    # native alone, once it has applied the first one (not timed)
    nat -c "ALTER SUBSCRIPTION bench_native ENABLE" >/dev/null
    wait_sql nat "SELECT EXISTS (SELECT 1 FROM big_txn WHERE id = $BIG_ROWS)" t 14400
    t=$(now)
    src -c "INSERT INTO big_txn SELECT g, md5(g::text), 0 FROM generate_series($BIG_ROWS + 1, 2 * $BIG_ROWS) g"
    wait_sql nat "SELECT EXISTS (SELECT 1 FROM big_txn WHERE id = 2 * $BIG_ROWS)" t 14400
    n=$(elapsed "$t")
    [ "$(nat -Atc "SELECT count(*) FROM big_txn")" = "$((2 * BIG_ROWS + 1))" ] || { echo "native big_txn mismatch" >&2; exit 1; }
    printf "   synchdb %.2fs (peak RSS %d MB), native %.2fs\n" "$s" "$((hwm / 1024))" "$n"
    BIG_LINE=$(printf "%-10s %12.2f %12.2f %8.2f   (%d rows in one transaction; synchdb worker peak RSS %d MB)" \
        big-txn "$s" "$n" "$(echo "$s / $n" | bc -l)" "$BIG_ROWS" "$((hwm / 1024))")
}
if [ "$BIG_ROWS" -gt 0 ]; then
    big_transaction
fi
# --- end of (d) ---

echo
printf "%-10s %12s %12s %8s\n" "" "synchdb(s)" "native(s)" "ratio"
printf "%-10s %12.2f %12.2f %8.2f\n" snapshot "$SNAP_SYNCHDB" "$SNAP_NATIVE" "$(echo "$SNAP_SYNCHDB / $SNAP_NATIVE" | bc -l)"
printf "%-10s %12.2f %12.2f %8.2f\n" catch-up "$CATCH_SYNCHDB" "$CATCH_NATIVE" "$(echo "$CATCH_SYNCHDB / $CATCH_NATIVE" | bc -l)"
# --- (d) large transaction line ---
if [ -n "$BIG_LINE" ]; then
    echo
    printf "%-10s %12s %12s %8s\n" "" "synchdb(s)" "native(s)" "ratio"
    echo "$BIG_LINE"
fi
