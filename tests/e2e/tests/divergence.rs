//! Divergence end to end: situations where the destination could silently
//! stop matching the source, one or more tests per failure class.
//!
//! 1. changes older than a table's copy never touch it (`always` restarts,
//!    column types changed while stopped, no endless re-copying);
//! 2. schema read from the stream (tables created and dropped while stopped,
//!    columns added and dropped while stopped, drop + add in one ALTER);
//! 3. volatile column defaults (`gen_random_uuid()`, `clock_timestamp()`);
//! 4. a source table dropped and created again (streaming and stopped);
//! 5. source session settings of the connector's role are pinned;
//! 6. a DBA changing the replica while it streams;
//! 7. connector identity unique per destination server and database;
//! 8. operator tools: `skip`, `set_offset` cleared by stop/start, `lag_bytes`;
//! 10. tables the connector did not create are never emptied.
//!
//! Every test builds its own source and destination, waits on conditions
//! with timeouts and compares rows as `t::text`, ordered by it.

use postgres::{Client, NoTls, SimpleQueryMessage};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};
use synchdb_e2e::*;

const NAME: &str = "pgconn";

// ---------------------------------------------------------------------------
// Helpers.

/// One database of one cluster: a side of a comparison.
#[derive(Clone, Copy)]
struct Db<'a> {
    c: &'a Cluster,
    db: &'a str,
}

fn src(pair: &Pair) -> Db<'_> {
    Db {
        c: &pair.src,
        db: "postgres",
    }
}

fn dst(pair: &Pair) -> Db<'_> {
    Db {
        c: &pair.dst,
        db: "postgres",
    }
}

impl Db<'_> {
    fn query(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        let conn = format!(
            "host={} port={} user=postgres dbname={} connect_timeout=5",
            self.c.dir().display(),
            self.c.port(),
            self.db
        );
        let mut client = Client::connect(&conn, NoTls).map_err(|e| describe(&e))?;
        let msgs = client.simple_query(sql).map_err(|e| describe(&e))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect())
    }

    fn execute(&self, sql: &str) {
        self.c
            .client_db(self.db)
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
    }

    /// The first column of every row (NULL as `<null>`).
    fn column(&self, sql: &str) -> Result<Vec<String>, String> {
        Ok(self
            .query(sql)?
            .into_iter()
            .map(|r| {
                r.into_iter()
                    .next()
                    .flatten()
                    .unwrap_or_else(|| "<null>".into())
            })
            .collect())
    }

    /// A single integer; -1 when the query fails.
    fn count(&self, sql: &str) -> i64 {
        self.column(sql)
            .ok()
            .and_then(|v| v.into_iter().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1)
    }

    fn one(&self, sql: &str) -> Option<String> {
        self.column(sql).ok().and_then(|v| v.into_iter().next())
    }

    /// `(pid, stage, state, err)` of a connector of this database.
    fn state(&self, name: &str) -> Option<(i32, String, String, String)> {
        let rows = self
            .query(&format!(
                "SELECT pid, stage, state, err FROM synchdb_state_view WHERE name = '{name}'"
            ))
            .ok()?;
        rows.into_iter().next().map(|r| {
            let s = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
            (s(0).parse().unwrap_or(-2), s(1), s(2), s(3))
        })
    }

    fn exists(&self, table: &str) -> bool {
        self.count(&format!(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE format('%I.%I', n.nspname, c.relname) = '{table}'"
        )) == 1
    }
}

/// Polls `f` until it holds; on timeout panics with `what` and the
/// connector's state row.
fn wait_reporting(dst: Db, name: &str, timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if f() {
            return;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out after {:?} waiting for {what}; connector {name}: {:?}",
                start.elapsed(),
                dst.state(name)
            );
        }
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// `select` (with `{t}` for the table) on both sides, ordered by its text.
fn rows_of(db: Db, select: &str, table: &str) -> Result<Vec<String>, String> {
    db.column(&format!(
        "SELECT x FROM (SELECT {select} AS x FROM {table} t) s ORDER BY x"
    ))
}

