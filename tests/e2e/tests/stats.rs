//! Statistics and progress end to end: SynchDB's views (`synchdb_genstats`,
//! `synchdb_snapstats`, `synchdb_cdcstats`) with its column names and types,
//! known counts in each, the counts surviving a restart of the destination
//! cluster, a reset that survives one too; and the live progress of a copy
//! of 3 million rows (`synchdb_snapshot_progress`, `_total`) watched while
//! it runs.

use std::time::{Duration, Instant};
use synchdb_e2e::*;

fn wait_ready_tables(pair: &Pair, name: &str, n: i64) {
    wait_until(LONG, "snapshot finished", || {
        pair.dst.count(&format!(
            "SELECT count(*) FROM synchdb_table_state WHERE name = '{name}' AND state = 'ready'"
        )) == n
    });
}

/// `name type` of every column of a view, in order.
fn columns(c: &Cluster, view: &str) -> String {
    c.query_one_string(&format!(
        "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum)
           FROM pg_attribute WHERE attrelid = '{view}'::regclass AND attnum > 0"
    ))
    .unwrap_or_default()
}

fn row(c: &Cluster, sql: &str) -> Vec<String> {
    c.query_strings(sql)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("a row from {sql}"))
        .into_iter()
        .map(|v| v.unwrap_or_else(|| "NULL".into()))
        .collect()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

const CDC: &str = "SELECT ddls, dmls, creates, updates, deletes, txs, truncates
                     FROM synchdb_cdcstats WHERE name = 'st'";
const SNAP: &str = "SELECT tables, rows FROM synchdb_snapstats WHERE name = 'st'";
const GEN: &str = "SELECT bad_events, total_events FROM synchdb_genstats WHERE name = 'st'";

/// Waits until `sql` returns `want` (the counters are published after
/// each commit, the statistics of a restarted server once it is up).
fn wait_row(c: &Cluster, sql: &str, want: &[&str]) {
    let want = strs(want);
    let start = Instant::now();
    let mut last = row(c, sql);
    while last != want && start.elapsed() < LONG {
        std::thread::sleep(Duration::from_millis(100));
        last = row(c, sql);
    }
    assert_eq!(last, want, "{sql}");
}

