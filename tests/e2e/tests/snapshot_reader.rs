//! The snapshot reader end to end: a second source connection in the
//! exported snapshot reads each table's COPY on a thread of its own, and
//! `char(n)` values lose their trailing blanks on the way (the
//! destination pads them again). The stored values must be exactly the
//! source's, for every kind of blank-padded and unpadded character value;
//! and a DDL queued behind the snapshot's lock makes the reader step aside
//! (the worker copies that table on its own connection) instead of
//! wedging the copy.

use synchdb_e2e::*;

/// Every column's stored bytes, row by row, in one digest (the send
/// functions show exactly what is stored, blanks included).
fn stored(c: &Cluster, table: &str) -> Option<String> {
    c.query_one_string(&format!(
        "SELECT count(*) || '/' || md5(string_agg(concat_ws('|', id,
                coalesce(encode(bpcharsend(c1), 'hex'), 'N'), coalesce(encode(bpcharsend(c5), 'hex'), 'N'),
                coalesce(encode(bpcharsend(c10), 'hex'), 'N'), coalesce(encode(bpcharsend(bp), 'hex'), 'N'),
                coalesce(encode(charsend(ch), 'hex'), 'N'), coalesce(ac::text, 'N'),
                coalesce(encode(varcharsend(v), 'hex'), 'N'), coalesce(encode(textsend(t), 'hex'), 'N'),
                pg_column_size(c10), pg_column_size(bp)), ',' ORDER BY id))
           FROM {table}"
    ))
}

