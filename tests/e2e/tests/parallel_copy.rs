//! Parallel copy of a large table end to end (`synchdb.snapshot_parallelism`):
//! the table's pages are copied in ctid ranges by the connector's worker
//! and copy workers under one exported snapshot, while the source keeps
//! changing it; the replica equals the source afterwards, also when a copy
//! worker is killed in the middle of its range.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use synchdb_e2e::*;

/// A table above the parallel-copy threshold (64 MB): rows of ~560 bytes.
fn big_table(pair: &Pair, rows: i64) {
    pair.src.execute(&format!(
        "CREATE TABLE public.big (id int PRIMARY KEY, pad text NOT NULL, n bigint);
         ALTER TABLE public.big ALTER COLUMN pad SET STORAGE PLAIN;
         INSERT INTO public.big SELECT g, repeat(md5(g::text), 17), g * 7
           FROM generate_series(1, {rows}) g;"
    ));
}

fn digest(c: &Cluster, table: &str) -> Option<String> {
    c.query_one_string(&format!(
        "SELECT count(*) || '/' || md5(string_agg(id || ':' || pad || ':' || coalesce(n, -1), ',' ORDER BY id)) FROM {table}"
    ))
}

fn big_ready(pair: &Pair, name: &str) -> bool {
    pair.dst.count(&format!(
        "SELECT count(*) FROM synchdb_table_state WHERE name = '{name}' AND src_table = 'big' AND state = 'ready'"
    )) == 1
}

/// Changes to `big` from another session until told to stop: updates of
/// rows all over the table, inserts past its end and deletes.
fn writer(pair: &Pair, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let url = format!(
        "host=127.0.0.1 port={} user=myuser password=mypass dbname=postgres",
        pair.src.port()
    );
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("writer connects");
        let mut i: i64 = 0;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            let id = (i * 7919) % 200_000 + 1;
            c.batch_execute(&format!(
                "UPDATE public.big SET n = n + 1 WHERE id = {id};
                 INSERT INTO public.big VALUES ({}, 'new', {i});
                 DELETE FROM public.big WHERE id = {};",
                1_000_000 + i,
                (i * 104_729) % 200_000 + 1
            ))
            .expect("writer statement");
        }
    })
}

#[test]
fn large_table_copied_in_ranges_under_writes_equals_source() {
    let pair = Pair::new();
    big_table(&pair, 150_000);
    pair.dst
        .execute("ALTER SYSTEM SET synchdb.snapshot_parallelism = 3");
    pair.dst.execute("SELECT pg_reload_conf()");
    pair.add_connector("pc");
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(&pair, stop.clone());
    pair.start("pc", "initial");
    wait_until(LONG, "big copied", || big_ready(&pair, "pc"));
    stop.store(true, Ordering::SeqCst);
    w.join().expect("writer");
    pair.wait_caught_up("pc");
    assert_eq!(
        digest(&pair.dst, "postgres.big"),
        digest(&pair.src, "public.big")
    );
    let log = pair.dst.log_contents();
    let by_workers = log
        .lines()
        .filter(|l| l.contains("\": copy range ") && l.contains(" copied "))
        .count();
    assert!(by_workers >= 2, "copy workers copied {by_workers} ranges");
    // The ranges are forgotten once the table is ready; its key is there.
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM synchdb_copy_range WHERE name = 'pc'"),
        0
    );
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM pg_catalog.pg_constraint WHERE conrelid = 'postgres.big'::regclass AND contype = 'p'"
        ),
        1
    );
    // And the table streams like any other.
    pair.src
        .execute("UPDATE public.big SET pad = 'after' WHERE id <= 10");
    pair.wait_caught_up("pc");
    assert_eq!(
        digest(&pair.dst, "postgres.big"),
        digest(&pair.src, "public.big")
    );
}

#[test]
fn a_killed_copy_worker_has_its_range_copied_again() {
    let pair = Pair::new();
    big_table(&pair, 200_000);
    pair.dst
        .execute("ALTER SYSTEM SET synchdb.snapshot_parallelism = 3");
    pair.dst.execute("SELECT pg_reload_conf()");
    pair.add_connector("pk");
    pair.start("pk", "initial");
    // Kill the first copy worker seen.
    let mut killed = 0;
    wait_until(LONG, "a copy worker to kill, or the copy to end", || {
        killed += pair.dst.count(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE backend_type = 'synchdb copy' LIMIT 1) k",
        );
        killed > 0 || big_ready(&pair, "pk")
    });
    assert!(
        killed > 0,
        "the copy ended before a copy worker could be killed"
    );
    wait_until(LONG, "big copied", || big_ready(&pair, "pk"));
    pair.wait_caught_up("pk");
    assert_eq!(
        digest(&pair.dst, "postgres.big"),
        digest(&pair.src, "public.big")
    );
    assert!(pair.dst.log_contents().contains("is copied again"));
}
