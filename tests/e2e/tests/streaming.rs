//! Large transactions streamed while in progress (sources from PostgreSQL
//! 14 on, pgoutput protocol 2 with `streaming 'on'`): the source runs with
//! `logical_decoding_work_mem = 64kB`, so every transaction beyond a few
//! hundred rows is streamed in blocks and spooled by the connector until it
//! commits. A large transaction lands exactly; two interleaved streamed
//! transactions, one rolled back; subtransactions rolled back inside a
//! streamed one; the worker terminated while a transaction is spooled and
//! while its commit is applied, and killed with `kill -9` while spooling
//! (stale files removed at start); the skip strategy skips exactly the
//! failing change of a streamed transaction; sources 14, 16, 17 and 18 stream too
//! (`SYNCHDB_VERSIONS` selects majors); a PostgreSQL 13 source keeps
//! protocol 1.

use std::time::Duration;
use synchdb_e2e::*;

const SLOW: Duration = Duration::from_secs(240);

fn streaming_pair() -> Pair {
    let src = Cluster::new(Kind::Source, &[("logical_decoding_work_mem", "'64kB'")]);
    Pair::with_clusters(src, Cluster::destination())
}

fn wait_ready_tables(pair: &Pair, name: &str, n: i64) {
    wait_until(LONG, "snapshot finished", || {
        pair.dst.count(&format!(
            "SELECT count(*) FROM synchdb_table_state WHERE name = '{name}' AND state = 'ready'"
        )) == n
    });
}

fn running_pid(pair: &Pair, name: &str) -> i32 {
    wait_for_value(LONG, "a running worker", || {
        pair.state(name).filter(|s| s.pid > 0).map(|s| s.pid)
    })
}

/// Row count and a digest of every row, in key order.
fn digest(c: &Cluster, table: &str, order_by: &str) -> Option<String> {
    c.try_query_strings(&format!(
        "SELECT count(*) || ' ' || coalesce(md5(string_agg(t::text, ',' ORDER BY {order_by})), '')
           FROM {table} t"
    ))
    .ok()
    .and_then(|r| r.into_iter().next())
    .and_then(|r| r.into_iter().next().flatten())
}

