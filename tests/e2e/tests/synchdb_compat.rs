//! What SynchDB users rely on, end to end: table lists as SynchDB writes
//! them (Debezium regular expressions, `file:` lists with `table_list` and
//! `snapshot_table_list`, their errors at add time and at start), and the
//! smaller settings and behaviours: `synchdb.max_connector_workers`,
//! `synchdb.synchdb_auto_launcher`, `synchdb.skipped_operations` (and
//! SynchDB's `synchdb.dbz_skipped_oeprations`), `synchdb.cdc_start_delay_ms`
//! and `synchdb_set_offset` with the JSON of `last_dbz_offset`.

use std::time::{Duration, Instant};
use synchdb_e2e::*;

fn wait_ready_tables(pair: &Pair, name: &str, n: i64) {
    wait_until(LONG, "snapshot finished", || {
        pair.dst.count(&format!(
            "SELECT count(*) FROM synchdb_table_state WHERE name = '{name}' AND state = 'ready'"
        )) == n
    });
}

fn dst_tables(pair: &Pair) -> String {
    pair.dst
        .query_one_string(
            "SELECT coalesce(string_agg(tablename, ',' ORDER BY tablename), '') FROM pg_tables WHERE schemaname = 'postgres'",
        )
        .unwrap_or_default()
}

fn published(pair: &Pair, name: &str) -> String {
    let publication = pair.slot_name(name);
    pair.src
        .query_one_string(&format!(
            "SELECT coalesce(string_agg(schemaname || '.' || tablename, ',' ORDER BY schemaname, tablename), '')
               FROM pg_publication_tables WHERE pubname = '{publication}'"
        ))
        .unwrap_or_default()
}

fn add_sql(pair: &Pair, name: &str, table: &str, snapshottable: &str) -> String {
    format!(
        "SELECT synchdb_add_conninfo('{name}','127.0.0.1',{},'myuser','mypass','postgres','public','{table}','{snapshottable}','postgres')",
        pair.src.port()
    )
}

fn conninfo_rows(pair: &Pair, name: &str) -> i64 {
    pair.dst.count(&format!(
        "SELECT count(*) FROM synchdb_conninfo WHERE name = '{name}'"
    ))
}

fn stat(pair: &Pair, name: &str, column: &str) -> i64 {
    pair.dst.count(&format!(
        "SELECT {column} FROM synchdb_stats_view WHERE name = '{name}'"
    ))
}

/// Writes a file the destination server (OS user postgres) can read.
fn write_list(pair: &Pair, file: &str, text: &str) -> String {
    let path = pair.dst.dir().join(file);
    std::fs::write(&path, text).expect("write list file");
    path.display().to_string()
}

/// Sets `setting` in postgresql.auto.conf and reloads; waits until a new
/// session shows it as `shown`.
fn reload(c: &Cluster, setting: &str, value: &str, shown: &str) {
    c.execute(&format!("ALTER SYSTEM SET {setting} = '{value}'"));
    c.execute("SELECT pg_reload_conf()");
    wait_until(LONG, "the setting to be reloaded", || {
        c.query_one_string(&format!("SHOW {setting}")).as_deref() == Some(shown)
    });
}

