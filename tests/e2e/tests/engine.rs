//! The replication engine end to end: the user documentation's flow, every
//! snapshot mode with its restart semantics, `always` + `snapshottable`,
//! changes made while stopped, kill -9 during streams of small and large
//! transactions, a source restart, and a snapshot taken under write load.

use std::time::Duration;
use synchdb_e2e::*;

fn kill9(pid: i32) {
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
}

fn running_pid(pair: &Pair, name: &str) -> i32 {
    wait_for_value(LONG, "a running worker", || {
        pair.state(name).filter(|s| s.pid > 0).map(|s| s.pid)
    })
}

fn wait_ready_tables(pair: &Pair, name: &str, n: i64) {
    wait_until(LONG, "snapshot finished", || {
        pair.dst.count(&format!(
            "SELECT count(*) FROM synchdb_table_state WHERE name = '{name}' AND state = 'ready'"
        )) == n
    });
}

#[test]
fn documented_flow_initial_then_cdc() {
    let pair = Pair::new();
    // Verbatim from the user documentation, with the source's port.
    pair.dst.execute(&format!(
        "SELECT synchdb_add_conninfo('pgconn','127.0.0.1',{},'myuser','mypass','postgres','public','null','null','postgres');",
        pair.src.port()
    ));
    pair.dst
        .execute("SELECT synchdb_start_engine_bgw('pgconn');");
    wait_ready_tables(&pair, "pgconn", 2);
    let st = pair.state("pgconn").expect("state row");
    assert_eq!(st.stage, "initial snapshot");
    assert_eq!(st.connector_type, "postgres");
    assert_eq!(st.err, "no error");
    // Tables land in a schema named after the source database.
    let tables = pair.dst.query_strings(
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'postgres'",
    );
    assert_eq!(tables[0][0].as_deref(), Some("customers,orders"));
    pair.assert_tables_equal("public.orders", "postgres.orders", "id");
    pair.assert_tables_equal("public.customers", "postgres.customers", "id");
    // Column types, NOT NULL and the primary key are kept.
    let shape = pair.dst.query_one_string(
        "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod) || CASE WHEN attnotnull THEN ' nn' ELSE '' END, ', ' ORDER BY attnum)
           FROM pg_attribute WHERE attrelid = 'postgres.orders'::regclass AND attnum > 0",
    );
    assert_eq!(
        shape.as_deref(),
        Some("id integer nn, customer text nn, amount numeric(10,2), created timestamp with time zone")
    );
    assert_eq!(
        pair.dst.count("SELECT count(*) FROM pg_index WHERE indrelid = 'postgres.orders'::regclass AND indisprimary"),
        1
    );

    // Changes stream; the stage turns to change data capture.
    pair.src.execute(
        "INSERT INTO public.orders (id, customer, amount) VALUES (1001, 'new', 9.99);
         UPDATE public.orders SET amount = 0 WHERE id = 1;
         DELETE FROM public.orders WHERE id = 2;
         UPDATE public.customers SET name = 'renamed' WHERE id = 3;",
    );
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    wait_until(LONG, "change data capture", || {
        pair.state("pgconn")
            .is_some_and(|s| s.stage == "change data capture")
    });
    let st = pair.state("pgconn").expect("state row");
    for key in [
        "\"lsn_proc\":",
        "\"messageType\":",
        "\"lsn_commit\":",
        "\"lsn\":",
        "\"txId\":",
        "\"ts_usec\":",
    ] {
        assert!(
            st.last_dbz_offset.contains(key),
            "{key} in {}",
            st.last_dbz_offset
        );
    }
    // TRUNCATE is applied too.
    pair.src.execute("TRUNCATE public.customers");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
}