fn wait_rows_equal(a: Db, a_table: &str, b: Db, b_table: &str, select: &str, name: &str) {
    let start = Instant::now();
    loop {
        let ra = rows_of(a, select, a_table);
        let rb = if b.exists(b_table) {
            rows_of(b, select, b_table)
        } else {
            Err(format!("{b_table} does not exist"))
        };
        if let (Ok(x), Ok(y)) = (&ra, &rb) {
            if x == y {
                return;
            }
        }
        if start.elapsed() > LONG {
            let (x, y) = (ra.unwrap_or_default(), rb.clone().unwrap_or_default());
            let only_a: Vec<_> = x.iter().filter(|r| !y.contains(r)).take(10).collect();
            let only_b: Vec<_> = y.iter().filter(|r| !x.contains(r)).take(10).collect();
            panic!(
                "{a_table} ({} rows) and {b_table} ({} rows{}) differ after {:?}\n\
                 only in source: {only_a:?}\nonly in destination: {only_b:?}\nconnector {name}: {:?}",
                x.len(),
                y.len(),
                rb.err().map(|e| format!(", {e}")).unwrap_or_default(),
                start.elapsed(),
                b.state(name)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Source `public.<t>` equals destination `postgres.<t>` as `t::text`.
fn wait_equal(pair: &Pair, t: &str) {
    wait_rows_equal(
        src(pair),
        &format!("public.{t}"),
        dst(pair),
        &format!("postgres.{t}"),
        "t::text",
        NAME,
    );
}

/// The source table's columns, as a `ROW(...)` over them.
fn source_row_expr(pair: &Pair, table: &str) -> String {
    let cols = src(pair)
        .one(&format!(
            "SELECT string_agg(format('t.%I', attname), ', ' ORDER BY attnum) FROM pg_attribute
              WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped"
        ))
        .expect("source columns");
    format!("ROW({cols})::text")
}

/// Polls until `pred` holds for the connector's state row.
fn wait_state(
    db: Db,
    name: &str,
    what: &str,
    pred: impl Fn(&(i32, String, String, String)) -> bool,
) {
    wait_reporting(db, name, LONG, what, || {
        db.state(name).is_some_and(|s| pred(&s))
    });
}

fn wait_ready(pair: &Pair, n: i64) {
    wait_reporting(dst(pair), NAME, LONG, &format!("{n} tables ready"), || {
        pair.dst.count(&format!(
            "SELECT count(*) FROM synchdb_table_state WHERE name = '{NAME}' AND state = 'ready'"
        )) == n
    });
}

fn stop(pair: &Pair) {
    pair.stop(NAME);
    wait_state(dst(pair), NAME, "the worker to stop", |s| s.0 == -1);
}

fn assert_no_error(db: Db, name: &str) {
    wait_state(db, name, "err = 'no error' on a running worker", |s| {
        s.3 == "no error" && s.0 > 0
    });
}

static MARKER: AtomicI32 = AtomicI32::new(1_000_000);

/// A row committed on the source after everything so far, awaited in every
/// destination: once it is applied, every earlier transaction was too.
fn barrier(pair: &Pair, dests: &[(Db, &str)]) {
    let id = MARKER.fetch_add(1, Ordering::SeqCst);
    pair.src.execute(&format!(
        "INSERT INTO public.orders (id, customer) VALUES ({id}, 'barrier')"
    ));
    for (d, name) in dests {
        wait_reporting(*d, name, LONG, &format!("barrier row {id}"), || {
            d.count(&format!(
                "SELECT count(*) FROM postgres.orders WHERE id = {id}"
            )) == 1
        });
    }
}

fn settle(pair: &Pair) {
    barrier(pair, &[(dst(pair), NAME)]);
}

fn stat(pair: &Pair, column: &str) -> i64 {
    pair.dst.count(&format!(
        "SELECT {column} FROM synchdb_stats_view WHERE name = '{NAME}'"
    ))
}

/// Waits until `tables_copied` has not changed for five seconds and
/// returns it; fails if it keeps growing.
fn tables_copied_stable(pair: &Pair) -> i64 {
    let mut last = stat(pair, "tables_copied");
    let mut since = Instant::now();
    wait_reporting(
        dst(pair),
        NAME,
        Duration::from_secs(90),
        "tables_copied to stop growing",
        || {
            let now = stat(pair, "tables_copied");
            if now != last {
                last = now;
                since = Instant::now();
            }
            since.elapsed() >= Duration::from_secs(5)
        },
    );
    last
}

fn no_crash(pair: &Pair) {
    assert!(
        pair.dst.try_query_strings("SELECT 1").is_ok(),
        "the destination does not accept connections"
    );
    let log = pair.dst.log_contents();
    assert!(
        !log.contains("terminated by signal") && !log.contains("was terminated by exception"),
        "a destination process crashed:\n{}",
        log.lines()
            .filter(|l| l.contains("terminated by"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

const T_SETUP: &str = "CREATE TABLE public.t (id int PRIMARY KEY, v int);
     INSERT INTO public.t SELECT g, g * 10 FROM generate_series(1, 20) g;";

/// A pair whose source ran `setup` (plus the sample tables), connector
/// `pgconn` started in `mode` with its snapshot finished.
fn replicate(setup: &str, mode: &str) -> Pair {
    let pair = Pair::new();
    pair.src.execute(setup);
    pair.add_connector(NAME);
    pair.start(NAME, mode);
    let n = pair.src.count(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = 'public' AND c.relkind IN ('r','p') AND NOT c.relispartition",
    );
    wait_ready(&pair, n);
    pair
}

// ---------------------------------------------------------------------------
// 1. Changes older than a table's copy never touch it.

#[test]
fn c1_always_restart_after_add_column_with_default() {
    let pair = replicate(T_SETUP, "always");
    wait_equal(&pair, "t");
    stop(&pair);
    pair.src.execute(
        "UPDATE public.t SET v = -v WHERE id = 1;
         INSERT INTO public.t VALUES (30, 300);
         ALTER TABLE public.t ADD COLUMN c int DEFAULT 7;
         UPDATE public.t SET c = id WHERE id % 2 = 0;
         INSERT INTO public.t VALUES (21, 210, 2100), (22, 220, NULL);
         INSERT INTO public.t (id, v) VALUES (23, 230);",
    );
    pair.start(NAME, "always");
    wait_equal(&pair, "t");
    settle(&pair);
    wait_equal(&pair, "t");
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.t WHERE c = id AND id % 2 = 0 AND id <= 20"),
        10
    );
    assert_no_error(dst(&pair), NAME);
    pair.src.execute(
        "INSERT INTO public.t VALUES (24, 240, 1); UPDATE public.t SET c = 0 WHERE id = 1",
    );
    wait_equal(&pair, "t");
}

/// While stopped, a column changes type and rows are updated; started again
/// in `mode`, the table equals the source and is not copied over and over.
fn alter_type_while_stopped(mode: &str) {
    let pair = replicate(T_SETUP, mode);
    wait_equal(&pair, "t");
    stop(&pair);
    pair.src.execute(
        "UPDATE public.t SET v = v + 1 WHERE id <= 5;
         ALTER TABLE public.t ALTER COLUMN v TYPE bigint;
         UPDATE public.t SET v = v * 10000000000 WHERE id % 3 = 0;
         INSERT INTO public.t VALUES (100, 9000000000000);
         DELETE FROM public.t WHERE id = 2;",
    );
    pair.start(NAME, mode);
    wait_equal(&pair, "t");
    settle(&pair);
    wait_equal(&pair, "t");
    assert_eq!(
        pair.dst
            .query_one_string(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = 'postgres.t'::regclass AND attname = 'v'"
            )
            .as_deref(),
        Some("bigint")
    );
    assert_no_error(dst(&pair), NAME);
    let copied = tables_copied_stable(&pair);
    pair.src
        .execute("INSERT INTO public.t VALUES (101, 1); UPDATE public.t SET v = 5 WHERE id = 1");
    wait_equal(&pair, "t");
    settle(&pair);
    assert_eq!(
        stat(&pair, "tables_copied"),
        copied,
        "tables were copied again after catching up"
    );
    assert_no_error(dst(&pair), NAME);
}

#[test]
fn c1_initial_restart_after_alter_column_type() {
    alter_type_while_stopped("initial");
}

#[test]
fn c1_always_restart_after_alter_column_type() {
    alter_type_while_stopped("always");
}

// ---------------------------------------------------------------------------
// 2. Schema from the stream.

#[test]
fn c2a_table_created_and_dropped_while_stopped() {
    let pair = replicate(T_SETUP, "initial");
    stop(&pair);
    pair.src.execute(
        "CREATE TABLE public.tmp (id int PRIMARY KEY, note text);
         INSERT INTO public.tmp SELECT g, 'tmp ' || g FROM generate_series(1, 10) g;
         UPDATE public.tmp SET note = 'changed' WHERE id = 1;
         CREATE TABLE public.keep (id int PRIMARY KEY, note text);
         INSERT INTO public.keep SELECT g, 'keep ' || g FROM generate_series(1, 10) g;
         DROP TABLE public.tmp;
         UPDATE public.keep SET note = 'after the drop' WHERE id = 2;
         INSERT INTO public.t VALUES (21, 210);",
    );
    pair.start(NAME, "initial");
    wait_equal(&pair, "keep");
    wait_equal(&pair, "t");
    settle(&pair);
    assert_no_error(dst(&pair), NAME);
    // Later changes to existing tables still replicate.
    pair.src.execute(
        "INSERT INTO public.t VALUES (22, 220); UPDATE public.t SET v = 0 WHERE id = 1;
         INSERT INTO public.keep VALUES (11, 'later');",
    );
    wait_equal(&pair, "t");
    wait_equal(&pair, "keep");
    settle(&pair);
    assert_no_error(dst(&pair), NAME);
}

#[test]
fn c2b_column_added_and_dropped_while_stopped() {
    let pair = replicate(T_SETUP, "initial");
    stop(&pair);
    pair.src.execute(
        "UPDATE public.t SET v = -v WHERE id = 1;
         ALTER TABLE public.t ADD COLUMN x int;
         UPDATE public.t SET x = 1;
         ALTER TABLE public.t DROP COLUMN x;
         UPDATE public.t SET v = v + 1 WHERE id <= 3;
         INSERT INTO public.t VALUES (21, 210);
         DELETE FROM public.t WHERE id = 4;",
    );
    pair.start(NAME, "initial");
    wait_equal(&pair, "t");
    settle(&pair);
    wait_equal(&pair, "t");
    assert_no_error(dst(&pair), NAME);
    pair.src
        .execute("INSERT INTO public.t VALUES (22, 220); UPDATE public.t SET v = 0 WHERE id = 5");
    wait_equal(&pair, "t");
    assert_no_error(dst(&pair), NAME);
}

#[test]
fn c2c_drop_and_add_column_of_same_type_in_one_alter() {
    let pair = replicate(
        "CREATE TABLE public.t (id int PRIMARY KEY, a text, v int);
         INSERT INTO public.t SELECT g, 'old-' || g, g FROM generate_series(1, 10) g;",
        "initial",
    );
    wait_equal(&pair, "t");
    pair.src.execute(
        "ALTER TABLE public.t DROP COLUMN a, ADD COLUMN b text;
         UPDATE public.t SET b = 'new-' || id WHERE id % 2 = 0;",
    );
    // Rows not updated have b NULL: b is a new column, not a renamed a.
    wait_equal(&pair, "t");
    pair.src.execute("UPDATE public.t SET b = 'new-' || id");
    wait_equal(&pair, "t");
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'postgres.t'::regclass
              AND attname = 'a' AND NOT attisdropped"
        ),
        0,
        "the dropped column is still in the destination"
    );
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.t WHERE b = 'new-' || id"),
        10
    );
    assert_no_error(dst(&pair), NAME);
}

// ---------------------------------------------------------------------------
// 3. Volatile defaults.

#[test]
fn c3_volatile_defaults_of_added_columns() {
    let pair = replicate(
        "CREATE TABLE public.t (id int PRIMARY KEY, v text);
         INSERT INTO public.t SELECT g, 'v' || g FROM generate_series(1, 100) g;",
        "initial",
    );
    wait_equal(&pair, "t");
    pair.src.execute(
        "ALTER TABLE public.t ADD COLUMN u uuid DEFAULT gen_random_uuid();
         ALTER TABLE public.t ADD COLUMN ts timestamptz DEFAULT clock_timestamp();
         INSERT INTO public.t (id, v) VALUES (101, 'after');",
    );
    // Each source row has its own value.
    assert_eq!(
        pair.src.count("SELECT count(DISTINCT u) FROM public.t"),
        101
    );
    wait_equal(&pair, "t");
    settle(&pair);
    wait_equal(&pair, "t");
    assert_no_error(dst(&pair), NAME);
    pair.src
        .execute("INSERT INTO public.t (id, v) VALUES (102, 'later'); UPDATE public.t SET v = 'x' WHERE id = 1");
    wait_equal(&pair, "t");
}

// ---------------------------------------------------------------------------
// 4. A source table dropped and created again.

const T4_SETUP: &str = "CREATE TABLE public.t (id int PRIMARY KEY, v text);
     INSERT INTO public.t SELECT g, 'first ' || g FROM generate_series(1, 10) g;";

const T4_RECREATE: &str = "DROP TABLE public.t;
     CREATE TABLE public.t (id int PRIMARY KEY, v text);
     INSERT INTO public.t SELECT g, 'second ' || g FROM generate_series(1, 5) g;";

#[test]
fn c4_table_dropped_and_recreated_while_streaming() {
    let pair = replicate(T4_SETUP, "initial");
    wait_equal(&pair, "t");
    pair.src.execute(T4_RECREATE);
    wait_equal(&pair, "t");
    settle(&pair);
    wait_equal(&pair, "t");
    assert_no_error(dst(&pair), NAME);
    pair.src.execute(
        "INSERT INTO public.t VALUES (6, 'third'); UPDATE public.t SET v = 'upd' WHERE id = 1",
    );
    wait_equal(&pair, "t");
}

#[test]
fn c4_table_dropped_and_recreated_while_stopped() {
    let pair = replicate(T4_SETUP, "initial");
    wait_equal(&pair, "t");
    stop(&pair);
    pair.src.execute(T4_RECREATE);
    pair.start(NAME, "initial");
    wait_equal(&pair, "t");
    settle(&pair);
    wait_equal(&pair, "t");
    assert_no_error(dst(&pair), NAME);
    pair.src.execute(
        "INSERT INTO public.t VALUES (6, 'third'); UPDATE public.t SET v = 'upd' WHERE id = 1",
    );
    wait_equal(&pair, "t");
}

// ---------------------------------------------------------------------------
// 5. Source session settings pinned.

#[test]
fn c5_source_role_settings_do_not_change_values() {
    let pair = Pair::new();
    pair.src.execute(
        "CREATE ROLE fmt LOGIN SUPERUSER REPLICATION PASSWORD 'fmtpass';
         ALTER ROLE fmt SET datestyle = 'SQL, DMY';
         ALTER ROLE fmt SET extra_float_digits = 0;
         ALTER ROLE fmt SET intervalstyle = 'sql_standard';
         ALTER ROLE fmt SET bytea_output = 'escape';
         CREATE TABLE public.vals (id int PRIMARY KEY, d date, ts timestamp, tstz timestamptz,
                                   f4 real, f8 double precision, iv interval, ba bytea);
         ALTER TABLE public.vals OWNER TO fmt;
         INSERT INTO public.vals VALUES
           (1, '2024-03-04', '2024-03-04 05:06:07.123456', '2024-03-04 05:06:07.5+02',
            1.1, 0.1::float8 + 0.2::float8, '1 year 2 mons 3 days 04:05:06', '\\x00ff5c'),
           (2, '2001-12-13', '2001-12-13 23:59:59', '2001-12-13 00:00:00+00',
            3.14159, 1e-300, '-1 year 2 mons -3 days 04:05:06.5', '\\x5c27'),
           (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL);",
    );
    // The role's settings really apply to its sessions.
    let mut fmt = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=fmt password=fmtpass dbname=postgres",
            pair.src.port()
        ),
        NoTls,
    )
    .expect("connect as fmt");
    let d: String = fmt
        .query_one("SELECT d::text FROM public.vals WHERE id = 1", &[])
        .expect("query as fmt")
        .get(0);
    assert_eq!(d, "04/03/2024");
    pair.dst.execute(&format!(
        "SELECT synchdb_add_conninfo('{NAME}','127.0.0.1',{},'fmt','fmtpass','postgres','public','null','null','postgres')",
        pair.src.port()
    ));
    pair.start(NAME, "initial");
    wait_ready(&pair, 3);
    // Snapshot.
    wait_equal(&pair, "vals");
    // Change data capture.
    pair.src.execute(
        "INSERT INTO public.vals VALUES
           (11, '2024-03-04', '2024-03-04 05:06:07.123456', '2024-03-04 05:06:07.5+02',
            1.1, 0.1::float8 + 0.2::float8, '1 year 2 mons 3 days 04:05:06', '\\x00ff5c'),
           (12, '2001-12-13', '2001-12-13 23:59:59', '2001-12-13 00:00:00+00',
            3.14159, 1e-300, '-1 year 2 mons -3 days 04:05:06.5', '\\x5c27');
         UPDATE public.vals SET f8 = 0.3::float8 + 0.6::float8, d = '2024-01-02' WHERE id = 2;",
    );
    wait_equal(&pair, "vals");
    assert_eq!(
        pair.dst
            .query_one_string("SELECT d::text FROM postgres.vals WHERE id = 11")
            .as_deref(),
        Some("2024-03-04")
    );
    assert_no_error(dst(&pair), NAME);
}

// ---------------------------------------------------------------------------
// 6. A DBA on the replica while it streams.

#[test]
fn c6_dba_columns_index_and_trigger_on_the_replica() {
    let pair = replicate(
        "CREATE TABLE public.t (id int PRIMARY KEY, v text, n int);
         INSERT INTO public.t SELECT g, 'v' || g, g FROM generate_series(1, 100) g;",
        "initial",
    );
    wait_equal(&pair, "t");
    let connect = pair.src.spawn_client();
    let writer = std::thread::spawn(move || {
        let mut c = connect();
        for i in 0..1000 {
            c.batch_execute(&format!(
                "INSERT INTO public.t VALUES ({}, 'w{i}', {i});
                 UPDATE public.t SET n = n + 1, v = v || '.' WHERE id = {};",
                1000 + i,
                i % 100 + 1
            ))
            .expect("source write");
        }
    });
    // The DBA's changes while the writer's rows stream in.
    wait_reporting(dst(&pair), NAME, LONG, "the writer's first rows", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.t WHERE id >= 1000")
            > 0
    });
    for ddl in [
        "ALTER TABLE postgres.t ADD COLUMN dba_flag int",
        "ALTER TABLE postgres.t ADD COLUMN note text DEFAULT 'dba'",
        "CREATE INDEX t_v_dba ON postgres.t (v)",
        "CREATE FUNCTION public.dba_fn() RETURNS trigger LANGUAGE plpgsql AS
           $$BEGIN NEW.note := 'trigger'; RETURN NEW; END$$",
        "CREATE TRIGGER dba_t BEFORE INSERT OR UPDATE ON postgres.t
           FOR EACH ROW EXECUTE FUNCTION public.dba_fn()",
    ] {
        pair.dst.execute(ddl);
    }
    writer.join().expect("writer");
    pair.src
        .execute("INSERT INTO public.t VALUES (5000, 'after the DBA', 0)");
    let cols = source_row_expr(&pair, "public.t");
    wait_rows_equal(
        src(&pair),
        "public.t",
        dst(&pair),
        "postgres.t",
        &cols,
        NAME,
    );
    no_crash(&pair);
    assert_no_error(dst(&pair), NAME);
    let dba_cols = "SELECT string_agg(attname, ',' ORDER BY attname) FROM pg_attribute
                     WHERE attrelid = 'postgres.t'::regclass AND attname IN ('dba_flag', 'note')
                       AND NOT attisdropped";
    assert_eq!(
        pair.dst.query_one_string(dba_cols).as_deref(),
        Some("dba_flag,note")
    );
    // New rows get the DBA column's default (the ordinary trigger does not
    // fire for replicated rows).
    assert_eq!(
        pair.dst.query_one_string(
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM postgres.t
              WHERE note IS DISTINCT FROM 'dba'"
        ),
        None,
        "rows without the DBA column's default (ids)"
    );
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'postgres' AND indexname = 't_v_dba'"
        ),
        1
    );

    // A source schema change keeps the destination-only columns.
    pair.src.execute(
        "ALTER TABLE public.t ADD COLUMN extra int;
         INSERT INTO public.t VALUES (5001, 'with extra', 1, 42);
         UPDATE public.t SET extra = 7 WHERE id = 1;",
    );
    let cols = source_row_expr(&pair, "public.t");
    wait_rows_equal(
        src(&pair),
        "public.t",
        dst(&pair),
        "postgres.t",
        &cols,
        NAME,
    );
    no_crash(&pair);
    assert_eq!(
        pair.dst.query_one_string(dba_cols).as_deref(),
        Some("dba_flag,note"),
        "the DBA's columns were dropped"
    );
    assert_eq!(
        pair.dst
            .query_one_string("SELECT note FROM postgres.t WHERE id = 5001")
            .as_deref(),
        Some("dba")
    );
    assert_no_error(dst(&pair), NAME);
}