fn wait_same(pair: &Pair, src_table: &str, dst_table: &str, order_by: &str) {
    let want = digest(&pair.src, src_table, order_by);
    assert!(want.is_some(), "{src_table} on the source");
    let start = std::time::Instant::now();
    while digest(&pair.dst, dst_table, order_by) != want {
        if start.elapsed() > SLOW {
            pair.assert_tables_equal(src_table, dst_table, order_by);
            panic!("{dst_table} did not catch up");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Transactions the connector's slot streamed (pg_stat_replication_slots).
fn streamed_txns(pair: &Pair, name: &str) -> i64 {
    pair.src.count(&format!(
        "SELECT coalesce(sum(stream_txns), 0)::bigint FROM pg_stat_replication_slots
          WHERE slot_name = '{}'",
        pair.slot_name(name)
    ))
}

/// Files in the connector's spool directory.
fn spooled_files(pair: &Pair, name: &str) -> i64 {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    pair.dst.count(&format!(
        "SELECT count(*) FROM pg_ls_dir(format('pg_synchdb/spool/%s_{hex}',
           (SELECT oid FROM pg_database WHERE datname = current_database())), true, false)"
    ))
}

fn start_streaming(pair: &Pair, name: &str, ddl: &str, tables: i64) {
    pair.src.execute(ddl);
    pair.add_connector(name);
    pair.start(name, "initial");
    wait_ready_tables(pair, name, tables);
    pair.wait_caught_up(name);
}

#[test]
fn large_transaction_streams_and_lands_exactly() {
    let pair = streaming_pair();
    start_streaming(
        &pair,
        "lt",
        "CREATE TABLE public.big (id int PRIMARY KEY, v text NOT NULL, n int NOT NULL)",
        3,
    );
    let before = streamed_txns(&pair, "lt");
    pair.src.execute(
        "BEGIN;
         INSERT INTO public.big SELECT g, md5(g::text), 0 FROM generate_series(1, 300000) g;
         UPDATE public.big SET n = n + 1, v = v || '!' WHERE id % 3 = 0;
         DELETE FROM public.big WHERE id % 10 = 0;
         INSERT INTO public.orders (id, customer) VALUES (1000, 'in the big one');
         COMMIT;",
    );
    wait_same(&pair, "public.big", "postgres.big", "id");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    assert!(
        streamed_txns(&pair, "lt") > before,
        "the source streamed the transaction"
    );
    // Small transactions after it still flow, and the spool is empty.
    pair.src
        .execute("UPDATE public.big SET n = 42 WHERE id = 7; DELETE FROM public.big WHERE id = 8");
    wait_same(&pair, "public.big", "postgres.big", "id");
    assert_eq!(spooled_files(&pair, "lt"), 0);
    assert_eq!(pair.state("lt").map(|s| s.err), Some("no error".into()));
}

#[test]
fn interleaved_streamed_transactions_one_rolled_back() {
    let pair = streaming_pair();
    start_streaming(
        &pair,
        "il",
        "CREATE TABLE public.il (id int PRIMARY KEY, who text NOT NULL)",
        3,
    );
    let before = streamed_txns(&pair, "il");
    let mut a = pair.src.client();
    let mut b = pair.src.client();
    a.batch_execute("BEGIN").expect("begin a");
    b.batch_execute("BEGIN").expect("begin b");
    for round in 0..8 {
        let base = round * 20000;
        a.batch_execute(&format!(
            "INSERT INTO public.il SELECT g, 'a' FROM generate_series({}, {}) g",
            base + 1,
            base + 10000
        ))
        .expect("a writes");
        b.batch_execute(&format!(
            "INSERT INTO public.il SELECT g, 'b' FROM generate_series({}, {}) g",
            base + 10001,
            base + 20000
        ))
        .expect("b writes");
    }
    // Both were streamed in part before either ended.
    wait_until(LONG, "both transactions streamed", || {
        streamed_txns(&pair, "il") >= before + 2 || spooled_files(&pair, "il") >= 2
    });
    b.batch_execute("ROLLBACK").expect("rollback b");
    a.batch_execute("UPDATE public.il SET who = 'a2' WHERE id % 4 = 1; COMMIT")
        .expect("commit a");
    wait_same(&pair, "public.il", "postgres.il", "id");
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.il"), 80000);
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.il WHERE who = 'b'"),
        0
    );
    pair.wait_caught_up("il");
    assert_eq!(spooled_files(&pair, "il"), 0);
}

#[test]
fn rolled_back_subtransactions_inside_a_streamed_one() {
    let pair = streaming_pair();
    start_streaming(
        &pair,
        "sx",
        "CREATE TABLE public.sx (id int PRIMARY KEY, what text NOT NULL)",
        3,
    );
    pair.src.execute(
        "BEGIN;
         INSERT INTO public.sx SELECT g, 'top' FROM generate_series(1, 30000) g;
         SAVEPOINT s1;
         INSERT INTO public.sx SELECT g, 's1 gone' FROM generate_series(30001, 60000) g;
         SAVEPOINT s2;
         INSERT INTO public.sx SELECT g, 's2 gone' FROM generate_series(60001, 90000) g;
         UPDATE public.sx SET what = 'top changed in s2, gone' WHERE id <= 100;
         ROLLBACK TO SAVEPOINT s1;
         INSERT INTO public.sx SELECT g, 'after s1' FROM generate_series(90001, 120000) g;
         SAVEPOINT s3;
         UPDATE public.sx SET what = 'kept by s3' WHERE id % 5 = 0;
         RELEASE SAVEPOINT s3;
         SAVEPOINT s4;
         DELETE FROM public.sx WHERE id % 2 = 0;
         ROLLBACK TO SAVEPOINT s4;
         INSERT INTO public.sx SELECT g, 'last' FROM generate_series(120001, 125000) g;
         COMMIT;",
    );
    wait_same(&pair, "public.sx", "postgres.sx", "id");
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.sx"), 65000);
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.sx WHERE what LIKE '%gone%'"),
        0
    );
    assert!(streamed_txns(&pair, "sx") > 0, "the source streamed it");
}

fn terminate(pair: &Pair, name: &str) {
    let pid = running_pid(pair, name);
    pair.dst.execute(&format!(
        "SELECT pg_terminate_backend(pid) FROM synchdb_state_view WHERE name = '{name}' AND pid = {pid}"
    ));
    wait_until(LONG, "the worker gone", || {
        pair.dst.count(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
        )) == 0
    });
}