#[test]
fn regex_table_list_snapshot_cdc_and_later_tables() {
    let pair = Pair::new();
    pair.src.execute(
        "CREATE TABLE public.order_items (id int PRIMARY KEY, order_id int, qty int);
         INSERT INTO public.order_items SELECT g, g, g FROM generate_series(1, 20) g;
         CREATE TABLE public.reorders (id int PRIMARY KEY);
         INSERT INTO public.reorders VALUES (1);
         CREATE SCHEMA sales;
         CREATE TABLE sales.orders (id int PRIMARY KEY);
         INSERT INTO sales.orders VALUES (1);",
    );
    // A Debezium include-list entry next to a plain name.
    pair.add_connector_with("rx", r"public\.order.*", "null");
    let data = pair
        .dst
        .query_one_string("SELECT data->>'table' FROM synchdb_conninfo WHERE name = 'rx'");
    assert_eq!(data.as_deref(), Some(r"public\.order.*"));
    pair.start("rx", "initial");
    wait_ready_tables(&pair, "rx", 2);
    // Exactly the matching tables: not customers, not reorders (anchored),
    // not sales.orders (the schema is part of the name matched).
    assert_eq!(dst_tables(&pair), "order_items,orders");
    pair.assert_tables_equal("public.orders", "postgres.orders", "id");
    pair.assert_tables_equal("public.order_items", "postgres.order_items", "id");
    assert_eq!(published(&pair, "rx"), "public.order_items,public.orders");

    // CDC for the matching tables only.
    pair.src.execute(
        "INSERT INTO public.orders (id, customer) VALUES (500, 'cdc');
         UPDATE public.order_items SET qty = 0 WHERE id = 3;
         INSERT INTO public.customers (name) VALUES ('not captured');
         INSERT INTO public.reorders VALUES (2);",
    );
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_tables_equal("public.order_items", "postgres.order_items", "id");

    // Tables created later: the matching one joins (copied, then
    // streamed), the other never does.
    pair.src.execute(
        "CREATE TABLE public.notes (id int PRIMARY KEY, body text);
         INSERT INTO public.notes VALUES (1, 'not captured');
         CREATE TABLE public.order_notes (id int PRIMARY KEY, body text);
         INSERT INTO public.order_notes SELECT g, 'before it joined ' || g FROM generate_series(1, 5) g;",
    );
    pair.wait_tables_equal("public.order_notes", "postgres.order_notes", "id");
    pair.src
        .execute("INSERT INTO public.order_notes VALUES (6, 'after it joined'); DELETE FROM public.order_notes WHERE id = 1;");
    pair.wait_tables_equal("public.order_notes", "postgres.order_notes", "id");
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (501, 'still streaming')");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_caught_up("rx");
    assert_eq!(dst_tables(&pair), "order_items,order_notes,orders");
    assert_eq!(
        published(&pair, "rx"),
        "public.order_items,public.order_notes,public.orders"
    );
    let st = pair.state("rx").expect("state");
    assert_eq!(st.err, "no error");
    assert!(st.pid > 0);
}

#[test]
fn file_table_list_with_snapshot_table_list() {
    let pair = Pair::new();
    pair.src.execute(
        "CREATE TABLE public.order_items (id int PRIMARY KEY, qty int);
         INSERT INTO public.order_items SELECT g, g FROM generate_series(1, 20) g;
         CREATE TABLE public.products (id int PRIMARY KEY);
         INSERT INTO public.products VALUES (1);",
    );
    let path = write_list(
        &pair,
        "tables.json",
        r#"{"table_list": ["public.customers", "public\\.order.*"],
            "snapshot_table_list": ["public\\.cust.*"]}"#,
    );
    pair.add_connector_with("fl", &format!("file:{path}"), &format!("file:{path}"));
    pair.start("fl", "initial");
    wait_ready_tables(&pair, "fl", 3);
    assert_eq!(dst_tables(&pair), "customers,order_items,orders");
    pair.assert_tables_equal("public.customers", "postgres.customers", "id");
    pair.assert_tables_equal("public.orders", "postgres.orders", "id");
    pair.assert_tables_equal("public.order_items", "postgres.order_items", "id");
    pair.src
        .execute("UPDATE public.order_items SET qty = -1 WHERE id < 5");
    pair.wait_tables_equal("public.order_items", "postgres.order_items", "id");
    pair.wait_caught_up("fl");

    // Mode always re-copies only what snapshot_table_list matches (a
    // pattern here): a destination-only edit survives in orders and is
    // replaced in customers.
    pair.stop("fl");
    wait_until(LONG, "stopped", || {
        pair.state("fl").is_some_and(|s| s.pid == -1)
    });
    pair.dst.execute(
        "UPDATE postgres.customers SET name = 'local edit' WHERE id = 1;
         UPDATE postgres.orders SET customer = 'local edit' WHERE id = 1;",
    );
    pair.start("fl", "always");
    wait_until(LONG, "customers copied again", || {
        pair.tables_equal("public.customers", "postgres.customers", "id")
    });
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (700, 'after always')");
    wait_until(LONG, "the new row streamed", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = 700")
            == 1
    });
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE customer = 'local edit'"),
        1,
        "orders is not in snapshot_table_list: it must not be copied again"
    );
    assert_eq!(pair.state("fl").map(|s| s.err).as_deref(), Some("no error"));
}