#[test]
fn synchdb_statistics_views_survive_restart_and_reset() {
    let mut pair = Pair::new();
    // SynchDB's column names and types, in its order.
    assert_eq!(
        columns(&pair.dst, "synchdb_genstats"),
        "name text, bad_events bigint, total_events bigint, batches_done bigint, average_batch_size bigint, first_src_ts bigint, first_pg_ts bigint, last_src_ts bigint, last_pg_ts bigint"
    );
    assert_eq!(
        columns(&pair.dst, "synchdb_snapstats"),
        "name text, tables bigint, rows bigint, snapshot_begin_ts bigint, snapshot_end_ts bigint"
    );
    assert_eq!(
        columns(&pair.dst, "synchdb_cdcstats"),
        "name text, ddls bigint, dmls bigint, creates bigint, updates bigint, deletes bigint, txs bigint, truncates bigint"
    );
    pair.add_connector("st");
    // A connector that never ran: zeros, not NULLs (as SynchDB shows them).
    assert_eq!(row(&pair.dst, CDC), strs(&["0"; 7]));
    assert_eq!(
        row(
            &pair.dst,
            "SELECT tables, rows, snapshot_begin_ts, snapshot_end_ts FROM synchdb_snapstats WHERE name = 'st'"
        ),
        strs(&["0"; 4])
    );

    let before_ms = pair
        .dst
        .count("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint");
    pair.start("st", "initial");
    wait_ready_tables(&pair, "st", 2);
    // The initial copy: 2 tables, 100 + 10 rows, timestamps in epoch ms.
    wait_row(&pair.dst, SNAP, &["2", "110"]);
    let snap = row(
        &pair.dst,
        &format!(
            "SELECT snapshot_begin_ts >= {before_ms}, snapshot_end_ts >= snapshot_begin_ts,
                    snapshot_end_ts <= (extract(epoch FROM clock_timestamp()) * 1000)::bigint
               FROM synchdb_snapstats WHERE name = 'st'"
        ),
    );
    assert_eq!(snap, strs(&["t", "t", "t"]));

    // N = 5 inserts, M = 3 updates, K = 2 deletes, 1 truncate, a DDL (an
    // added column, seen with the next insert: 1 more insert) in T = 5
    // source transactions. The added column makes orders (104 rows by
    // then) be copied again.
    pair.src.execute(
        "INSERT INTO public.orders (id, customer) SELECT g, 'new' FROM generate_series(1001, 1005) g",
    );
    pair.src
        .execute("UPDATE public.orders SET amount = 1 WHERE id IN (1, 2, 3)");
    pair.src
        .execute("DELETE FROM public.orders WHERE id IN (4, 5)");
    pair.src.execute("TRUNCATE public.customers");
    pair.src
        .execute("ALTER TABLE public.orders ADD COLUMN note text");
    pair.src
        .execute("INSERT INTO public.orders (id, customer, note) VALUES (1006, 'c', 'n')");
    pair.wait_caught_up("st");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    // ddls, dmls (inserts + updates + deletes + truncates), creates,
    // updates, deletes, txs, truncates.
    wait_row(&pair.dst, CDC, &["1", "12", "6", "3", "2", "5", "1"]);
    wait_row(&pair.dst, SNAP, &["3", "214"]);
    wait_row(&pair.dst, GEN, &["0", "13"]);
    // The same counts as synchdb_stats_view (unchanged beside them).
    assert_eq!(
        row(
            &pair.dst,
            "SELECT ddls, dmls, inserts, updates, deletes, transactions, truncates
               FROM synchdb_stats_view WHERE name = 'st'"
        ),
        strs(&["1", "12", "6", "3", "2", "5", "1"])
    );
    // Batches (local commits) hold one or more source transactions; the
    // average is total_events / batches_done; times are epoch ms, the
    // source's no later than the apply's.
    let gen = row(
        &pair.dst,
        &format!(
            "SELECT batches_done BETWEEN 1 AND 5,
                    average_batch_size = total_events / batches_done,
                    first_src_ts >= {before_ms}, first_pg_ts >= {before_ms},
                    last_src_ts >= first_src_ts, last_pg_ts >= first_pg_ts,
                    last_pg_ts >= last_src_ts - 60000,
                    last_pg_ts <= (extract(epoch FROM clock_timestamp()) * 1000)::bigint
               FROM synchdb_genstats WHERE name = 'st'"
        ),
    );
    assert_eq!(gen, strs(&["t"; 8]));
    let all = "SELECT g.*, s.tables, s.rows, s.snapshot_begin_ts, s.snapshot_end_ts,
                      c.ddls, c.dmls, c.creates, c.updates, c.deletes, c.txs, c.truncates
                 FROM synchdb_genstats g JOIN synchdb_snapstats s USING (name)
                 JOIN synchdb_cdcstats c USING (name) WHERE name = 'st'";
    let before = row(&pair.dst, all);
    // SynchDB's function, read with a column definition list.
    assert_eq!(
        pair.dst.count(
            "SELECT creates FROM synchdb_get_stats() AS (name text, ddls bigint, dmls bigint,
                    creates bigint, updates bigint, deletes bigint, txs bigint, truncates bigint,
                    bad_events bigint, total_events bigint, batches_done bigint,
                    average_batch_size bigint, first_src_ts bigint, first_pg_ts bigint,
                    last_src_ts bigint, last_pg_ts bigint, tables bigint, rows bigint,
                    snapshot_begin_ts bigint, snapshot_end_ts bigint) WHERE name = 'st'"
        ),
        6
    );

    // A restart of the destination cluster keeps every count and time.
    pair.dst.restart();
    assert_eq!(row(&pair.dst, all), before);
    // The connector comes back (it was active) and counts on from there.
    wait_until(LONG, "the connector running again", || {
        pair.state("st").is_some_and(|s| s.pid > 0)
    });
    assert_eq!(row(&pair.dst, all), before);
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (1007, 'after restart')");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    wait_row(&pair.dst, CDC, &["1", "13", "7", "3", "2", "6", "1"]);
    // A crash (immediate stop) keeps what was saved before it: the worker
    // saves its counts every few seconds while it runs.
    wait_until(LONG, "the counts saved", || {
        pair.dst
            .count("SELECT inserts FROM synchdb_stats WHERE name = 'st'")
            == 7
    });
    // Durable on disk before the crash (the worker commits asynchronously).
    pair.dst.execute("CHECKPOINT");
    pair.dst.stop_immediate();
    pair.dst.start();
    wait_row(&pair.dst, CDC, &["1", "13", "7", "3", "2", "6", "1"]);

    // A reset zeroes every view, and stays reset across a restart.
    pair.dst.execute("SELECT synchdb_reset_stats('st')");
    let zero_all = "SELECT total_events, batches_done, first_src_ts, first_pg_ts, last_src_ts,
                           last_pg_ts, tables, rows, snapshot_begin_ts, snapshot_end_ts,
                           ddls, dmls, txs
                      FROM synchdb_genstats JOIN synchdb_snapstats USING (name)
                      JOIN synchdb_cdcstats USING (name) WHERE name = 'st'";
    assert_eq!(row(&pair.dst, zero_all), strs(&["0"; 13]));
    pair.dst.restart();
    assert_eq!(row(&pair.dst, zero_all), strs(&["0"; 13]));
    wait_until(LONG, "the connector running again", || {
        pair.state("st").is_some_and(|s| s.pid > 0)
    });
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (1008, 'after reset')");
    wait_row(&pair.dst, CDC, &["0", "1", "1", "0", "0", "1", "0"]);
    assert_eq!(
        sqlstate(pair.dst.try_execute("SELECT synchdb_reset_stats('nope')")),
        "42704"
    );
}

