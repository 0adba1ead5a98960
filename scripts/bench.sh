#!/usr/bin/env bash
# Benchmark: synchdb against PostgreSQL's native logical replication
# (CREATE SUBSCRIPTION) on the same two clusters and the same pgbench data.
#   ./scripts/bench.sh [SCALE] [BACKLOG_TRANSACTIONS] [ROUNDS]
#   (env LAG_SECONDS, default 120: length of the lag run; 0 skips it;
#    SMALL_TABLES, default 200: tables of the many-small-tables snapshot)
#   (env BIG_ROWS, default 2000000: rows of the large transaction (d); 0 skips it)
# (a) snapshot: time from start until every pgbench table is copied;
# (a2) snapshot of many small tables (SMALL_TABLES of 1000 rows, in a
#     database of their own), synchdb in initial_only against a native
#     subscription;
# (b) catch-up: with both replicas stopped, pgbench runs BACKLOG TPC-B
#     transactions on the source; time from restart until each replica has
#     applied all of them; ROUNDS rounds (default 3), the order of the two
#     replicas alternating, the median reported. Prints both times and the
#     ratio synchdb/native;
# (c) lag: pgbench at a fixed rate (half of what the source sustains) for
#     LAG_SECONDS while both replicas apply it; per transaction, the lag is
#     the time its probe row was written in the destination (a column of
#     the destination only, DEFAULT clock_timestamp()) minus the source
#     commit time (track_commit_timestamp; the clusters share a clock: a
#     replica's own commit timestamps are the source's); p50/p95/p99 for
#     each replica, and the CPU and memory of the apply process.
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
track_commit_timestamp = on
CONF
cat >> "$WORK/dst/postgresql.conf" <<CONF
port = $DST_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
shared_preload_libraries = 'synchdb'
shared_buffers = 1GB
max_wal_size = 4GB
max_worker_processes = 16
track_commit_timestamp = on
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

SMALL_TABLES=${SMALL_TABLES:-200}
if [ "$SMALL_TABLES" -gt 0 ]; then
    echo "== (a2) snapshot of $SMALL_TABLES small tables (1000 rows each)"
    src -c "CREATE DATABASE small"
    psql -X -q -h "$WORK" -p "$SRC_PORT" -U postgres -d small -c "
        DO \$\$ BEGIN FOR i IN 1..$SMALL_TABLES LOOP
            EXECUTE format('CREATE TABLE t%s (id int PRIMARY KEY, v text, n numeric)', i);
            EXECUTE format('INSERT INTO t%s SELECT g, md5(g::text), g * 1.5 FROM generate_series(1, 1000) g', i);
        END LOOP; END \$\$" -c "CREATE PUBLICATION small_native FOR ALL TABLES"
    dst -c "CREATE DATABASE native_small"
    as_pg "$BIN/pg_dump" -h "$WORK" -p "$SRC_PORT" -U postgres -s small \
        | psql -X -q -h "$WORK" -p "$DST_PORT" -U postgres -d native_small >/dev/null 2>&1
    T=$(now)
    dst -c "SELECT synchdb_add_conninfo('small','127.0.0.1',$SRC_PORT,'postgres','','small','public','null','null','postgres')" \
        -c "SELECT synchdb_start_engine_bgw('small', 'initial_only')" >/dev/null
    wait_sql dst "SELECT count(*) FROM synchdb_table_state WHERE name = 'small' AND state = 'ready'" "$SMALL_TABLES" 3600
    SMALL_SYNCHDB=$(elapsed "$T")
    echo "   synchdb: ${SMALL_SYNCHDB}s"
    T=$(now)
    psql -X -q -h "$WORK" -p "$DST_PORT" -U postgres -d native_small \
        -c "CREATE SUBSCRIPTION small_native CONNECTION 'host=127.0.0.1 port=$SRC_PORT dbname=small user=postgres' PUBLICATION small_native"
    until [ "$(psql -X -h "$WORK" -p "$DST_PORT" -U postgres -d native_small -Atc \
        "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate = 'r'")" = "$SMALL_TABLES" ]; do sleep 0.05; done
    SMALL_NATIVE=$(elapsed "$T")
    echo "   native:  ${SMALL_NATIVE}s"
    [ "$(dst -Atc "SELECT count(*) FROM small.t$SMALL_TABLES")" = 1000 ] || { echo "small table row count mismatch"; exit 1; }
    psql -X -q -h "$WORK" -p "$DST_PORT" -U postgres -d native_small -c "ALTER SUBSCRIPTION small_native DISABLE"
    dst -c "SELECT synchdb_stop_engine_bgw('small')" >/dev/null 2>&1 || true