#[test]
fn worker_terminated_while_spooling_and_while_applying() {
    let pair = streaming_pair();
    // No key: a row applied twice would show.
    start_streaming(
        &pair,
        "tk",
        "CREATE TABLE public.nokey (id int NOT NULL, v text NOT NULL);
         ALTER TABLE public.nokey REPLICA IDENTITY FULL;",
        3,
    );
    // 1. Terminated while the transaction is being spooled.
    let mut c = pair.src.client();
    c.batch_execute(
        "BEGIN; INSERT INTO public.nokey SELECT g, md5(g::text) FROM generate_series(1, 100000) g",
    )
    .expect("first half");
    wait_until(LONG, "the transaction spooled", || {
        spooled_files(&pair, "tk") > 0
    });
    terminate(&pair, "tk");
    c.batch_execute(
        "INSERT INTO public.nokey SELECT g, 'second' FROM generate_series(100001, 150000) g; COMMIT",
    )
    .expect("second half");
    pair.start("tk", "initial");
    wait_same(&pair, "public.nokey", "postgres.nokey", "id, v");
    assert_eq!(spooled_files(&pair, "tk"), 0);

    // 2. Terminated while the committed streamed transaction is applied.
    pair.src.execute(
        "INSERT INTO public.nokey SELECT g, repeat('y', 50) FROM generate_series(200001, 600000) g",
    );
    wait_until(SLOW, "the transaction being applied", || {
        pair.state("tk").is_some_and(|s| s.state == "executing")
            && pair.dst.count("SELECT count(*) FROM postgres.nokey") == 150000
    });
    terminate(&pair, "tk");
    // All of it or (interrupted) nothing of it.
    let n = pair.dst.count("SELECT count(*) FROM postgres.nokey");
    assert!(n == 150000 || n == 550000, "{n} rows after the stop");
    eprintln!("{n} rows right after the stop (150000: the apply was interrupted)");
    pair.start("tk", "initial");
    wait_same(&pair, "public.nokey", "postgres.nokey", "id, v");
    assert_eq!(
        pair.dst.count("SELECT count(*) FROM postgres.nokey"),
        550000
    );
    pair.wait_caught_up("tk");
    assert_eq!(spooled_files(&pair, "tk"), 0);

    // 3. Killed (kill -9: nothing cleans up) while spooling: what it left
    // behind goes when it starts again, and the transaction, sent again
    // from its start, lands once.
    c.batch_execute(
        "BEGIN; INSERT INTO public.nokey SELECT g, 'third' FROM generate_series(700001, 800000) g",
    )
    .expect("third, first half");
    wait_until(LONG, "the transaction spooled", || {
        spooled_files(&pair, "tk") > 0
    });
    // A stale file of a transaction the source will not send again.
    pair.dst.execute(&format!(
        "COPY (SELECT 'stale') TO '{}'",
        spool_path(&pair, "tk", "4242.changes")
    ));
    let pid = running_pid(&pair, "tk");
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    // The destination restarts after the crash and the launcher brings the
    // connector back.
    wait_until(LONG, "a new worker", || {
        pair.state("tk").is_some_and(|s| s.pid > 0 && s.pid != pid)
    });
    c.batch_execute(
        "INSERT INTO public.nokey SELECT g, 'third' FROM generate_series(800001, 850000) g; COMMIT",
    )
    .expect("third, second half");
    wait_same(&pair, "public.nokey", "postgres.nokey", "id, v");
    assert_eq!(
        pair.dst.count("SELECT count(*) FROM postgres.nokey"),
        700000
    );
    pair.wait_caught_up("tk");
    assert_eq!(spooled_files(&pair, "tk"), 0, "the stale file is gone");
}

/// The absolute path of a file in the connector's spool directory.
fn spool_path(pair: &Pair, name: &str, file: &str) -> String {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    pair.dst
        .query_one_string(&format!(
            "SELECT format('%s/pg_synchdb/spool/%s_{hex}/{file}', current_setting('data_directory'),
               (SELECT oid FROM pg_database WHERE datname = current_database()))"
        ))
        .unwrap_or_default()
}

