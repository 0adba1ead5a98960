//! SynchDB's other start modes end to end: `schemasync` (tables and types
//! built without rows, a pause in stage `schema sync` that survives a
//! destination restart, then a copy and the stream on resume, with changes
//! made during the pause and during the resume neither lost nor applied
//! twice; on a connector that already streams, its slot position kept),
//! `when_needed` (a copy only when no usable position exists: a
//! fresh connector, a lost slot) and the SynchDB mode names that have no
//! meaning for a PostgreSQL source (refused with a hint, nothing started).

use std::time::{Duration, Instant};
use synchdb_e2e::*;

fn wait_schema_sync_pause(pair: &Pair, name: &str) -> StateRow {
    wait_for_value(LONG, "paused in schema sync", || {
        pair.state(name)
            .filter(|s| s.pid > 0 && s.stage == "schema sync" && s.state == "paused")
    })
}

fn table_states(pair: &Pair, name: &str) -> Vec<Vec<Option<String>>> {
    pair.dst.query_strings(&format!(
        "SELECT src_table, dst_table, state, sync_lsn::text FROM synchdb_table_state
          WHERE name = '{name}' ORDER BY src_table"
    ))
}

fn runtime_mode(pair: &Pair, name: &str) -> Option<String> {
    pair.dst.query_one_string(&format!(
        "SELECT mode FROM synchdb_runtime WHERE name = '{name}'"
    ))
}

fn destination_rows(pair: &Pair) -> i64 {
    pair.dst.count(
        "SELECT (SELECT count(*) FROM postgres.orders) + (SELECT count(*) FROM postgres.customers)
              + (SELECT count(*) FROM postgres.feelings)",
    )
}