/// The DBA's columns (and an ordinary trigger) added in one transaction
/// while the connector idles, before the table's next change arrives.
#[test]
fn c6_dba_columns_added_before_the_next_change() {
    let pair = replicate(
        "CREATE TABLE public.t (id int PRIMARY KEY, v text, n int);
         INSERT INTO public.t SELECT g, 'v' || g, g FROM generate_series(1, 20) g;",
        "initial",
    );
    wait_equal(&pair, "t");
    settle(&pair);
    pair.dst.execute(
        "ALTER TABLE postgres.t ADD COLUMN dba_flag int;
         ALTER TABLE postgres.t ADD COLUMN note text DEFAULT 'dba';
         CREATE INDEX t_v_dba ON postgres.t (v);
         CREATE FUNCTION public.dba_fn() RETURNS trigger LANGUAGE plpgsql AS
           $$BEGIN NEW.note := 'trigger'; RETURN NEW; END$$;
         CREATE TRIGGER dba_t BEFORE INSERT OR UPDATE ON postgres.t
           FOR EACH ROW EXECUTE FUNCTION public.dba_fn();",
    );
    pair.src.execute(
        "INSERT INTO public.t VALUES (21, 'new', 21);
         UPDATE public.t SET v = 'upd' WHERE id = 1;",
    );
    pair.src
        .execute("INSERT INTO public.t VALUES (22, 'newer', 22)");
    let cols = source_row_expr(&pair, "public.t");
    wait_rows_equal(
        src(&pair),
        "public.t",
        dst(&pair),
        "postgres.t",
        &cols,
        NAME,
    );
    no_crash(&pair);
    assert_no_error(dst(&pair), NAME);
    assert_eq!(
        pair.dst.query_one_string(
            "SELECT string_agg(format('%s:%s:%s', id, note, dba_flag), ',' ORDER BY id)
               FROM postgres.t WHERE note IS DISTINCT FROM 'dba' OR dba_flag IS NOT NULL"
        ),
        None,
        "rows without the DBA columns' defaults (id:note:dba_flag)"
    );
    // Restarted, in 'initial' and 'always', the DBA's columns stay.
    for mode in ["initial", "always"] {
        stop(&pair);
        pair.src.execute(&format!(
            "INSERT INTO public.t VALUES (30 + length('{mode}'), '{mode}', 0)"
        ));
        pair.start(NAME, mode);
        let cols = source_row_expr(&pair, "public.t");
        wait_rows_equal(
            src(&pair),
            "public.t",
            dst(&pair),
            "postgres.t",
            &cols,
            NAME,
        );
        settle(&pair);
        assert_eq!(
            pair.dst.count(
                "SELECT count(*) FROM pg_attribute WHERE attrelid = 'postgres.t'::regclass
                  AND attname IN ('dba_flag', 'note') AND NOT attisdropped"
            ),
            2,
            "the DBA's columns after a start in {mode}"
        );
        assert_no_error(dst(&pair), NAME);
    }
}