#[test]
fn restart_in_initial_resumes_without_resnapshot() {
    let pair = Pair::new();
    pair.add_connector("pgconn");
    pair.start("pgconn", "initial");
    wait_ready_tables(&pair, "pgconn", 2);
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (2000, 'before stop')");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.stop("pgconn");
    wait_until(LONG, "stopped", || {
        pair.state("pgconn").is_some_and(|s| s.pid == -1)
    });

    // A destination-only marker proves no new snapshot is taken.
    pair.dst
        .execute("INSERT INTO postgres.orders (id, customer) VALUES (-1, 'marker')");
    pair.src.execute(
        "INSERT INTO public.orders (id, customer) SELECT g, 'while stopped' FROM generate_series(3000, 3099) g;
         UPDATE public.orders SET customer = 'updated while stopped' WHERE id BETWEEN 10 AND 20;
         DELETE FROM public.orders WHERE id BETWEEN 30 AND 35;",
    );
    pair.start("pgconn", "initial");
    wait_until(LONG, "changes made while stopped", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id >= 3000")
            == 100
            && pair
                .dst
                .count("SELECT count(*) FROM postgres.orders WHERE id BETWEEN 30 AND 35")
                == 0
    });
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = -1"),
        1
    );
    pair.dst
        .execute("DELETE FROM postgres.orders WHERE id = -1");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    assert_eq!(
        pair.state("pgconn").map(|s| s.stage),
        Some("change data capture".into())
    );
}

#[test]
fn initial_only_copies_and_does_not_stream() {
    let pair = Pair::new();
    pair.add_connector("snap");
    pair.start("snap", "initial_only");
    wait_ready_tables(&pair, "snap", 2);
    pair.assert_tables_equal("public.orders", "postgres.orders", "id");
    wait_until(LONG, "idle after the snapshot", || {
        pair.state("snap")
            .is_some_and(|s| s.stage == "initial snapshot" && s.state == "polling" && s.pid > 0)
    });
    // No change data capture at all: neither slot nor publication exists.
    assert_eq!(
        pair.src.count("SELECT count(*) FROM pg_replication_slots"),
        0
    );
    assert_eq!(pair.src.count("SELECT count(*) FROM pg_publication"), 0);

    // Started again in initial_only: tables already built are not rebuilt.
    pair.stop("snap");
    pair.dst
        .execute("INSERT INTO postgres.orders (id, customer) VALUES (-1, 'marker')");
    pair.start("snap", "initial_only");
    wait_until(LONG, "idle again", || {
        pair.state("snap")
            .is_some_and(|s| s.state == "polling" && s.pid > 0)
    });
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = -1"),
        1
    );
}

#[test]
fn no_data_builds_empty_tables_then_streams() {
    let pair = Pair::new();
    pair.add_connector("nd");
    pair.start("nd", "no_data");
    wait_ready_tables(&pair, "nd", 2);
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.orders"), 0);
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (7000, 'streamed')");
    wait_until(LONG, "the streamed row", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = 7000")
            == 1
    });
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.orders"), 1);
    assert_eq!(
        pair.state("nd").map(|s| s.stage),
        Some("change data capture".into())
    );

    // Restart in no_data: schema not rebuilt, CDC resumes.
    pair.stop("nd");
    pair.dst
        .execute("INSERT INTO postgres.orders (id, customer) VALUES (-1, 'marker')");
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (7001, 'while stopped')");
    pair.start("nd", "no_data");
    wait_until(LONG, "the row inserted while stopped", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = 7001")
            == 1
    });
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = -1"),
        1
    );
}

#[test]
fn never_needs_existing_tables() {
    let pair = Pair::new();
    pair.add_connector_with("nv", "public.orders", "null");
    pair.start("nv", "never");
    wait_until(LONG, "streaming", || {
        pair.state("nv")
            .is_some_and(|s| s.stage == "change data capture")
    });
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (8000, 'x')");
    // The destination table does not exist: a clear error naming it.
    let st = wait_for_value(LONG, "an error", || {
        pair.state("nv").filter(|s| s.err != "no error")
    });
    assert!(st.err.contains("orders"), "{}", st.err);
    assert!(st.err.contains("nv"), "{}", st.err);

    // With the table created by hand, the same change is applied on restart.
    pair.dst.execute(
        "CREATE SCHEMA IF NOT EXISTS postgres;
         CREATE TABLE postgres.orders (note text DEFAULT 'local default',
                                       created timestamptz, id int PRIMARY KEY,
                                       customer text NOT NULL, amount numeric(10,2))",
    );
    wait_until(LONG, "stopped after the error", || {
        pair.state("nv").is_some_and(|s| s.pid == -1)
    });
    pair.start("nv", "never");
    wait_until(LONG, "the row", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = 8000")
            == 1
    });
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.orders"), 1);
    // Columns are matched by name whatever their order; a column only the
    // destination has gets its default.
    assert_eq!(
        pair.dst
            .query_one_string("SELECT note || '/' || customer FROM postgres.orders")
            .as_deref(),
        Some("local default/x")
    );
    pair.src
        .execute("UPDATE public.orders SET customer = 'y' WHERE id = 8000");
    wait_until(LONG, "the update", || {
        pair.dst
            .query_one_string("SELECT customer FROM postgres.orders WHERE id = 8000")
            .as_deref()
            == Some("y")
    });
}