const ROWS: i64 = 3_000_000;

#[test]
fn snapshot_progress_is_live_per_table_and_in_total() {
    let pair = Pair::new();
    pair.src.execute(&format!(
        "CREATE TABLE public.big (id bigint PRIMARY KEY, payload text);
         INSERT INTO public.big SELECT g, 'row ' || g FROM generate_series(1, {ROWS}) g;"
    ));
    pair.add_connector_with("pg", "public.big", "null");
    // Nothing copied yet: no rows.
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM synchdb_snapshot_progress"),
        0
    );
    pair.start("pg", "initial");

    // Watch the copy: rows_copied of a table still copying must grow.
    let client_sql = "SELECT state, rows_copied, rows_estimated, bytes_copied, bytes_estimated,
                             rows_per_sec, eta IS NOT NULL, percent_done
                        FROM synchdb_snapshot_progress WHERE name = 'pg' AND src_table = 'big'";
    let mut samples: Vec<i64> = Vec::new();
    let mut estimates: Option<(i64, i64)> = None;
    let mut saw_rate_and_eta = false;
    let start = Instant::now();
    let mut c = pair.dst.client();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "copy did not finish; samples {samples:?}"
        );
        let rows = c.query(client_sql, &[]).expect("progress query");
        if let Some(r) = rows.first() {
            let state: String = r.get(0);
            if state == "done" {
                break;
            }
            if state == "copying" {
                let n: i64 = r.get(1);
                if n > 0 && samples.last() != Some(&n) {
                    samples.push(n);
                }
                estimates = Some((r.get(2), r.get(4)));
                let rate: i64 = r.get(5);
                let eta: bool = r.get(6);
                if n > 0 && rate > 0 && eta {
                    saw_rate_and_eta = true;
                }
                let bytes: i64 = r.get(3);
                assert!(bytes >= n, "bytes {bytes} for {n} rows");
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        samples.len() >= 3,
        "at least 3 growing samples while copying: {samples:?}"
    );
    assert!(
        samples.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing: {samples:?}"
    );
    assert!(samples.iter().all(|n| *n <= ROWS), "{samples:?}");
    assert!(saw_rate_and_eta, "a rate and an ETA while copying");
    // Estimates read on the source when the copy started (never analyzed:
    // from its size and row width), in the right order of magnitude.
    let (rows_est, bytes_est) = estimates.expect("estimates while copying");
    assert!(
        rows_est > ROWS / 3 && rows_est < ROWS * 3,
        "rows estimate {rows_est}"
    );
    assert!(bytes_est > 10_000_000, "bytes estimate {bytes_est}");

    // Done: the exact count, as on the source and in the destination.
    let src_count = pair.src.count("SELECT count(*) FROM public.big");
    assert_eq!(src_count, ROWS);
    let done = pair.dst.query_strings(
        "SELECT state, rows_copied, percent_done, eta, finished_at >= started_at
           FROM synchdb_snapshot_progress WHERE name = 'pg' AND src_table = 'big'",
    );
    assert_eq!(
        done[0],
        vec![
            Some("done".to_string()),
            Some(ROWS.to_string()),
            Some("100.0".to_string()),
            Some("00:00:00".to_string()),
            Some("t".to_string())
        ]
    );
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.big"), ROWS);
    wait_until(LONG, "the total done", || {
        pair.dst.count(
            "SELECT count(*) FROM synchdb_snapshot_progress_total
              WHERE name = 'pg' AND state = 'done' AND tables_total = 1 AND tables_done = 1
                AND tables_pending = 0 AND tables_copying = 0",
        ) == 1
    });
    let total = pair.dst.query_strings(
        "SELECT rows_copied, rows_estimated > 0, bytes_copied > 0, percent_done
           FROM synchdb_snapshot_progress_total WHERE name = 'pg'",
    );
    assert_eq!(
        total[0],
        vec![
            Some(ROWS.to_string()),
            Some("t".to_string()),
            Some("t".to_string()),
            Some("100.0".to_string())
        ]
    );
    // The snapshot statistics agree.
    wait_until(LONG, "snapstats", || {
        pair.dst
            .count("SELECT rows FROM synchdb_snapstats WHERE name = 'pg'")
            == ROWS
    });
}