/// The DBA's ALTER TABLE holds its lock while changes to the table arrive:
/// the worker waits for it, then applies with the table's new shape.
#[test]
fn c6_dba_alter_committed_while_the_worker_waits_on_it() {
    let pair = replicate(
        "CREATE TABLE public.t (id int PRIMARY KEY, v text, n int);
         INSERT INTO public.t SELECT g, 'v' || g, g FROM generate_series(1, 20) g;",
        "initial",
    );
    wait_equal(&pair, "t");
    settle(&pair);
    let worker = pair.state(NAME).expect("state row").pid;
    let mut dba = pair.dst.client();
    dba.batch_execute(
        "BEGIN;
         ALTER TABLE postgres.t ADD COLUMN dba_flag int;
         ALTER TABLE postgres.t ADD COLUMN note text DEFAULT 'dba';",
    )
    .expect("the DBA's ALTER");
    for i in 21..=30 {
        pair.src.execute(&format!(
            "INSERT INTO public.t VALUES ({i}, 'new', {i}); UPDATE public.t SET n = -n WHERE id = {}",
            i - 20
        ));
    }
    wait_reporting(
        dst(&pair),
        NAME,
        LONG,
        "the worker to wait on the DBA's lock",
        || {
            pair.dst.count(&format!(
                "SELECT count(*) FROM pg_locks WHERE pid = {worker} AND NOT granted"
            )) > 0
        },
    );
    dba.batch_execute(
        "CREATE INDEX t_v_dba ON postgres.t (v);
         CREATE FUNCTION public.dba_fn() RETURNS trigger LANGUAGE plpgsql AS
           $$BEGIN NEW.note := 'trigger'; RETURN NEW; END$$;
         CREATE TRIGGER dba_t BEFORE INSERT OR UPDATE ON postgres.t
           FOR EACH ROW EXECUTE FUNCTION public.dba_fn();
         COMMIT;",
    )
    .expect("the DBA's commit");
    let cols = source_row_expr(&pair, "public.t");
    wait_rows_equal(
        src(&pair),
        "public.t",
        dst(&pair),
        "postgres.t",
        &cols,
        NAME,
    );
    no_crash(&pair);
    assert_no_error(dst(&pair), NAME);
    assert_eq!(
        pair.dst.query_one_string(
            "SELECT string_agg(format('%s:%s:%s', id, note, dba_flag), ',' ORDER BY id)
               FROM postgres.t WHERE note IS DISTINCT FROM 'dba' OR dba_flag IS NOT NULL"
        ),
        None,
        "rows without the DBA columns' defaults (id:note:dba_flag)"
    );
}