#[test]
fn bad_lists_are_refused_at_add_time() {
    let pair = Pair::new();
    // A regular expression that does not compile: 2201B, nothing stored.
    let r = pair
        .dst
        .try_execute(&add_sql(&pair, "bad1", r"public\.order(", "null"));
    assert_eq!(sqlstate(r), "2201B");
    assert_eq!(conninfo_rows(&pair, "bad1"), 0);
    let r = pair
        .dst
        .try_execute(&add_sql(&pair, "bad1", "null", r"public\.[a-"));
    let e = r.expect_err("bad snapshottable pattern");
    assert!(describe(&e).contains("snapshottable"), "{}", describe(&e));
    assert_eq!(conninfo_rows(&pair, "bad1"), 0);

    // A missing file: 58P01.
    let missing = pair.dst.dir().join("no-such-list.json");
    let r = pair.dst.try_execute(&add_sql(
        &pair,
        "bad2",
        &format!("file:{}", missing.display()),
        "null",
    ));
    let e = r.expect_err("missing file");
    assert_eq!(
        e.code().map(|c| c.code()),
        Some("58P01"),
        "{}",
        describe(&e)
    );
    assert!(describe(&e).contains("no such file"), "{}", describe(&e));
    assert_eq!(conninfo_rows(&pair, "bad2"), 0);

    // Malformed files: 22023, naming what is wrong.
    for (text, why) in [
        ("{\"table_list\": [\"public.orders\"", "not valid JSON"),
        (
            "{\"tables\": [\"public.orders\"]}",
            "no \"table_list\" array",
        ),
        ("{\"table_list\": [1]}", "is not a string"),
        (
            "{\"table_list\": [\"public\\\\.x(\"]}",
            "regular expression",
        ),
    ] {
        let path = write_list(&pair, "malformed.json", text);
        let r = pair
            .dst
            .try_execute(&add_sql(&pair, "bad3", &format!("file:{path}"), "null"));
        let e = r.expect_err(text);
        assert!(describe(&e).contains(why), "{text}: {}", describe(&e));
        let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
        assert!(code == "22023" || code == "2201B", "{text}: {code}");
        assert_eq!(conninfo_rows(&pair, "bad3"), 0);
    }
    // snapshottable reads snapshot_table_list, which this file lacks.
    let path = write_list(
        &pair,
        "only_tables.json",
        r#"{"table_list": ["public.orders"]}"#,
    );
    let r = pair.dst.try_execute(&add_sql(
        &pair,
        "bad4",
        &format!("file:{path}"),
        &format!("file:{path}"),
    ));
    let e = r.expect_err("no snapshot_table_list");
    assert!(
        describe(&e).contains("snapshot_table_list"),
        "{}",
        describe(&e)
    );
    assert_eq!(conninfo_rows(&pair, "bad4"), 0);

    // A role without the right to read server files may not use file:.
    pair.dst.execute(
        "CREATE ROLE operator LOGIN;
         GRANT EXECUTE ON FUNCTION synchdb_add_conninfo(text, text, integer, text, text, text, text, text, text, text) TO operator;
         GRANT ALL ON synchdb_conninfo, synchdb_objects TO operator;",
    );
    let mut op = pair.dst.client_as("operator");
    let r = op
        .batch_execute(&add_sql(&pair, "bad5", &format!("file:{path}"), "null"))
        .map_err(|e| e.code().map(|c| c.code().to_string()));
    assert_eq!(r.err().flatten().as_deref(), Some("42501"));
    assert_eq!(conninfo_rows(&pair, "bad5"), 0);
}

