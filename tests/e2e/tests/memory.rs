//! Memory bounded in bytes: a run of 10 MB rows arriving while a DBA's lock
//! blocks the destination table, and a single 256 MB value, keep the
//! connector worker's private memory within a bound (a few multiples of the
//! largest single row, never the size of the backlog). Prints the figures
//! the README quotes.

use std::time::Duration;
use synchdb_e2e::*;

const NAME: &str = "mem";

fn running_pid(pair: &Pair) -> i32 {
    wait_for_value(LONG, "a running worker", || {
        pair.state(NAME).filter(|s| s.pid > 0).map(|s| s.pid)
    })
}

fn started(pair: &Pair) -> i32 {
    pair.src.execute(
        "CREATE TABLE public.big (id int PRIMARY KEY, payload text NOT NULL);
         ALTER TABLE public.big ALTER COLUMN payload SET STORAGE EXTERNAL;",
    );
    pair.add_connector_with(NAME, "public.big", "null");
    pair.start(NAME, "initial");
    wait_until(LONG, "the snapshot", || {
        pair.dst.count(&format!(
            "SELECT count(*) FROM synchdb_table_state WHERE name = '{NAME}' AND state = 'ready'"
        )) == 1
    });
    running_pid(pair)
}

/// Bytes the source has sent to the connector's walsender so far.
fn sent_lsn(pair: &Pair) -> String {
    pair.src
        .query_one_string(
            "SELECT coalesce(max(sent_lsn)::text, '0/0') FROM pg_stat_replication
              WHERE application_name = 'synchdb'",
        )
        .unwrap_or_default()
}

#[test]
fn c9_backlog_of_large_rows_behind_a_lock_keeps_memory_bounded() {
    let pair = Pair::new();
    let pid = started(&pair);
    let base = rss_anon_kb(pid).unwrap_or(0);
    // A DBA holds the destination table.
    let mut dba = pair.dst.client();
    dba.batch_execute("BEGIN; LOCK TABLE postgres.big IN ACCESS EXCLUSIVE MODE")
        .expect("lock");
    // 40 rows of 10 MB (incompressible), one transaction each: 400 MB.
    let rows = 40;
    pair.src.execute(&format!(
        "DO $$ BEGIN FOR i IN 1..{rows} LOOP
             INSERT INTO public.big
             SELECT i, string_agg(md5(random()::text || g::text), '') FROM generate_series(1, 327680) g;
             COMMIT;
         END LOOP; END $$"
    ));
    // Wait until the source stops sending (the connector stopped reading).
    let mut peak = 0;
    let mut last = String::new();
    let mut stable = 0;
    wait_until(
        Duration::from_secs(120),
        "the source to stop sending",
        || {
            peak = peak.max(rss_anon_kb(pid).unwrap_or(0));
            let now = sent_lsn(&pair);
            if now == last {
                stable += 1;
            } else {
                stable = 0;
                last = now;
            }
            std::thread::sleep(Duration::from_millis(200));
            stable >= 10
        },
    );
    dba.batch_execute("COMMIT").expect("unlock");
    wait_until(Duration::from_secs(180), "every row applied", || {
        peak = peak.max(rss_anon_kb(pid).unwrap_or(0));
        pair.dst.count("SELECT count(*) FROM postgres.big") == rows
    });
    pair.assert_tables_equal("public.big", "postgres.big", "id");
    let grew = peak.saturating_sub(base);
    eprintln!(
        "c9 backlog: {rows} rows x 10 MB behind a lock: worker private memory {base} kB at rest, peak {peak} kB (+{grew} kB)"
    );
    assert_eq!(running_pid(&pair), pid, "the same worker applied it");
    assert!(
        grew < 160 * 1024,
        "the worker grew by {grew} kB while a 400 MB backlog waited"
    );
}

#[test]
fn c9_single_large_value_keeps_memory_bounded() {
    let pair = Pair::new();
    let pid = started(&pair);
    let base = rss_anon_kb(pid).unwrap_or(0);
    // One 256 MB value (incompressible: md5 text).
    pair.src.execute(
        "INSERT INTO public.big
         SELECT 1, string_agg(md5(g::text), '') FROM generate_series(1, 8388608) g",
    );
    let mut peak = 0;
    wait_until(Duration::from_secs(300), "the large value applied", || {
        peak = peak.max(rss_anon_kb(pid).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(20));
        pair.dst.count("SELECT count(*) FROM postgres.big") == 1
    });
    assert_eq!(
        pair.src
            .query_one_string("SELECT md5(payload) FROM public.big WHERE id = 1"),
        pair.dst
            .query_one_string("SELECT md5(payload) FROM postgres.big WHERE id = 1")
    );
    let grew = peak.saturating_sub(base);
    eprintln!(
        "c9 single value: 256 MB: worker private memory {base} kB at rest, peak {peak} kB (+{grew} kB)"
    );
    assert_eq!(running_pid(&pair), pid, "the same worker applied it");
    // Network buffer, decoded text, datum, formed tuple and TOAST
    // compression each hold the value once at the peak: about 6x, never
    // more than 7x.
    assert!(
        grew < 7 * 256 * 1024,
        "the worker grew by {grew} kB for one 256 MB value"
    );
}