// ---------------------------------------------------------------------------
// 7. Connector identity unique per destination server and database.

fn add_on(d: Db, src_port: u16) {
    d.execute(&format!(
        "SELECT synchdb_add_conninfo('{NAME}','127.0.0.1',{src_port},'myuser','mypass','postgres','public','null','null','postgres')"
    ));
    d.execute(&format!(
        "SELECT synchdb_start_engine_bgw('{NAME}', 'initial')"
    ));
}

fn both_replicate(pair: &Pair, a: Db, b: Db) {
    for d in [a, b] {
        wait_reporting(d, NAME, LONG, "the snapshot", || {
            d.count(&format!(
                "SELECT count(*) FROM synchdb_table_state WHERE name = '{NAME}' AND state = 'ready'"
            )) == 2
        });
        wait_rows_equal(
            src(pair),
            "public.orders",
            d,
            "postgres.orders",
            "t::text",
            NAME,
        );
        wait_rows_equal(
            src(pair),
            "public.customers",
            d,
            "postgres.customers",
            "t::text",
            NAME,
        );
    }
    pair.src.execute(
        "INSERT INTO public.orders (id, customer) SELECT g, 'cdc' FROM generate_series(2001, 2010) g;
         UPDATE public.customers SET name = 'cdc' WHERE id <= 3;
         DELETE FROM public.orders WHERE id = 1;",
    );
    for d in [a, b] {
        wait_rows_equal(
            src(pair),
            "public.orders",
            d,
            "postgres.orders",
            "t::text",
            NAME,
        );
        wait_rows_equal(
            src(pair),
            "public.customers",
            d,
            "postgres.customers",
            "t::text",
            NAME,
        );
    }
    barrier(pair, &[(a, NAME), (b, NAME)]);
    pair.src
        .execute("INSERT INTO public.customers (name) VALUES ('last')");
    for d in [a, b] {
        wait_rows_equal(
            src(pair),
            "public.customers",
            d,
            "postgres.customers",
            "t::text",
            NAME,
        );
        wait_state(d, NAME, "no error on a running worker", |s| {
            s.3 == "no error" && s.0 > 0
        });
    }
}