fi

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

LAG_SECONDS=${LAG_SECONDS:-120}
proc_cpu() { # pid -> user+system seconds
    awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"
}
proc_kb() { # pid field -> kB
    awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"
}
LAG_LINES=()
if [ "$LAG_SECONDS" -gt 0 ]; then
    echo "== (c) lag at a fixed rate for ${LAG_SECONDS}s, both replicas applying"
    src -c "CREATE TABLE lag_probe (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())" \
        -c "CREATE SEQUENCE lag_probe_seq"
    # On each destination the probe rows get the time they were written
    # there (a column of the destination only: both replicas fill it from
    # its default when they insert the row).
    nat -c "CREATE TABLE lag_probe (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(),
                                    applied timestamptz DEFAULT clock_timestamp())"
    nat -c "ALTER SUBSCRIPTION bench_native ENABLE" -c "ALTER SUBSCRIPTION bench_native REFRESH PUBLICATION" >/dev/null
    dst -c "SELECT synchdb_start_engine_bgw('bench')" >/dev/null
    wait_sql dst "SELECT count(*) FROM synchdb_state_view WHERE name = 'bench' AND stage = 'change data capture'" 1 120
    wait_sql dst "SELECT count(*) FROM synchdb_table_state WHERE name = 'bench' AND src_table = 'lag_probe' AND state = 'ready'" 1 120
    dst -c "ALTER TABLE postgres.lag_probe ADD COLUMN applied timestamptz DEFAULT clock_timestamp()"
    wait_sql nat "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'" 0 120
    cat > "$WORK/lag.sql" <<'SQL'
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
INSERT INTO lag_probe (id) VALUES (nextval('lag_probe_seq'));
END;
SQL
    chown postgres "$WORK/lag.sql"
    # What the source sustains with both replicas attached, then half of it.
    TPS=$(as_pg "$BIN/pgbench" -h "$WORK" -p "$SRC_PORT" -U postgres -c 4 -j 2 -T 10 -n -f "$WORK/lag.sql" postgres 2>/dev/null \
        | awk '/^tps/ {print int($3)}')
    RATE=$((TPS / 2))
    echo "   source sustains ${TPS} tps; running at ${RATE} tps"
    wait_sql dst "SELECT count(*) FROM postgres.lag_probe" "$(src -Atc "SELECT count(*) FROM lag_probe")" 300
    wait_sql nat "SELECT count(*) FROM lag_probe" "$(src -Atc "SELECT count(*) FROM lag_probe")" 300
    SPID=$(dst -Atc "SELECT pid FROM synchdb_state_view WHERE name = 'bench'")
    NPID=$(nat -Atc "SELECT pid FROM pg_stat_subscription WHERE subname = 'bench_native' AND relid IS NULL")
    FIRST=$(src -Atc "SELECT coalesce(max(id), 0) FROM lag_probe")
    S_CPU0=$(proc_cpu "$SPID"); N_CPU0=$(proc_cpu "$NPID"); T=$(now)
    as_pg "$BIN/pgbench" -h "$WORK" -p "$SRC_PORT" -U postgres -c 4 -j 2 -T "$LAG_SECONDS" -R "$RATE" -n -f "$WORK/lag.sql" postgres >/dev/null 2>&1
    N_PROBES=$(src -Atc "SELECT count(*) FROM lag_probe")
    wait_sql dst "SELECT count(*) FROM postgres.lag_probe" "$N_PROBES" 600
    wait_sql nat "SELECT count(*) FROM lag_probe" "$N_PROBES" 600
    WALL=$(elapsed "$T")
    S_CPU=$(echo "$(proc_cpu "$SPID") - $S_CPU0" | bc); N_CPU=$(echo "$(proc_cpu "$NPID") - $N_CPU0" | bc)
    # Source commit times into the destination, then the percentiles there.
    dst -c "CREATE TABLE public.lag_src (id bigint PRIMARY KEY, committed timestamptz)"
    src -c "COPY (SELECT id, pg_xact_commit_timestamp(xmin) FROM lag_probe WHERE id > $FIRST) TO STDOUT" \
        | dst -c "COPY public.lag_src FROM STDIN"
    nat -c "CREATE TABLE lag_src (id bigint PRIMARY KEY, committed timestamptz)"
    src -c "COPY (SELECT id, pg_xact_commit_timestamp(xmin) FROM lag_probe WHERE id > $FIRST) TO STDOUT" \
        | nat -c "COPY lag_src FROM STDIN"
    PCT="SELECT to_char(1000 * extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY d)), 'FM99990.0') || ' ' ||
                to_char(1000 * extract(epoch FROM percentile_cont(0.95) WITHIN GROUP (ORDER BY d)), 'FM99990.0') || ' ' ||
                to_char(1000 * extract(epoch FROM percentile_cont(0.99) WITHIN GROUP (ORDER BY d)), 'FM99990.0') || ' ' || count(*)"
    read -r S50 S95 S99 SN <<<"$(dst -Atc "$PCT FROM (SELECT p.applied - s.committed AS d
        FROM postgres.lag_probe p JOIN public.lag_src s USING (id)) x")"
    read -r N50 N95 N99 NN <<<"$(nat -Atc "$PCT FROM (SELECT p.applied - s.committed AS d
        FROM lag_probe p JOIN lag_src s USING (id)) x")"
    S_RSS=$(proc_kb "$SPID" VmRSS); S_HWM=$(proc_kb "$SPID" VmHWM)
    N_RSS=$(proc_kb "$NPID" VmRSS); N_HWM=$(proc_kb "$NPID" VmHWM)
    LAG_LINES+=("$(printf "%-8s %9s %9s %9s %8s %10s %10s %10s" synchdb "$S50" "$S95" "$S99" "$SN" \
        "$(echo "100 * $S_CPU / $WALL" | bc)%" "$((S_RSS / 1024))MB" "$((S_HWM / 1024))MB")")
    LAG_LINES+=("$(printf "%-8s %9s %9s %9s %8s %10s %10s %10s" native "$N50" "$N95" "$N99" "$NN" \
        "$(echo "100 * $N_CPU / $WALL" | bc)%" "$((N_RSS / 1024))MB" "$((N_HWM / 1024))MB")")