/// Blank-padded and unpadded character values of every kind, NULLs and
/// 20 000 more rows (several chunks).
fn chars_table(pair: &Pair) {
    pair.src.execute(
        "CREATE TABLE public.chars (id int PRIMARY KEY, c1 char(1), c5 char(5), c10 char(10),
                                    bp bpchar, ch \"char\", ac char(3)[], v varchar(6), t text);
         INSERT INTO public.chars VALUES
           (1, 'a', 'ab', 'abc       ', 'ab   ', 'x', '{\"a  \",\" b \",NULL}', 'ab  ', 'ab  '),
           (2, ' ', '     ', '', '   ', ' ', '{\"   \"}', '  ', '  '),
           (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
           (4, 'é', 'é é ', '日本 語  ', '日本  ', 'y', '{\"é  \"}', 'é ', 'é '),
           (5, 'z', '  lea', '  a  b', '  lead  ', 'z', '{}', ' a ', E'\\t '),
           (6, 'q', E'tab\\t', E'nl\\n  ', E'\\t  ', 'q', '{\"\"}', '', '');
         INSERT INTO public.chars
           SELECT g, chr(65 + g % 26), repeat('x', g % 6), repeat('y', g % 11), repeat('w', g % 7) || '  ',
                  'c', ARRAY[repeat('v', g % 4)], repeat('u', g % 7), repeat('t ', g % 5)
             FROM generate_series(100, 20099) g;",
    );
}

#[test]
fn char_values_are_stored_exactly_as_on_the_source() {
    let pair = Pair::new();
    chars_table(&pair);
    pair.add_connector("rd");
    pair.start("rd", "initial");
    wait_until(LONG, "chars copied", || {
        pair.dst
            .count("SELECT count(*) FROM synchdb_table_state WHERE name = 'rd' AND src_table = 'chars' AND state = 'ready'")
            == 1
    });
    assert_eq!(
        stored(&pair.dst, "postgres.chars"),
        stored(&pair.src, "public.chars")
    );
    pair.assert_tables_equal("public.chars", "postgres.chars", "id");
    // Copied by the reader (it did not step aside).
    let log = pair.dst.log_contents();
    assert!(!log.contains("snapshot reader cannot copy"), "{log}");
    assert!(log.contains("copied 20006 rows of public.chars"), "{log}");
    let st = pair.state("rd").expect("state row");
    assert_eq!(st.err, "no error", "{st:?}");
    // Changes after the copy come through the stream as before.
    pair.src
        .execute("UPDATE public.chars SET c10 = 'new  ', bp = 'x  ' WHERE id = 1");
    pair.wait_tables_equal("public.chars", "postgres.chars", "id");
    assert_eq!(
        stored(&pair.dst, "postgres.chars"),
        stored(&pair.src, "public.chars")
    );
}

#[test]
fn reader_off_copies_the_same_values_on_the_snapshot_connection() {
    let pair = Pair::new();
    pair.dst
        .execute("ALTER SYSTEM SET synchdb.snapshot_reader = off");
    pair.dst.execute("SELECT pg_reload_conf()");
    chars_table(&pair);
    pair.add_connector("ro");
    pair.start("ro", "initial");
    wait_until(LONG, "chars copied", || {
        pair.dst.count(
            "SELECT count(*) FROM synchdb_table_state WHERE name = 'ro' AND src_table = 'chars' AND state = 'ready'",
        ) == 1
    });
    assert_eq!(
        stored(&pair.dst, "postgres.chars"),
        stored(&pair.src, "public.chars")
    );
    let log = pair.dst.log_contents();
    assert!(log.contains("copied 20006 rows of public.chars"), "{log}");
    assert!(!log.contains("snapshot reader"), "{log}");
}

#[test]
fn ddl_queued_behind_the_snapshot_lets_the_worker_copy_the_table_itself() {
    let pair = Pair::new();
    // a_big is copied first (tables go by name) and long enough for the
    // DDL on b_small to queue behind the snapshot's lock meanwhile.
    pair.src.execute(
        "CREATE TABLE public.a_big (id int PRIMARY KEY, pad char(60), n bigint);
         INSERT INTO public.a_big SELECT g, md5(g::text), g FROM generate_series(1, 1500000) g;
         CREATE TABLE public.b_small (id int PRIMARY KEY, v text);
         INSERT INTO public.b_small SELECT g, 'v' || g FROM generate_series(1, 100) g;",
    );
    pair.add_connector("rq");
    pair.start("rq", "initial");
    wait_until(LONG, "a_big being copied", || {
        pair.dst.count(
            "SELECT count(*) FROM synchdb_snapshot_progress
              WHERE name = 'rq' AND src_table = 'a_big' AND state = 'copying'",
        ) == 1
    });
    let connect = pair.src.spawn_client();
    let alter = std::thread::spawn(move || {
        let mut c = connect();
        c.batch_execute("ALTER TABLE public.b_small ADD COLUMN extra int DEFAULT 7")
            .expect("ALTER TABLE runs once the snapshot ends");
    });
    // The ALTER waits for the snapshot's lock.
    wait_until(LONG, "ALTER queued", || {
        pair.src.count(
            "SELECT count(*) FROM pg_locks
              WHERE relation = 'public.b_small'::regclass AND mode = 'AccessExclusiveLock' AND NOT granted",
        ) == 1
    });
    let a_big_still_copying = pair.dst.count(
        "SELECT count(*) FROM synchdb_snapshot_progress
          WHERE name = 'rq' AND src_table = 'a_big' AND state = 'copying'",
    ) == 1;
    wait_until(LONG, "both copied", || {
        pair.dst
            .count("SELECT count(*) FROM synchdb_table_state WHERE name = 'rq' AND src_table IN ('a_big', 'b_small') AND state = 'ready'")
            == 2
    });
    alter.join().expect("alter thread");
    pair.src
        .execute("INSERT INTO public.b_small VALUES (101, 'after', 9); UPDATE public.a_big SET n = -1 WHERE id = 7");
    pair.wait_tables_equal("public.b_small", "postgres.b_small", "id");
    pair.wait_tables_equal("public.a_big", "postgres.a_big", "id");
    let log = pair.dst.log_contents();
    assert!(!log.contains("cannot copy public.a_big"), "{log}");
    if a_big_still_copying {
        // The reader found the DDL queued when it came to b_small.
        assert!(
            log.contains("snapshot reader cannot copy public.b_small"),
            "{log}"
        );
    }
    let st = pair.state("rq").expect("state row");
    assert_eq!(st.err, "no error", "{st:?}");
}