#[test]
fn always_with_snapshottable_rebuilds_only_matching_tables() {
    let pair = Pair::new();
    pair.add_connector("alw");
    pair.start("alw", "always");
    wait_ready_tables(&pair, "alw", 2);
    pair.assert_tables_equal("public.customers", "postgres.customers", "id");
    pair.stop("alw");
    wait_until(LONG, "stopped", || {
        pair.state("alw").is_some_and(|s| s.pid == -1)
    });

    pair.dst.execute(
        "INSERT INTO postgres.orders (id, customer) VALUES (-1, 'orders marker');
         INSERT INTO postgres.customers (id, name) VALUES (-1, 'customers marker');",
    );
    pair.src.execute(
        "INSERT INTO public.orders (id, customer) VALUES (9000, 'while stopped');
         INSERT INTO public.customers (name) VALUES ('while stopped');
         UPDATE public.customers SET name = 'changed' WHERE id = 1;",
    );
    pair.dst.execute(
        "UPDATE synchdb_conninfo SET data = jsonb_set(data, '{snapshottable}', '\"public.customers\"') WHERE name = 'alw'",
    );
    pair.start("alw", "always");
    // customers is rebuilt from a new snapshot: the marker is gone.
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    // orders is not re-copied (marker kept) but gets the change by streaming.
    wait_until(LONG, "orders change streamed", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = 9000")
            == 1
    });
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = -1"),
        1
    );
    // Changes after the rebuild reach both, none twice.
    pair.src.execute(
        "INSERT INTO public.customers (name) VALUES ('after'); INSERT INTO public.orders (id, customer) VALUES (9001, 'after');",
    );
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    pair.dst
        .execute("DELETE FROM postgres.orders WHERE id = -1");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
}

#[test]
fn snapshot_under_write_load_is_seamless() {
    let pair = Pair::new();
    pair.src.execute(
        "CREATE TABLE public.busy (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO public.busy SELECT g, 0 FROM generate_series(1, 50000) g;",
    );
    let connect = pair.src.spawn_client();
    let writer = std::thread::spawn(move || {
        let mut c = connect();
        for i in 0..1500 {
            c.batch_execute(&format!(
                "UPDATE public.busy SET v = v + 1 WHERE id = {};
                 INSERT INTO public.busy VALUES ({}, {i});",
                (i * 37) % 50000 + 1,
                100000 + i
            ))
            .expect("write");
        }
    });
    pair.add_connector("load");
    pair.start("load", "initial");
    writer.join().expect("writer");
    pair.wait_tables_equal("public.busy", "postgres.busy", "id");
}

#[test]
fn kill9_during_many_small_transactions() {
    let pair = Pair::new();
    pair.src
        .execute("CREATE TABLE public.events (id int PRIMARY KEY, n int NOT NULL)");
    pair.add_connector("k9");
    pair.start("k9", "initial");
    wait_ready_tables(&pair, "k9", 3);
    let connect = pair.src.spawn_client();
    let writer = std::thread::spawn(move || {
        let mut c = connect();
        for i in 0..3000 {
            c.batch_execute(&format!(
                "INSERT INTO public.events VALUES ({i}, 0); UPDATE public.events SET n = n + 1 WHERE id = {};",
                i / 2
            ))
            .expect("write");
        }
    });
    for _ in 0..3 {
        wait_until(LONG, "some progress", || {
            pair.dst.count("SELECT count(*) FROM pg_tables WHERE schemaname = 'postgres' AND tablename = 'events'") == 1
                && pair.dst.count("SELECT count(*) FROM postgres.events") > 0
        });
        let pid = running_pid(&pair, "k9");
        kill9(pid);
        // The destination restarts after the crash and the launcher brings
        // the connector back.
        wait_until(LONG, "a new worker", || {
            pair.state("k9").is_some_and(|s| s.pid > 0 && s.pid != pid)
        });
    }
    writer.join().expect("writer");
    pair.wait_tables_equal("public.events", "postgres.events", "id");
}