#[test]
fn c7_same_connector_name_on_two_destination_servers() {
    let pair = Pair::new();
    let other = Cluster::destination();
    other.execute("CREATE EXTENSION synchdb");
    let second = Db {
        c: &other,
        db: "postgres",
    };
    add_on(dst(&pair), pair.src.port());
    add_on(second, pair.src.port());
    both_replicate(&pair, dst(&pair), second);
}

#[test]
fn c7_same_connector_name_in_two_databases_of_one_server() {
    let pair = Pair::new();
    pair.dst.execute("CREATE DATABASE d2");
    let d2 = Db {
        c: &pair.dst,
        db: "d2",
    };
    d2.execute("CREATE EXTENSION synchdb");
    add_on(dst(&pair), pair.src.port());
    add_on(d2, pair.src.port());
    both_replicate(&pair, dst(&pair), d2);
}

// ---------------------------------------------------------------------------
// 8. Operator tools.

#[test]
fn c8a_skip_drops_exactly_the_failing_change() {
    let pair = Pair::new();
    pair.src.execute(
        "CREATE TABLE public.t (id int PRIMARY KEY, v text);
         INSERT INTO public.t SELECT g, 'v' || g FROM generate_series(1, 5) g;",
    );
    pair.dst
        .execute("ALTER SYSTEM SET synchdb.error_handling_strategy = 'skip'");
    pair.dst.execute("SELECT pg_reload_conf()");
    wait_until(LONG, "skip in effect", || {
        pair.dst
            .query_one_string("SELECT lower(current_setting('synchdb.error_handling_strategy'))")
            .as_deref()
            == Some("skip")
    });
    pair.add_connector(NAME);
    pair.start(NAME, "initial");
    wait_ready(&pair, 3);
    wait_equal(&pair, "t");
    pair.dst
        .execute("ALTER TABLE postgres.t ADD CONSTRAINT no13 CHECK (id <> 13)");
    pair.src.execute(
        "BEGIN;
         INSERT INTO public.t SELECT g, 'v' || g FROM generate_series(10, 20) g;
         COMMIT;",
    );
    pair.src.execute(
        "BEGIN;
         INSERT INTO public.t SELECT g, 'v' || g FROM generate_series(21, 22) g;
         COMMIT;",
    );
    wait_reporting(dst(&pair), NAME, LONG, "row 22", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.t WHERE id = 22")
            == 1
    });
    wait_rows_equal(
        src(&pair),
        "(SELECT * FROM public.t WHERE id <> 13)",
        dst(&pair),
        "postgres.t",
        "t::text",
        NAME,
    );
    wait_reporting(dst(&pair), NAME, LONG, "the skipped change counted", || {
        stat(&pair, "bad_changes") >= 1
    });
    assert_eq!(stat(&pair, "bad_changes"), 1);
}