/// For `d`, checks every 200 ms that the connector still waits in schema
/// sync (same worker) and that no row reached the destination.
fn stays_paused_without_rows(pair: &Pair, name: &str, pid: i32, d: Duration) {
    let started = Instant::now();
    while started.elapsed() < d {
        let st = pair.state(name).unwrap_or_else(|| {
            let e = pair
                .dst
                .try_query_strings("SELECT * FROM synchdb_state_view")
                .err();
            panic!("no state row for {name}: {e:?}")
        });
        assert_eq!(
            (st.pid, st.stage.as_str(), st.state.as_str()),
            (pid, "schema sync", "paused"),
            "{st:?}"
        );
        assert_eq!(st.err, "no error");
        assert_eq!(destination_rows(pair), 0);
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The sample tables plus one with a user-defined enum type.
fn pair_with_types() -> Pair {
    let pair = Pair::new();
    pair.src.execute(
        "CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TABLE public.feelings (id int PRIMARY KEY, m public.mood NOT NULL, note text);
         INSERT INTO public.feelings SELECT g, (ARRAY['sad','ok','happy'])[g % 3 + 1]::public.mood, 'n' || g
           FROM generate_series(1, 30) g;",
    );
    pair
}

fn assert_all_equal(pair: &Pair) {
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    pair.wait_tables_equal("public.feelings", "postgres.feelings", "id");
}

#[test]
fn schemasync_builds_empty_tables_pauses_and_copies_on_resume() {
    let pair = pair_with_types();
    pair.add_connector("ss");
    // Case and white space around the name do not matter.
    pair.start("ss", " SchemaSync ");
    let st = wait_schema_sync_pause(&pair, "ss");
    assert_eq!(runtime_mode(&pair, "ss").as_deref(), Some("schemasync"));

    // The tables and their type exist in the destination catalog, empty.
    let tables = pair.dst.query_one_string(
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'postgres'",
    );
    assert_eq!(tables.as_deref(), Some("customers,feelings,orders"));
    let labels = pair.dst.query_one_string(
        "SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
           FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
           JOIN pg_namespace n ON n.oid = t.typnamespace
          WHERE n.nspname = 'postgres' AND t.typname = 'mood'",
    );
    assert_eq!(labels.as_deref(), Some("sad,ok,happy"));
    let shape = pair.dst.query_one_string(
        "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod) || CASE WHEN attnotnull THEN ' nn' ELSE '' END, ', ' ORDER BY attnum)
           FROM pg_attribute WHERE attrelid = 'postgres.orders'::regclass AND attnum > 0 AND NOT attisdropped",
    );
    assert_eq!(
        shape.as_deref(),
        Some("id integer nn, customer text nn, amount numeric(10,2), created timestamp with time zone")
    );
    let feelings = pair.dst.query_one_string(
        "SELECT n.nspname || '.' || t.typname FROM pg_attribute a
           JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace n ON n.oid = t.typnamespace
          WHERE a.attrelid = 'postgres.feelings'::regclass AND a.attname = 'm'",
    );
    assert_eq!(feelings.as_deref(), Some("postgres.mood"));
    assert_eq!(destination_rows(&pair), 0);
    // Built, not copied: each table waits for its copy (state 'schema').
    let states = table_states(&pair, "ss");
    assert_eq!(states.len(), 3, "{states:?}");
    for row in &states {
        assert_eq!(row[2].as_deref(), Some("schema"), "{row:?}");
    }
    // Nothing is read from the source during the review: no slot retains
    // WAL for it.
    assert_eq!(
        pair.src.count("SELECT count(*) FROM pg_replication_slots"),
        0
    );

    // Source activity during the pause: nothing reaches the destination.
    pair.src.execute(
        "INSERT INTO public.orders (id, customer, amount) VALUES (5000, 'during pause', 1.5);
         UPDATE public.orders SET customer = 'updated during pause', amount = 99 WHERE id = 5;
         DELETE FROM public.orders WHERE id = 7;
         UPDATE public.customers SET name = 'renamed during pause' WHERE id = 2;
         INSERT INTO public.feelings VALUES (100, 'happy', 'during pause');
         UPDATE public.feelings SET m = 'sad' WHERE id = 3;
         DELETE FROM public.feelings WHERE id = 4;",
    );
    for i in 0..20 {
        pair.src.execute(&format!(
            "INSERT INTO public.orders (id, customer) VALUES ({}, 'burst')",
            6000 + i
        ));
    }
    // Pausing again is harmless; an offset makes no sense before the copy.
    pair.dst.execute("SELECT synchdb_pause_engine('ss')");
    let e = sqlstate(
        pair.dst
            .try_execute("SELECT synchdb_set_offset('ss', '0/1000000')"),
    );
    assert_eq!(e, "55000");
    stays_paused_without_rows(&pair, "ss", st.pid, Duration::from_secs(4));

    // Resume while the source keeps writing: the copy and the stream hand
    // over without losing or repeating any of these changes.
    let connect = pair.src.spawn_client();
    let writer = std::thread::spawn(move || {
        let mut c = connect();
        for i in 0..300 {
            c.batch_execute(&format!(
                "INSERT INTO public.orders (id, customer, amount) VALUES ({}, 'during resume', {i});
                 UPDATE public.orders SET amount = coalesce(amount, 0) + 1 WHERE id = {};
                 UPDATE public.customers SET name = 'c{i}' WHERE id = {};",
                10000 + i,
                1 + i % 100,
                1 + i % 10
            ))
            .expect("write");
        }
    });
    pair.dst.execute("SELECT synchdb_resume_engine('ss')");
    wait_until(LONG, "the copies after the resume", || {
        pair.dst
            .count("SELECT count(*) FROM synchdb_table_state WHERE name = 'ss' AND state = 'ready'")
            == 3
    });
    writer.join().expect("writer");
    assert_all_equal(&pair);
    // The row updated and the row deleted during the pause.
    assert_eq!(
        pair.dst
            .query_one_string("SELECT customer FROM postgres.orders WHERE id = 5"),
        Some("updated during pause".into())
    );
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = 7"),
        0
    );
    // The review is over: a later start of the server does not review again.
    assert_eq!(runtime_mode(&pair, "ss").as_deref(), Some("initial"));

    // Streaming after the resume.
    pair.src.execute(
        "INSERT INTO public.orders (id, customer) VALUES (20000, 'after resume');
         UPDATE public.orders SET customer = 'updated after resume' WHERE id = 9;
         DELETE FROM public.orders WHERE id = 11;
         INSERT INTO public.feelings VALUES (200, 'ok', 'after resume');",
    );
    assert_all_equal(&pair);
    wait_until(LONG, "change data capture", || {
        pair.state("ss").is_some_and(|s| {
            s.stage == "change data capture" && s.state != "paused" && s.err == "no error"
        })
    });
}

#[test]
fn schemasync_stays_paused_across_a_destination_restart() {
    let mut pair = pair_with_types();
    pair.add_connector("ssr");
    pair.start("ssr", "schemasync");
    let before = wait_schema_sync_pause(&pair, "ssr");
    pair.src.execute(
        "UPDATE public.orders SET customer = 'while paused' WHERE id = 1;
         DELETE FROM public.orders WHERE id = 2;",
    );

    // The server restarts its active connectors in the mode they were
    // started in: back to the review, not copying on its own.
    pair.dst.restart();
    let after = wait_schema_sync_pause(&pair, "ssr");
    assert_ne!(before.pid, after.pid);
    pair.src.execute(
        "INSERT INTO public.orders (id, customer) VALUES (900, 'after the restart');
         DELETE FROM public.customers WHERE id = 4;",
    );
    stays_paused_without_rows(&pair, "ssr", after.pid, Duration::from_secs(4));
    let states = table_states(&pair, "ssr");
    assert_eq!(states.len(), 3, "{states:?}");
    assert!(
        states.iter().all(|r| r[2].as_deref() == Some("schema")),
        "{states:?}"
    );
    assert_eq!(runtime_mode(&pair, "ssr").as_deref(), Some("schemasync"));

    pair.dst.execute("SELECT synchdb_resume_engine('ssr')");
    assert_all_equal(&pair);
    let copied = table_states(&pair, "ssr");
    assert!(
        copied.iter().all(|r| r[2].as_deref() == Some("ready")),
        "{copied:?}"
    );

    // Restarted again after the review: streams on from where it was, no
    // second copy (a destination-only row stays).
    pair.dst
        .execute("INSERT INTO postgres.orders (id, customer) VALUES (-1, 'marker')");
    pair.dst.restart();
    wait_until(LONG, "streaming again", || {
        pair.state("ssr")
            .is_some_and(|s| s.pid > 0 && s.state != "paused")
    });
    pair.src.execute(
        "INSERT INTO public.orders (id, customer) VALUES (901, 'after the second restart')",
    );
    wait_until(LONG, "the new row", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = 901")
            == 1
    });
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = -1"),
        1
    );
    assert_eq!(table_states(&pair, "ssr"), copied);
    pair.dst
        .execute("DELETE FROM postgres.orders WHERE id = -1");
    assert_all_equal(&pair);
}