#[test]
fn kill9_during_one_large_transaction() {
    let pair = Pair::new();
    pair.src
        .execute("CREATE TABLE public.big (id int PRIMARY KEY, payload text NOT NULL)");
    pair.add_connector("big");
    pair.start("big", "initial");
    wait_ready_tables(&pair, "big", 3);
    pair.src.execute(
        "BEGIN;
         INSERT INTO public.big SELECT g, repeat('x', 100) FROM generate_series(1, 200000) g;
         UPDATE public.big SET payload = 'updated' WHERE id % 10 = 0;
         DELETE FROM public.big WHERE id % 7 = 0;
         COMMIT;",
    );
    wait_until(LONG, "the large transaction being applied", || {
        pair.state("big").is_some_and(|s| s.state == "executing")
    });
    let pid = running_pid(&pair, "big");
    kill9(pid);
    wait_until(LONG, "a new worker", || {
        pair.state("big").is_some_and(|s| s.pid > 0 && s.pid != pid)
    });
    wait_until(Duration::from_secs(180), "the large transaction", || {
        pair.dst.count("SELECT count(*) FROM postgres.big")
            == pair.src.count("SELECT count(*) FROM public.big")
    });
    pair.wait_tables_equal("public.big", "postgres.big", "id");
}

#[test]
fn kill9_during_the_snapshot_copies_again_cleanly() {
    let pair = Pair::new();
    pair.src.execute(
        "CREATE TABLE public.wide (id int PRIMARY KEY, payload text NOT NULL);
         INSERT INTO public.wide SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 400000) g;",
    );
    pair.add_connector("snapk");
    pair.start("snapk", "initial");
    wait_until(LONG, "the copy to start", || {
        pair.state("snapk")
            .is_some_and(|s| s.stage == "initial snapshot" && s.state == "syncing")
    });
    let pid = running_pid(&pair, "snapk");
    kill9(pid);
    // The server restarts its workers; the interrupted copy was rolled back
    // with its transaction and the table is copied again, once.
    wait_until(LONG, "a new worker", || {
        pair.state("snapk")
            .is_some_and(|s| s.pid > 0 && s.pid != pid)
    });
    wait_until(Duration::from_secs(180), "the snapshot", || {
        pair.dst.count(
            "SELECT count(*) FROM synchdb_table_state WHERE name = 'snapk' AND state = 'ready'",
        ) == 3
    });
    pair.src
        .execute("INSERT INTO public.wide VALUES (0, 'after the snapshot')");
    pair.wait_tables_equal("public.wide", "postgres.wide", "id");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
}

#[test]
fn source_restart_during_cdc() {
    let mut pair = Pair::new();
    pair.add_connector("sr");
    pair.start("sr", "initial");
    wait_ready_tables(&pair, "sr", 2);
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (4000, 'before')");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.src.restart();
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (4001, 'after')");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    wait_until(LONG, "no error after reconnecting", || {
        pair.state("sr")
            .is_some_and(|s| s.err == "no error" && s.pid > 0)
    });
}

#[test]
fn delete_drops_slot_and_publication() {
    let pair = Pair::new();
    pair.add_connector("gone");
    pair.start("gone", "initial");
    wait_ready_tables(&pair, "gone", 2);
    assert_eq!(
        pair.src.count(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
            pair.slot_name("gone")
        )),
        1
    );
    pair.dst.execute("SELECT synchdb_del_conninfo('gone')");
    assert_eq!(
        pair.src.count("SELECT count(*) FROM pg_replication_slots"),
        0
    );
    assert_eq!(pair.src.count("SELECT count(*) FROM pg_publication"), 0);
    assert_eq!(pair.dst.count("SELECT count(*) FROM synchdb_state_view"), 0);
    assert_eq!(
        pair.dst.count("SELECT count(*) FROM pg_replication_origin"),
        0
    );
}