#[test]
fn c8b_set_offset_is_forgotten_by_stop_and_start() {
    let pair = Pair::new();
    // No primary key: a change applied twice shows as a duplicate row.
    pair.src.execute(
        "CREATE TABLE public.log (id int, v text);
         ALTER TABLE public.log REPLICA IDENTITY FULL;
         INSERT INTO public.log SELECT g, 'snap' FROM generate_series(1, 5) g;",
    );
    pair.add_connector(NAME);
    pair.start(NAME, "initial");
    wait_ready(&pair, 3);
    let before = pair
        .src
        .query_one_string("SELECT pg_current_wal_lsn()::text")
        .expect("lsn");
    pair.src
        .execute("INSERT INTO public.log SELECT g, 'cdc' FROM generate_series(10, 14) g");
    wait_equal(&pair, "log");
    settle(&pair);

    // An earlier position left pending: applying it would duplicate rows.
    pair.dst
        .execute(&format!("SELECT synchdb_pause_engine('{NAME}')"));
    wait_state(dst(&pair), NAME, "paused", |s| s.2 == "paused");
    pair.dst
        .execute(&format!("SELECT synchdb_set_offset('{NAME}', '{before}')"));
    stop(&pair);
    pair.start(NAME, "initial");
    pair.src
        .execute("INSERT INTO public.log SELECT g, 'after restart' FROM generate_series(20, 22) g");
    wait_equal(&pair, "log");
    settle(&pair);
    wait_equal(&pair, "log");
    assert_no_error(dst(&pair), NAME);

    // A later position left pending: applying it would lose rows.
    pair.dst
        .execute(&format!("SELECT synchdb_pause_engine('{NAME}')"));
    wait_state(dst(&pair), NAME, "paused", |s| s.2 == "paused");
    pair.src
        .execute("INSERT INTO public.log SELECT g, 'while paused' FROM generate_series(30, 32) g");
    let later = pair
        .src
        .query_one_string("SELECT pg_current_wal_lsn()::text")
        .expect("lsn");
    pair.dst
        .execute(&format!("SELECT synchdb_set_offset('{NAME}', '{later}')"));
    stop(&pair);
    pair.start(NAME, "initial");
    pair.src
        .execute("INSERT INTO public.log VALUES (40, 'after second restart')");
    wait_equal(&pair, "log");
    settle(&pair);
    wait_equal(&pair, "log");
    assert_no_error(dst(&pair), NAME);
}