#[test]
fn file_list_read_again_at_each_start() {
    let mut pair = Pair::new();
    let path = write_list(
        &pair,
        "vanishing.json",
        r#"{"table_list": ["public.orders"]}"#,
    );
    pair.add_connector_with("fv", &format!("file:{path}"), "null");
    pair.start("fv", "initial");
    wait_ready_tables(&pair, "fv", 1);
    assert_eq!(dst_tables(&pair), "orders");
    pair.stop("fv");
    wait_until(LONG, "stopped", || {
        pair.state("fv").is_some_and(|s| s.pid == -1)
    });

    // Gone before the next start: synchdb_start_engine_bgw says so at once.
    std::fs::remove_file(&path).expect("remove list file");
    let r = pair
        .dst
        .try_execute("SELECT synchdb_start_engine_bgw('fv', 'initial')");
    let e = r.expect_err("start without its list file");
    assert_eq!(
        e.code().map(|c| c.code()),
        Some("58P01"),
        "{}",
        describe(&e)
    );

    // A start the worker makes itself (after a server restart) reads the
    // file again and stops with the reason in err.
    write_list(
        &pair,
        "vanishing.json",
        r#"{"table_list": ["public.orders"]}"#,
    );
    pair.start("fv", "initial");
    wait_until(LONG, "running", || {
        pair.state("fv")
            .is_some_and(|s| s.pid > 0 && s.state == "polling")
    });
    pair.dst.stop("fast");
    std::fs::remove_file(&path).expect("remove list file");
    pair.dst.start();
    let st = wait_for_value(LONG, "the start to fail", || {
        pair.state("fv")
            .filter(|s| s.pid == -1 && s.err.contains("table list file"))
    });
    assert!(st.err.contains("\"fv\""), "{}", st.err);
    assert!(st.err.contains(&path), "{}", st.err);
    assert!(st.err.contains("no such file"), "{}", st.err);
    assert_eq!(st.state, "stopped");

    // Malformed now: the same.
    write_list(&pair, "vanishing.json", "{\"table_list\": ");
    pair.dst.restart();
    let st = wait_for_value(LONG, "the start to fail again", || {
        pair.state("fv")
            .filter(|s| s.pid == -1 && s.err.contains("is malformed"))
    });
    assert!(st.err.contains("not valid JSON"), "{}", st.err);

    // Back, with one more table: read again, the new table is captured.
    write_list(
        &pair,
        "vanishing.json",
        r#"{"table_list": ["public.orders", "public.customers"]}"#,
    );
    pair.start("fv", "initial");
    wait_ready_tables(&pair, "fv", 2);
    pair.src
        .execute("INSERT INTO public.customers (name) VALUES ('after the file came back')");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    assert_eq!(pair.state("fv").map(|s| s.err).as_deref(), Some("no error"));
}

#[test]
fn skipped_operations_are_counted_not_applied() {
    let pair = Pair::new();
    // SynchDB's letters; anything else is refused.
    let r = pair
        .dst
        .try_execute("ALTER SYSTEM SET synchdb.skipped_operations = 'c,x'");
    assert_eq!(sqlstate(r), "22023");
    let r = pair
        .dst
        .try_execute("ALTER SYSTEM SET synchdb.dbz_skipped_oeprations = 'truncate'");
    assert_eq!(sqlstate(r), "22023");
    reload(&pair.dst, "synchdb.skipped_operations", "t", "t");
    pair.add_connector("sk");
    pair.start("sk", "initial");
    wait_ready_tables(&pair, "sk", 2);
    let bad0 = stat(&pair, "sk", "bad_changes");

    // A skipped TRUNCATE: the source is empty, the destination keeps its
    // rows; the transaction's other changes are applied.
    pair.src.execute(
        "BEGIN;
         TRUNCATE public.orders;
         INSERT INTO public.customers (name) VALUES ('same transaction');
         COMMIT;",
    );
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    pair.wait_caught_up("sk");
    assert_eq!(pair.src.count("SELECT count(*) FROM public.orders"), 0);
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.orders"), 100);
    wait_until(LONG, "the skipped truncate counted", || {
        stat(&pair, "sk", "bad_changes") == bad0 + 1
    });
    assert_eq!(stat(&pair, "sk", "truncates"), 0);

    // SynchDB's misspelled name works too, and both lists apply: deletes
    // and truncates are skipped now, inserts and updates applied.
    pair.stop("sk");
    wait_until(LONG, "stopped", || {
        pair.state("sk").is_some_and(|s| s.pid == -1)
    });
    reload(&pair.dst, "synchdb.dbz_skipped_oeprations", "d", "d");
    pair.start("sk", "initial");
    wait_until(LONG, "streaming", || {
        pair.state("sk")
            .is_some_and(|s| s.pid > 0 && s.state == "polling")
    });
    let bad1 = stat(&pair, "sk", "bad_changes");
    let deletes1 = stat(&pair, "sk", "deletes");
    pair.src.execute(
        "DELETE FROM public.customers WHERE id <= 3;
         UPDATE public.customers SET name = 'updated' WHERE id = 4;
         INSERT INTO public.customers (name) VALUES ('after the delete');",
    );
    wait_until(LONG, "the insert after the delete", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.customers WHERE name = 'after the delete'")
            == 1
    });
    pair.wait_caught_up("sk");
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.customers WHERE id <= 3"),
        3
    );
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.customers WHERE id = 4 AND name = 'updated'"),
        1
    );
    wait_until(LONG, "three skipped deletes counted", || {
        stat(&pair, "sk", "bad_changes") == bad1 + 3
    });
    assert_eq!(stat(&pair, "sk", "deletes"), deletes1);

    // Both empty: everything is applied again.
    pair.stop("sk");
    wait_until(LONG, "stopped", || {
        pair.state("sk").is_some_and(|s| s.pid == -1)
    });
    reload(&pair.dst, "synchdb.dbz_skipped_oeprations", "", "");
    reload(&pair.dst, "synchdb.skipped_operations", "", "");
    pair.start("sk", "initial");
    pair.src
        .execute("DELETE FROM public.customers WHERE id <= 5");
    wait_until(LONG, "deletes applied again", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.customers WHERE id IN (4, 5)")
            == 0
    });
    // The deletes skipped before stay skipped (rows 1 to 3 remain here).
    let rest = |c: &Cluster| {
        c.query_strings("SELECT t::text FROM public.customers t WHERE id > 3 ORDER BY id")
    };
    let dst_rest = pair
        .dst
        .query_strings("SELECT t::text FROM postgres.customers t WHERE id > 3 ORDER BY id");
    assert_eq!(rest(&pair.src), dst_rest);
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.customers WHERE id <= 3"),
        3
    );
    pair.src.execute("TRUNCATE public.orders");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.orders"), 0);
}