fn stats(pair: &Pair, name: &str) -> Vec<Option<String>> {
    pair.dst
        .query_strings(&format!(
            "SELECT ddls, dmls, inserts, updates, deletes, truncates, transactions, bad_changes,
                    total_changes, tables_copied, rows_copied
               FROM synchdb_stats_view WHERE name = '{name}'"
        ))
        .into_iter()
        .next()
        .expect("a stats row")
}

fn nums(v: &[&str]) -> Vec<Option<String>> {
    v.iter().map(|s| Some(s.to_string())).collect()
}

#[test]
fn statistics_count_changes_and_reset() {
    let pair = Pair::new();
    pair.add_connector("st");
    // A connector that never ran shows zeros.
    assert_eq!(
        stats(&pair, "st"),
        nums(&["0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0"])
    );
    pair.start("st", "initial");
    wait_ready_tables(&pair, "st", 2);
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (1001, 'a'), (1002, 'b')");
    pair.src
        .execute("UPDATE public.orders SET amount = 1 WHERE id IN (1, 2, 3)");
    pair.src.execute("DELETE FROM public.orders WHERE id = 4");
    pair.src.execute("TRUNCATE public.customers");
    pair.src
        .execute("ALTER TABLE public.orders ADD COLUMN note text");
    pair.src
        .execute("INSERT INTO public.orders (id, customer, note) VALUES (1003, 'c', 'n')");
    pair.wait_caught_up("st");
    // ddls, dmls, inserts, updates, deletes, truncates, transactions,
    // bad_changes, total_changes, tables_copied, rows_copied. The added
    // column makes orders (102 rows by then) be copied again.
    let want = nums(&["1", "8", "3", "3", "1", "1", "5", "0", "9", "3", "212"]);
    let start = std::time::Instant::now();
    let mut last = stats(&pair, "st");
    while last != want && start.elapsed() < LONG {
        std::thread::sleep(Duration::from_millis(100));
        last = stats(&pair, "st");
    }
    assert_eq!(last, want);
    let times = pair.dst.query_strings(
        "SELECT first_src_ts <= last_src_ts, first_apply_ts <= last_apply_ts,
                last_apply_ts >= last_src_ts - interval '1 minute', lag_seconds IS NOT NULL
           FROM synchdb_stats_view WHERE name = 'st'",
    );
    assert_eq!(times[0], nums(&["t", "t", "t", "t"]));
    wait_until(LONG, "no lag once idle", || {
        pair.dst
            .count("SELECT lag_bytes FROM synchdb_stats_view WHERE name = 'st'")
            == 0
    });
    pair.dst.execute("SELECT synchdb_reset_stats('st')");
    assert_eq!(
        stats(&pair, "st"),
        nums(&["0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0"])
    );
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (1004, 'd')");
    wait_until(LONG, "counting after a reset", || {
        stats(&pair, "st")[2].as_deref() == Some("1")
    });
    assert_eq!(
        sqlstate(pair.dst.try_execute("SELECT synchdb_reset_stats('nope')")),
        "42704"
    );
}

/// A destination-only row makes the source's next insert of the same key
/// fail to apply.
fn conflict(pair: &Pair, id: i32) {
    pair.dst.execute(&format!(
        "INSERT INTO postgres.orders (id, customer) VALUES ({id}, 'destination only')"
    ));
    pair.src.execute(&format!(
        "INSERT INTO public.orders (id, customer) VALUES ({id}, 'from source')"
    ));
}