#[test]
fn c8c_lag_bytes_zero_when_caught_up_positive_while_paused() {
    let pair = replicate(T_SETUP, "initial");
    pair.src.execute("INSERT INTO public.t VALUES (21, 210)");
    wait_equal(&pair, "t");
    settle(&pair);
    wait_reporting(
        dst(&pair),
        NAME,
        LONG,
        "lag_bytes = 0 once caught up",
        || stat(&pair, "lag_bytes") == 0,
    );
    pair.dst
        .execute(&format!("SELECT synchdb_pause_engine('{NAME}')"));
    wait_state(dst(&pair), NAME, "paused", |s| s.2 == "paused");
    pair.src.execute(
        "INSERT INTO public.t SELECT g, g FROM generate_series(100, 1100) g;
         UPDATE public.t SET v = 0 WHERE id <= 10;",
    );
    wait_reporting(dst(&pair), NAME, LONG, "lag_bytes > 0 while paused", || {
        stat(&pair, "lag_bytes") > 0
    });
    // Nothing was applied meanwhile.
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.t WHERE id >= 100"),
        0
    );
    pair.dst
        .execute(&format!("SELECT synchdb_resume_engine('{NAME}')"));
    wait_equal(&pair, "t");
    settle(&pair);
    wait_reporting(
        dst(&pair),
        NAME,
        LONG,
        "lag_bytes = 0 after resuming",
        || stat(&pair, "lag_bytes") == 0,
    );
}

// ---------------------------------------------------------------------------
// 10. Tables the connector did not create are never emptied.

const DBA_TABLE: &str = "CREATE SCHEMA postgres;
     CREATE TABLE postgres.t (id int PRIMARY KEY, v text);
     INSERT INTO postgres.t VALUES (1, 'dba 1'), (2, 'dba 2'), (3, 'dba 3');";

const DBA_ROWS: &str = "(1,\"dba 1\"),(2,\"dba 2\"),(3,\"dba 3\")";

fn dst_t(pair: &Pair) -> Option<String> {
    pair.dst
        .query_one_string("SELECT string_agg(t::text, ',' ORDER BY id) FROM postgres.t t")
}

#[test]
fn c10_initial_does_not_empty_a_table_it_did_not_create() {
    let pair = Pair::new();
    pair.src.execute(
        "CREATE TABLE public.t (id int PRIMARY KEY, v text);
         INSERT INTO public.t VALUES (1, 'source 1'), (5, 'source 5');",
    );
    pair.dst.execute(DBA_TABLE);
    pair.add_connector(NAME);
    pair.start(NAME, "initial");
    let names_table = |err: &str| err.contains("postgres.t") || err.contains("\"t\"");
    wait_reporting(
        dst(&pair),
        NAME,
        LONG,
        "an error naming postgres.t, or the table's rows touched",
        || {
            dst_t(&pair).as_deref() != Some(DBA_ROWS)
                || pair.state(NAME).is_some_and(|s| names_table(&s.err))
                || pair.dst.count(&format!(
                    "SELECT count(*) FROM synchdb_table_state WHERE name = '{NAME}'
                        AND src_table = 't' AND state = 'ready'"
                )) == 1
        },
    );
    assert_eq!(
        dst_t(&pair).as_deref(),
        Some(DBA_ROWS),
        "the DBA's table was changed"
    );
    let st = pair.state(NAME).expect("state row");
    assert!(names_table(&st.err), "err does not name the table: {st:?}");
}

#[test]
fn c10_never_uses_the_table_as_is() {
    let pair = Pair::new();
    pair.src.execute(
        "CREATE TABLE public.t (id int PRIMARY KEY, v text);
         INSERT INTO public.t VALUES (1, 'source 1'), (5, 'source 5');",
    );
    pair.dst.execute(DBA_TABLE);
    pair.add_connector_with(NAME, "public.t", "null");
    pair.start(NAME, "never");
    wait_state(dst(&pair), NAME, "streaming", |s| {
        s.1 == "change data capture" && s.0 > 0
    });
    pair.src.execute(
        "INSERT INTO public.t VALUES (10, 'source 10'), (11, 'source 11');
         UPDATE public.t SET v = 'updated 10' WHERE id = 10;",
    );
    wait_reporting(dst(&pair), NAME, LONG, "the streamed rows", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.t WHERE id = 10 AND v = 'updated 10'")
            == 1
    });
    assert_eq!(
        dst_t(&pair).as_deref(),
        Some("(1,\"dba 1\"),(2,\"dba 2\"),(3,\"dba 3\"),(10,\"updated 10\"),(11,\"source 11\")")
    );
    assert_no_error(dst(&pair), NAME);
}

// ---------------------------------------------------------------------------
// A primary key changed on the source: the destination's key follows (a
// fresh copy), so rows the new key allows are not rejected.

#[test]
fn primary_key_changed_on_the_source() {
    let pair = replicate(T_SETUP, "initial");
    wait_equal(&pair, "t");
    pair.src.execute(
        "ALTER TABLE public.t DROP CONSTRAINT t_pkey;
         ALTER TABLE public.t ALTER COLUMN v SET NOT NULL, ADD PRIMARY KEY (id, v);
         INSERT INTO public.t VALUES (1, 11), (1, 12), (2, 21);
         UPDATE public.t SET v = v + 1 WHERE id = 3;",
    );
    wait_equal(&pair, "t");
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid
                 AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = 'postgres.t'::regclass AND i.indisprimary"
        ),
        2,
        "the destination key is (id, v)"
    );
    assert_no_error(dst(&pair), NAME);
}