#[test]
fn source_13_keeps_protocol_1() {
    if !version_selected(13) {
        eprintln!("PostgreSQL 13 skipped (SYNCHDB_VERSIONS)");
        return;
    }
    let pair = Pair::with_clusters(Cluster::source_version(13), Cluster::destination());
    pair.src
        .execute("ALTER SYSTEM SET logical_decoding_work_mem = '64kB'");
    pair.src.execute("SELECT pg_reload_conf()");
    start_streaming(
        &pair,
        "v13",
        "CREATE TABLE public.big (id int PRIMARY KEY, v text NOT NULL)",
        3,
    );
    pair.src.execute(
        "BEGIN;
         INSERT INTO public.big SELECT g, md5(g::text) FROM generate_series(1, 100000) g;
         SAVEPOINT s; DELETE FROM public.big WHERE id % 2 = 0; ROLLBACK TO SAVEPOINT s;
         UPDATE public.big SET v = 'u' WHERE id % 7 = 0;
         COMMIT;",
    );
    wait_same(&pair, "public.big", "postgres.big", "id");
    assert_eq!(pair.state("v13").map(|s| s.err), Some("no error".into()));
    assert_eq!(spooled_files(&pair, "v13"), 0);
}

#[test]
fn skip_strategy_skips_exactly_the_failing_change_of_a_streamed_transaction() {
    let pair = streaming_pair();
    start_streaming(
        &pair,
        "sk",
        "CREATE TABLE public.big (id int PRIMARY KEY, v text NOT NULL)",
        3,
    );
    pair.dst
        .execute("ALTER SYSTEM SET synchdb.error_handling_strategy = 'skip'");
    pair.dst.execute("SELECT pg_reload_conf()");
    wait_until(LONG, "the table on the destination", || {
        pair.dst.count(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'postgres' AND tablename = 'big'",
        ) == 1
    });
    pair.dst
        .execute("INSERT INTO postgres.big VALUES (30001, 'destination only')");
    // The failing change comes after a rolled-back savepoint: the index of
    // the change to skip counts what the destination applies, as in an
    // ordinary transaction.
    pair.src.execute(
        "BEGIN;
         INSERT INTO public.big SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
         SAVEPOINT s;
         INSERT INTO public.big SELECT g, 'gone' FROM generate_series(70001, 80000) g;
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO public.big SELECT g, md5(g::text) FROM generate_series(20001, 60000) g;
         UPDATE public.big SET v = 'u' WHERE id % 5 = 0;
         COMMIT;",
    );
    wait_same(
        &pair,
        "(SELECT * FROM public.big WHERE id <> 30001)",
        "(SELECT * FROM postgres.big WHERE id <> 30001)",
        "id",
    );
    assert_eq!(
        pair.dst
            .query_one_string("SELECT v FROM postgres.big WHERE id = 30001")
            .as_deref(),
        Some("destination only")
    );
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.big"), 60000);
    assert!(pair.dst.log_contents().contains("skipped INSERT"));
    assert!(streamed_txns(&pair, "sk") > 0, "the source streamed it");
}

/// A streamed transaction with a rolled-back savepoint from a source of
/// `major` (protocol 2 with `streaming 'on'` from 14 on).
fn streams_from(major: u32) {
    if !version_selected(major) {
        eprintln!("PostgreSQL {major} skipped (SYNCHDB_VERSIONS)");
        return;
    }
    let pair = Pair::with_clusters(Cluster::source_version(major), Cluster::destination());
    pair.src
        .execute("ALTER SYSTEM SET logical_decoding_work_mem = '64kB'");
    pair.src.execute("SELECT pg_reload_conf()");
    let name = format!("v{major}");
    start_streaming(
        &pair,
        &name,
        "CREATE TABLE public.big (id int PRIMARY KEY, v text NOT NULL)",
        3,
    );
    pair.src.execute(
        "BEGIN;
         INSERT INTO public.big SELECT g, md5(g::text) FROM generate_series(1, 60000) g;
         SAVEPOINT s;
         INSERT INTO public.big SELECT g, 'gone' FROM generate_series(60001, 90000) g;
         ROLLBACK TO SAVEPOINT s;
         UPDATE public.big SET v = 'u' WHERE id % 7 = 0;
         COMMIT;",
    );
    wait_same(&pair, "public.big", "postgres.big", "id");
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.big"), 60000);
    assert!(streamed_txns(&pair, &name) > 0, "the source streamed it");
    assert_eq!(pair.state(&name).map(|s| s.err), Some("no error".into()));
}

#[test]
fn streams_from_14() {
    streams_from(14);
}

#[test]
fn streams_from_16() {
    streams_from(16);
}

#[test]
fn streams_from_17() {
    streams_from(17);
}

#[test]
fn streams_from_18() {
    streams_from(18);
}