#[test]
fn when_needed_copies_only_without_a_usable_position() {
    let pair = Pair::new();
    pair.add_connector("wn");
    // A fresh connector has no position: it copies.
    pair.start("wn", "when_needed");
    wait_until(LONG, "the first copy", || {
        pair.dst
            .count("SELECT count(*) FROM synchdb_table_state WHERE name = 'wn' AND state = 'ready'")
            == 2
    });
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    // Stored under the mode it names.
    assert_eq!(runtime_mode(&pair, "wn").as_deref(), Some("initial"));
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (3000, 'streamed')");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    let first = table_states(&pair, "wn");

    // Started again with its slot and position intact: no copy (the
    // destination-only row stays, the tables keep their copy position),
    // the changes made while stopped are streamed.
    pair.stop("wn");
    pair.dst
        .execute("INSERT INTO postgres.orders (id, customer) VALUES (-1, 'marker')");
    pair.src.execute(
        "INSERT INTO public.orders (id, customer) VALUES (3001, 'while stopped');
         UPDATE public.orders SET customer = 'updated while stopped' WHERE id = 3;
         DELETE FROM public.orders WHERE id = 4;",
    );
    pair.start("wn", "when_needed");
    wait_until(LONG, "the changes made while stopped", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = 3001")
            == 1
            && pair
                .dst
                .count("SELECT count(*) FROM postgres.orders WHERE id = 4")
                == 0
    });
    pair.wait_caught_up("wn");
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id = -1"),
        1
    );
    assert_eq!(table_states(&pair, "wn"), first);
    pair.dst
        .execute("DELETE FROM postgres.orders WHERE id = -1");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");

    // The slot is lost while stopped: the position is no longer usable,
    // so the next start copies again (the destination-only row goes, the
    // changes the lost slot would have carried are in the copy).
    pair.stop("wn");
    let slot = pair.slot_name("wn");
    wait_until(LONG, "the slot released", || {
        pair.src.count(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND NOT active"
        )) == 1
    });
    pair.src
        .execute(&format!("SELECT pg_drop_replication_slot('{slot}')"));
    pair.dst
        .execute("INSERT INTO postgres.orders (id, customer) VALUES (-2, 'marker')");
    pair.src.execute(
        "INSERT INTO public.orders (id, customer) VALUES (3002, 'slot lost');
         UPDATE public.customers SET name = 'slot lost' WHERE id = 5;",
    );
    pair.start("wn", "when_needed");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    let again = table_states(&pair, "wn");
    assert!(
        again.iter().all(|r| r[2].as_deref() == Some("ready")),
        "{again:?}"
    );
    for (a, b) in first.iter().zip(&again) {
        assert_ne!(
            a[3], b[3],
            "copied again: a new copy position\n{first:?}\n{again:?}"
        );
    }
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (3003, 'after the new copy')");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
}