#[test]
fn cdc_start_delay_holds_back_the_stream() {
    let pair = Pair::new();
    reload(&pair.dst, "synchdb.cdc_start_delay_ms", "4000", "4s");
    pair.add_connector("dl");
    let started = Instant::now();
    pair.start("dl", "initial");
    wait_ready_tables(&pair, "dl", 2);
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (900, 'delayed')");
    wait_until(LONG, "the row after the delay", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = 900")
            == 1
    });
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(4000),
        "streamed after {took:?}, before the 4000 ms delay"
    );
    assert!(pair
        .dst
        .log_contents()
        .contains("change data capture begins in 4000 ms"));
}

#[test]
fn set_offset_takes_last_dbz_offset_json() {
    let pair = Pair::new();
    // No primary key: a transaction applied twice shows as a duplicate.
    pair.src.execute(
        "CREATE TABLE public.log (id int, v text);
         ALTER TABLE public.log REPLICA IDENTITY FULL;",
    );
    pair.add_connector_with("so", "public.log", "null");
    pair.start("so", "initial");
    wait_ready_tables(&pair, "so", 1);
    pair.src.execute("INSERT INTO public.log VALUES (1, 'a')");
    pair.wait_tables_equal("public.log", "postgres.log", "id");
    pair.wait_caught_up("so");
    let shown = wait_for_value(LONG, "an offset", || {
        pair.state("so")
            .map(|s| s.last_dbz_offset)
            .filter(|o| o.contains("\"messageType\":\"INSERT\""))
    });
    let lsn: u64 = shown
        .split("\"lsn\":")
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|v| v.parse().ok())
        .expect("lsn in last_dbz_offset");

    pair.dst.execute("SELECT synchdb_pause_engine('so')");
    wait_until(LONG, "paused", || {
        pair.state("so").is_some_and(|s| s.state == "paused")
    });
    // Malformed JSON is refused.
    let r = pair
        .dst
        .try_execute("SELECT synchdb_set_offset('so', '{\"lsn_commit\": 5}')");
    assert_eq!(sqlstate(r), "22023");
    let r = pair
        .dst
        .try_execute("SELECT synchdb_set_offset('so', '{\"lsn\": ')");
    assert_eq!(sqlstate(r), "22023");
    pair.src
        .execute("INSERT INTO public.log VALUES (2, 'while paused')");
    pair.dst.execute(&format!(
        "SELECT synchdb_set_offset('so', '{}')",
        shown.replace('\'', "''")
    ));
    wait_until(LONG, "the offset shown", || {
        pair.state("so")
            .is_some_and(|s| s.last_dbz_offset.contains(&format!("\"lsn\":{lsn}")))
    });
    pair.dst.execute("SELECT synchdb_resume_engine('so')");
    pair.src
        .execute("INSERT INTO public.log VALUES (3, 'after')");
    pair.wait_tables_equal("public.log", "postgres.log", "id, v");
    pair.wait_caught_up("so");
    // Resumed after the transaction the JSON names: once each.
    pair.assert_tables_equal("public.log", "postgres.log", "id, v");
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.log"), 3);
    assert_eq!(pair.state("so").map(|s| s.err).as_deref(), Some("no error"));
}