#[test]
fn error_strategies_exit_skip_retry() {
    let pair = Pair::new();
    pair.add_connector("es");
    pair.start("es", "initial");
    wait_ready_tables(&pair, "es", 2);

    // exit (default): the worker stops and keeps the error, with context.
    conflict(&pair, 5000);
    let st = wait_for_value(LONG, "the worker to stop on the error", || {
        pair.state("es")
            .filter(|s| s.pid == -1 && s.err != "no error")
    });
    assert!(st.err.contains("duplicate key"), "{}", st.err);
    assert!(st.err.contains("public.orders"), "{}", st.err);
    assert!(st.err.contains("commit LSN"), "{}", st.err);
    assert!(!st.err.contains("mypass"));
    // The row's values (the DETAIL) stay in the server log: err is public.
    assert!(!st.err.contains("5000"), "{}", st.err);
    assert!(!st.err.contains("Key ("), "{}", st.err);
    assert!(pair
        .dst
        .log_contents()
        .contains("Key (id)=(5000) already exists"));

    // skip: the failing change is dropped, counted, logged; the rest of the
    // stream (and of its transaction) applies.
    pair.dst
        .execute("ALTER SYSTEM SET synchdb.error_handling_strategy = 'skip'");
    pair.dst.execute("SELECT pg_reload_conf()");
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (5001, 'after the conflict')");
    pair.start("es", "initial");
    wait_until(LONG, "the row after the skipped change", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = 5001")
            == 1
    });
    assert_eq!(
        pair.dst
            .query_one_string("SELECT customer FROM postgres.orders WHERE id = 5000")
            .as_deref(),
        Some("destination only")
    );
    wait_until(LONG, "the skipped change counted", || {
        pair.dst
            .count("SELECT bad_changes FROM synchdb_stats_view WHERE name = 'es'")
            == 1
    });
    assert!(pair.dst.log_contents().contains("skipped INSERT"));

    // retry: the change is tried again until the conflict is removed.
    pair.dst
        .execute("ALTER SYSTEM SET synchdb.error_handling_strategy = 'retry'");
    pair.dst
        .execute("ALTER SYSTEM SET synchdb.max_retry_interval = '1s'");
    pair.dst.execute("SELECT pg_reload_conf()");
    conflict(&pair, 5002);
    wait_until(LONG, "the error to show while retrying", || {
        pair.state("es")
            .is_some_and(|s| s.err.contains("duplicate key") && s.pid > 0)
    });
    pair.dst
        .execute("DELETE FROM postgres.orders WHERE id = 5002");
    pair.src
        .execute("UPDATE public.orders SET customer = 'resolved' WHERE id = 5002");
    wait_until(LONG, "the retried change applied", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = 5002 AND customer = 'resolved'")
            == 1
    });
    pair.wait_caught_up("es");
    pair.assert_tables_equal(
        "(SELECT * FROM public.orders WHERE id NOT IN (5000))",
        "(SELECT * FROM postgres.orders WHERE id NOT IN (5000))",
        "id",
    );
}

#[test]
fn memory_stays_bounded_during_a_huge_transaction() {
    let pair = Pair::new();
    pair.src
        .execute("CREATE TABLE public.huge (id int PRIMARY KEY, payload text NOT NULL)");
    pair.add_connector("mem");
    pair.start("mem", "initial");
    wait_ready_tables(&pair, "mem", 3);
    let pid = running_pid(&pair, "mem");
    // About 250 MB of row data in one source transaction.
    pair.src.execute(
        "INSERT INTO public.huge SELECT g, repeat(md5(g::text), 16) FROM generate_series(1, 500000) g",
    );
    let mut peak = 0;
    wait_until(Duration::from_secs(180), "the huge transaction", || {
        peak = peak.max(rss_anon_kb(pid).unwrap_or(0));
        pair.dst.count("SELECT count(*) FROM postgres.huge") == 500000
    });
    eprintln!("peak private memory of the worker: {peak} kB");
    assert!(
        peak > 0 && peak < 100 * 1024,
        "the worker held {peak} kB of private memory while applying"
    );
    assert_eq!(running_pid(&pair, "mem"), pid, "the same worker applied it");
}

#[test]
fn dropping_the_extension_stops_the_worker() {
    let pair = Pair::new();
    pair.add_connector("own");
    pair.start("own", "initial");
    wait_ready_tables(&pair, "own", 2);
    let pid = running_pid(&pair, "own");
    pair.dst.execute("DROP EXTENSION synchdb");
    wait_until(LONG, "the worker to exit", || {
        pair.dst.count(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
        )) == 0
    });
    // Nothing is left running that would start it again.
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'synchdb connector%'"
        ),
        0
    );
}