#[test]
fn modes_without_a_postgres_meaning_are_refused() {
    let pair = Pair::new();
    pair.add_connector("rc");
    let mut c = pair.dst.client();
    for (mode, hint_has) in [
        ("recovery", "'always'"),
        (" RECOVERY", "'initial'"),
        ("schema_only_recovery", "'always'"),
        ("schema_only", "'no_data'"),
        ("sometimes", "schemasync"),
        ("", "when_needed"),
    ] {
        for f in ["synchdb_start_engine_bgw", "synchdb_restart_connector"] {
            let e = c
                .batch_execute(&format!("SELECT {f}('rc', '{mode}')"))
                .expect_err(mode);
            let db = e.as_db_error().expect("a server error");
            assert_eq!(db.code().code(), "22023", "{mode}: {}", db.message());
            assert!(db.message().contains("snapshot mode"), "{}", db.message());
            let hint = db.hint().unwrap_or_default();
            assert!(hint.contains(hint_has), "{mode}: {hint}");
        }
    }
    let e = c
        .batch_execute("SELECT synchdb_start_engine_bgw('rc', 'recovery')")
        .expect_err("recovery");
    assert_eq!(
        e.as_db_error().map(|d| d.message().to_string()),
        Some("snapshot mode \"recovery\" does not apply to a PostgreSQL source".into())
    );
    // Nothing was started or recorded, nothing exists on either side.
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM synchdb_state_view WHERE pid > 0"),
        0
    );
    assert_eq!(pair.dst.count("SELECT count(*) FROM synchdb_runtime"), 0);
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM synchdb_conninfo WHERE isactive"),
        0
    );
    assert_eq!(
        pair.src.count("SELECT count(*) FROM pg_replication_slots"),
        0
    );

    // The closest mode the hint names works.
    pair.start("rc", "always");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
}

#[test]
fn schemasync_on_a_streaming_connector_keeps_its_slot_position() {
    let pair = Pair::new();
    pair.add_connector("sp");
    pair.start("sp", "initial");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    let ready = table_states(&pair, "sp");
    pair.stop("sp");
    wait_until(LONG, "stopped", || {
        pair.state("sp").is_some_and(|s| s.pid == -1)
    });

    // A new table while stopped; a review of it started on the connector
    // that already streams: the copied tables keep their state and their
    // slot, whose changes wait (retained) until the resume.
    pair.src.execute(
        "CREATE TABLE public.added (id int PRIMARY KEY, v text);
         INSERT INTO public.added SELECT g, 'v' || g FROM generate_series(1, 50) g;
         UPDATE public.orders SET customer = 'while stopped' WHERE id = 1;",
    );
    pair.start("sp", "schemasync");
    let st = wait_schema_sync_pause(&pair, "sp");
    assert_eq!(
        pair.dst.count("SELECT count(*) FROM postgres.added"),
        0,
        "built empty"
    );
    let states = table_states(&pair, "sp");
    assert_eq!(states.len(), 3, "{states:?}");
    assert_eq!(states[0][2].as_deref(), Some("schema"), "{states:?}");
    assert_eq!(&states[1..], &ready[..], "the copied tables are untouched");
    let slot = pair.slot_name("sp");
    assert_eq!(
        pair.src.count(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND NOT active"
        )),
        1
    );
    pair.src.execute(
        "UPDATE public.orders SET customer = 'during the review' WHERE id = 2;
         DELETE FROM public.orders WHERE id = 3;
         UPDATE public.added SET v = 'during the review' WHERE id = 4;
         DELETE FROM public.added WHERE id = 5;",
    );
    // Nothing applied during the review, to the old tables either.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let now = pair.state("sp").expect("state row");
        assert_eq!((now.pid, now.state.as_str()), (st.pid, "paused"));
        assert_eq!(
            pair.dst
                .query_one_string("SELECT customer FROM postgres.orders WHERE id = 1"),
            Some("customer 1".into())
        );
        assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.added"), 0);
        std::thread::sleep(Duration::from_millis(200));
    }

    pair.dst.execute("SELECT synchdb_resume_engine('sp')");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    pair.wait_tables_equal("public.added", "postgres.added", "id");
    let after = table_states(&pair, "sp");
    assert_eq!(after[0][2].as_deref(), Some("ready"), "{after:?}");
    assert_eq!(
        &after[1..],
        &ready[..],
        "the copied tables are not copied again"
    );
    pair.src.execute(
        "INSERT INTO public.added VALUES (100, 'after'); DELETE FROM public.orders WHERE id = 6;",
    );
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_tables_equal("public.added", "postgres.added", "id");
}