#[test]
fn max_connector_workers_is_the_slot_limit() {
    let mut pair = Pair::with_destination(Cluster::destination_with(&[(
        "synchdb.max_connector_workers",
        "2",
    )]));
    assert_eq!(
        pair.dst
            .query_one_string("SHOW synchdb.max_connectors")
            .as_deref(),
        Some("30")
    );
    for n in ["w1", "w2", "w3"] {
        pair.add_connector_with(n, "public.orders", "null");
    }
    // Setting the other name (ALTER SYSTEM checks the value in this
    // session) changes nothing before a restart.
    let mut session = pair.dst.client();
    for sql in [
        "ALTER SYSTEM SET synchdb.max_connectors = 1",
        "SELECT synchdb_start_engine_bgw('w1', 'initial')",
        "SELECT synchdb_start_engine_bgw('w2', 'initial')",
    ] {
        session.batch_execute(sql).expect(sql);
    }
    let r = session.batch_execute("SELECT synchdb_start_engine_bgw('w3', 'initial')");
    let e = r.expect_err("a third connector with two slots");
    assert_eq!(
        e.code().map(|c| c.code()),
        Some("53400"),
        "{}",
        describe(&e)
    );
    let hint = e
        .as_db_error()
        .and_then(|d| d.hint())
        .unwrap_or_default()
        .to_string();
    assert!(hint.contains("synchdb.max_connector_workers"), "{hint}");

    // Both set: the larger wins.
    for n in ["w1", "w2"] {
        pair.stop(n);
    }
    drop(session);
    pair.dst.restart();
    pair.start("w1", "initial");
    pair.start("w2", "initial");
    let r = pair
        .dst
        .try_execute("SELECT synchdb_start_engine_bgw('w3', 'initial')");
    assert_eq!(sqlstate(r), "53400");
}

#[test]
fn auto_launcher_off_leaves_connectors_stopped_after_restart() {
    let mut pair = Pair::with_destination(Cluster::destination_with(&[(
        "synchdb.synchdb_auto_launcher",
        "off",
    )]));
    pair.add_connector("al");
    pair.start("al", "initial");
    wait_ready_tables(&pair, "al", 2);
    pair.dst.restart();
    // Still active in the catalog, but nothing starts it: no launcher
    // process, no worker, for as long as one would take to appear.
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM synchdb_conninfo WHERE name = 'al' AND isactive"),
        1
    );
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(5) {
        assert_eq!(pair.state("al").map(|s| s.pid), Some(-1));
        assert_eq!(
            pair.dst
                .count("SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'synchdb%'"),
            0
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Started by hand it resumes where it was.
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (800, 'after restart')");
    pair.start("al", "initial");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
}

#[test]
fn regex_list_on_postgresql_12_with_partitions() {
    if !version_selected(12) {
        return;
    }
    let pair = Pair::with_clusters(Cluster::source_version(12), Cluster::destination());
    // The partitions match the pattern too; they replicate through their
    // root (a source before 13 publishes the partitions themselves).
    pair.src.execute(
        "CREATE TABLE public.measurements (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE public.measurements_2024 PARTITION OF public.measurements FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         CREATE TABLE public.measurements_2025 PARTITION OF public.measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         INSERT INTO public.measurements SELECT g, date '2024-06-01' + g, g FROM generate_series(1, 300) g;",
    );
    pair.add_connector_with("p12", r"public\.m.*", "null");
    pair.start("p12", "initial");
    wait_ready_tables(&pair, "p12", 1);
    assert_eq!(dst_tables(&pair), "measurements");
    pair.assert_tables_equal("public.measurements", "postgres.measurements", "id, at");
    pair.src
        .execute("INSERT INTO public.measurements VALUES (1000, '2025-02-01', 1); UPDATE public.measurements SET v = 0 WHERE id < 10;");
    pair.wait_tables_equal("public.measurements", "postgres.measurements", "id, at");
    // Created later, matching: copied, then streamed; orders never.
    pair.src.execute(
        "CREATE TABLE public.metrics (id int PRIMARY KEY, v text);
         INSERT INTO public.metrics SELECT g, 'm' || g FROM generate_series(1, 10) g;",
    );
    pair.wait_tables_equal("public.metrics", "postgres.metrics", "id");
    pair.src
        .execute("INSERT INTO public.metrics VALUES (11, 'later'); INSERT INTO public.orders (id, customer) VALUES (9000, 'never');");
    pair.wait_tables_equal("public.metrics", "postgres.metrics", "id");
    assert_eq!(dst_tables(&pair), "measurements,metrics");
    assert_eq!(
        pair.state("p12").map(|s| s.err).as_deref(),
        Some("no error")
    );
}