#[test]
fn destination_triggers_behave_as_under_native_replication() {
    let pair = Pair::new();
    pair.add_connector("trg");
    pair.start("trg", "initial");
    wait_ready_tables(&pair, "trg", 2);
    pair.dst.execute(
        "CREATE TABLE public.audit (id int);
         CREATE FUNCTION public.audit_fn() RETURNS trigger LANGUAGE plpgsql AS
           $$BEGIN INSERT INTO public.audit VALUES (NEW.id); RETURN NEW; END$$;
         CREATE TRIGGER audit_t AFTER INSERT ON postgres.orders
           FOR EACH ROW EXECUTE FUNCTION public.audit_fn();",
    );
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (7001, 'a')");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    // An ordinary trigger does not fire for replicated rows...
    assert_eq!(pair.dst.count("SELECT count(*) FROM public.audit"), 0);
    // ...one enabled ALWAYS does.
    pair.dst
        .execute("ALTER TABLE postgres.orders ENABLE ALWAYS TRIGGER audit_t");
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (7002, 'b')");
    wait_until(LONG, "the ALWAYS trigger", || {
        pair.dst
            .count("SELECT count(*) FROM public.audit WHERE id = 7002")
            == 1
    });
}

/// A backlog is applied several source transactions per destination commit
/// (`synchdb.max_transactions_per_commit`): a failing change in the middle
/// of such a group throws the whole group away, the stream is read again
/// from before it, and under `skip` exactly that change is dropped — every
/// other transaction of the group lands once.
#[test]
fn grouped_commits_skip_exactly_the_failing_change() {
    let pair = Pair::new();
    pair.dst
        .execute("ALTER SYSTEM SET synchdb.error_handling_strategy = 'skip'");
    pair.dst.execute("SELECT pg_reload_conf()");
    pair.add_connector("gc");
    pair.start("gc", "initial");
    wait_ready_tables(&pair, "gc", 2);
    pair.stop("gc");
    wait_until(LONG, "the worker to stop", || {
        pair.state("gc").is_some_and(|s| s.pid == -1)
    });
    // 400 source transactions; the 200th conflicts with a row only the
    // destination has.
    pair.dst
        .execute("INSERT INTO postgres.orders (id, customer) VALUES (20200, 'destination only')");
    pair.src.execute(
        "DO $$ BEGIN FOR i IN 20001..20400 LOOP
             INSERT INTO public.orders (id, customer) VALUES (i, 'from source ' || i);
             COMMIT;
         END LOOP; END $$",
    );
    let batches_before = pair
        .dst
        .count("SELECT batches_done FROM synchdb_genstats WHERE name = 'gc'");
    pair.start("gc", "initial");
    wait_until(LONG, "the backlog applied", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id BETWEEN 20001 AND 20400")
            == 400
    });
    pair.wait_caught_up("gc");
    assert_eq!(
        pair.dst
            .query_one_string("SELECT customer FROM postgres.orders WHERE id = 20200")
            .as_deref(),
        Some("destination only")
    );
    // Every other row exactly as the source has it (and only once: id is
    // the primary key, and the count above is exact).
    let src_rows = pair.src.query_one_string(
        "SELECT string_agg(id || ':' || customer, ',' ORDER BY id) FROM public.orders
          WHERE id BETWEEN 20001 AND 20400 AND id <> 20200",
    );
    let dst_rows = pair.dst.query_one_string(
        "SELECT string_agg(id || ':' || customer, ',' ORDER BY id) FROM postgres.orders
          WHERE id BETWEEN 20001 AND 20400 AND id <> 20200",
    );
    assert_eq!(src_rows, dst_rows);
    assert_eq!(
        pair.dst
            .count("SELECT bad_changes FROM synchdb_stats_view WHERE name = 'gc'"),
        1
    );
    // The transactions went in with fewer local commits than there were
    // source transactions.
    let batches = pair
        .dst
        .count("SELECT batches_done FROM synchdb_genstats WHERE name = 'gc'")
        - batches_before;
    assert!(
        batches < 400,
        "{batches} local commits for 400 source transactions"
    );
}