fi

# --- (d) one large transaction (streaming of in-progress transactions) ---
# BIG_ROWS (default 2000000; e.g. BIG_ROWS=10000000) rows inserted by one
# source transaction; time from its start until the replica shows it, for
# synchdb (pgoutput streaming, spooled, see README "Large transactions") and
# for native with `streaming = on`, each alone; and the synchdb worker's
# peak resident memory (VmHWM, which counts the shared buffers it touched).
# BIG_ROWS=0 skips it. BIG_DECODING_MEM sets the source's
# logical_decoding_work_mem first (default: left at 64MB; a 2M-row
# transaction exceeds it and is streamed).
BIG_ROWS=${BIG_ROWS:-2000000}
BIG_DECODING_MEM=${BIG_DECODING_MEM:-}
BIG_LINE=""
big_transaction() {
    local t hwm spid s n
    echo "== (d) one large transaction of $BIG_ROWS rows"
    if [ -n "$BIG_DECODING_MEM" ]; then
        src -c "ALTER SYSTEM SET logical_decoding_work_mem = '$BIG_DECODING_MEM'" -c "SELECT pg_reload_conf()" >/dev/null
    fi
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
    echo "   transactions streamed by the source, per slot: $(src -Atc "SELECT string_agg(slot_name || ' ' || stream_txns, ', ' ORDER BY slot_name)
        FROM pg_stat_replication_slots WHERE slot_name NOT LIKE 'pg_%'")"
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
[ "$SMALL_TABLES" -gt 0 ] && printf "%-10s %12.2f %12.2f %8.2f   (%d tables of 1000 rows)\n" "small" "$SMALL_SYNCHDB" "$SMALL_NATIVE" "$(echo "$SMALL_SYNCHDB / $SMALL_NATIVE" | bc -l)" "$SMALL_TABLES"
printf "%-10s %12.2f %12.2f %8.2f\n" catch-up "$CATCH_SYNCHDB" "$CATCH_NATIVE" "$(echo "$CATCH_SYNCHDB / $CATCH_NATIVE" | bc -l)"
if [ "${#LAG_LINES[@]}" -gt 0 ]; then
    echo
    echo "lag at ${RATE} tps for ${LAG_SECONDS}s (ms, source commit to the row written in the destination), apply process CPU and memory"
    printf "%-8s %9s %9s %9s %8s %10s %10s %10s\n" "" p50 p95 p99 txs cpu rss peak_rss
    printf "%s\n" "${LAG_LINES[@]}"
fi
# --- (d) large transaction line ---
if [ -n "$BIG_LINE" ]; then
    echo
    printf "%-10s %12s %12s %8s\n" "" "synchdb(s)" "native(s)" "ratio"
    echo "$BIG_LINE"
fi
