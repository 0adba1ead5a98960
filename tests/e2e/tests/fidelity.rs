//! Fidelity end to end: every group of PostgreSQL types and table shapes
//! replicates value for value (`t::text` of every row, ordered) after the
//! snapshot and after CDC inserts, updates and deletes; source schema
//! changes and tables created later are followed without a restart.

use synchdb_e2e::*;

const NAME: &str = "fc";

/// Number of tables the connector captures from `public`.
fn source_tables(pair: &Pair) -> i64 {
    pair.src.count(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = 'public' AND c.relkind IN ('r','p') AND NOT c.relispartition",
    )
}

fn wait_ready(pair: &Pair, name: &str, n: i64) {
    wait_until(LONG, "every table's snapshot", || {
        pair.dst.count(&format!(
            "SELECT count(*) FROM synchdb_table_state WHERE name = '{name}' AND state = 'ready'"
        )) == n
    });
}

/// A pair whose source ran `setup`, with connector `fc` started in `initial`
/// and its snapshot complete.
fn replicate(setup: &str) -> Pair {
    replicate_with(setup, "")
}

fn replicate_with(setup: &str, dst_setup: &str) -> Pair {
    let pair = Pair::new();
    pair.src.execute(setup);
    if !dst_setup.is_empty() {
        pair.dst.execute(dst_setup);
    }
    pair.add_connector(NAME);
    pair.start(NAME, "initial");
    let n = source_tables(&pair);
    wait_ready(&pair, NAME, n);
    pair
}

/// Source `public.<t>` equals destination `postgres.<t>` (`t` as SQL names it).
fn same(pair: &Pair, t: &str) {
    pair.wait_tables_equal(&format!("public.{t}"), &format!("postgres.{t}"), "t::text");
}

fn assert_no_error(pair: &Pair) {
    let st = pair.state(NAME).expect("state row");
    assert_eq!(st.err, "no error", "{st:?}");
}

// ---------------------------------------------------------------------------
// Built-in types.

const BUILTIN_COLUMNS: &str = "
    id int PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint, n numeric, n2 numeric(12,3), f4 real, f8 double precision,
    m money, t text, vc varchar(20), c char(5), ba bytea, b bool, u uuid, j json, jb jsonb, x xml,
    d date, tm time, ttz timetz, ts timestamp(3), tstz timestamptz, iv interval,
    ip inet, cn cidr, mac macaddr, mac8 macaddr8, bt bit(4), vb varbit,
    pt point, ln line, ls lseg, bx box, pa path, pg polygon, ci circle,
    tv tsvector, tq tsquery, lsn pg_lsn, r4 int4range, mr int4multirange, dr daterange,
    ai int[], an numeric[], at text[], ajb jsonb[], ad date[], atz timestamptz[], aip inet[],
    apt point[], a2 int[][], aba bytea[], au uuid[], abo bool[], af float8[], at2 text[][]";

const BUILTIN_ROWS: [&str; 3] = [
    r#"1, 1, 2, 3, 1.5, 12.345, 1.25, 3.141592653589793, 12.34, 'hello', 'var', 'ab', '\x00ff5c',
       true, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2, {"b": null}]}',
       '{"k": "v", "n": 1.50}', '<r a="1">x &amp; y</r>', '2024-02-29', '13:45:01.123456',
       '13:45:01+05:30', '2024-02-29 13:45:01.5', '2024-02-29 13:45:01.5+00',
       '1 year 2 mons 3 days 04:05:06.789', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
       '08:00:2b:01:02:03:04:05', B'1010', B'110011', '(1.5,2)', '{1,-1,0}', '[(0,0),(1,1)]',
       '(2,2),(0,0)', '[(0,0),(1,1),(2,0)]', '((0,0),(1,1),(1,0))', '<(0,0),1.5>',
       'a fat cat sat on a mat', 'fat & rat', '16/B374D848', '[1,5)', '{[1,3),[5,7)}',
       '[2024-01-01,2024-02-01)', '{1,NULL,3}', '{1.5,NaN,NULL}', '{"a","b c","d\"e",NULL,""}',
       ARRAY['{"x": 1}'::jsonb, NULL], '{2024-01-01,infinity,-infinity}',
       ARRAY['2024-01-01 00:00:00+00'::timestamptz, 'infinity'], '{192.168.0.1,::1}',
       ARRAY[point(1,2), NULL], '{{1,2},{3,4}}', ARRAY['\x00'::bytea, '\x5c22', NULL],
       ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid], '{t,f,NULL}',
       ARRAY['NaN','Infinity','-Infinity', 1e-300]::float8[], '{{a,b},{c,NULL}}'"#,
    r#"2, -32768, -2147483648, -9223372036854775808, 'NaN', -0.001, 'Infinity', '-Infinity',
       -1.5, E'tab\there\nnew line \\ backslash \u00fcn\u00efc\u00f8d\u00e9 \U0001F600', '', 'a',
       '\x', false, '00000000-0000-0000-0000-000000000000', '  {"spaces" :  1 }  ', '[]',
       '<doc/>', 'infinity', '24:00:00', '00:00:00-12', '-infinity', 'infinity',
       '-1 days +02:03:00', '::1', '::/0', 'ff:ff:ff:ff:ff:ff', '00:00:00:00:00:00:00:00', B'0000',
       B'', '(-1e-10,1e+20)', '{0,1,0}', '[(1,1),(1,1)]', '(0,0),(0,0)', '((0,0))', '((0,0))',
       '<(1,1),0>', '', '!a', '0/0', 'empty', '{}', '(,)', '{}', '{}', '{}', '{}', '{}', '{}', '{}',
       '{}', '{}', '{}', '{}', '{}', ARRAY['NaN']::float8[], '{}'"#,
    "3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL",
];

/// The rows above with their id shifted by `offset`.
fn builtin_inserts(offset: i32) -> String {
    BUILTIN_ROWS
        .iter()
        .map(|row| {
            let (id, rest) = row.split_once(',').expect("id first");
            let id: i32 = id.trim().parse().expect("numeric id");
            format!(
                "INSERT INTO public.types VALUES ({}, {rest});\n",
                id + offset
            )
        })
        .collect()
}

#[test]
fn builtin_types_snapshot_and_cdc() {
    let pair = replicate(&format!(
        "CREATE TABLE public.types ({BUILTIN_COLUMNS});\n{}",
        builtin_inserts(0)
    ));
    same(&pair, "types");
    // The destination columns have the source's exact types.
    let shape = "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum)
                   FROM pg_attribute WHERE attrelid = '%.types'::regclass AND attnum > 0 AND NOT attisdropped";
    assert_eq!(
        pair.src.query_one_string(&shape.replace('%', "public")),
        pair.dst.query_one_string(&shape.replace('%', "postgres"))
    );

    pair.src.execute(&builtin_inserts(100));
    pair.src.execute(
        "UPDATE public.types SET t = t || ' changed', af = '{1.5}', n = 'NaN',
                a2 = '{{5,6},{7,NULL}}', x = '<changed/>', j = '{\"z\":  [ ]}' WHERE id = 101;
         UPDATE public.types SET id = 110 WHERE id = 102;
         DELETE FROM public.types WHERE id = 103;
         UPDATE public.types SET (i2, jb, tstz) = (NULL, NULL, '-infinity') WHERE id = 1;
         UPDATE public.types SET f4 = 'NaN', f8 = 'NaN', d = '-infinity', pt = '(NaN,1)' WHERE id = 2;",
    );
    same(&pair, "types");
    assert_no_error(&pair);
}

// ---------------------------------------------------------------------------
// User-defined types.

#[test]
fn user_defined_types_snapshot_and_cdc() {
    let pair = replicate(
        r#"CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy', 'it''s "odd"');
           CREATE TYPE public.addr AS (street text, zip int, tags text[]);
           CREATE TYPE public.person AS (name text, home public.addr, moods public.mood[]);
           CREATE DOMAIN public.posint AS int CHECK (VALUE > 0);
           CREATE DOMAIN public.email AS varchar(100) CHECK (VALUE LIKE '%@%');
           CREATE TYPE public.floatrange AS RANGE (subtype = float8, subtype_diff = float8mi);
           CREATE TABLE public.udt (
               id public.posint PRIMARY KEY, m public.mood, ms public.mood[], p public.person,
               ps public.person[], a public.addr, e public.email, emails public.email[],
               r public.floatrange, mr public.floatmultirange);
           INSERT INTO public.udt VALUES
             (1, 'happy', '{sad,"it''s \"odd\""}',
              ROW('Ann', ROW('Main St', 12345, '{a,b}'), '{ok,happy}'),
              ARRAY[ROW('Bob', NULL, '{}')::public.person, NULL], ROW('x', NULL, NULL),
              'a@b.c', '{a@b,c@d}', '[1.5,2.5)', '{[1,2),[3,4)}'),
             (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
             (3, 'it''s "odd"', '{}', ROW(NULL, NULL, NULL), '{}', ROW('', 0, '{NULL}'),
              'z@z', '{}', 'empty', '{}');
           CREATE TABLE public.ckey (k public.addr PRIMARY KEY, v text);
           INSERT INTO public.ckey VALUES (ROW('x', 1, '{a}'), 'one'), (ROW('y', 2, '{}'), 'two');
           CREATE TABLE public.akey (k int[] PRIMARY KEY, v text);
           INSERT INTO public.akey VALUES ('{1,2}', 'one'), ('{{1,2},{3,4}}', 'two'), ('{}', 'empty');
           CREATE TABLE public.ekey (k public.mood PRIMARY KEY, v text);
           INSERT INTO public.ekey VALUES ('ok', 'one'), ('sad', 'two');"#,
    );
    for t in ["udt", "ckey", "akey", "ekey"] {
        same(&pair, t);
    }
    // The types live in the destination schema.
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
              WHERE n.nspname = 'postgres'
                AND t.typname IN ('mood','addr','person','posint','email','floatrange','floatmultirange')"
        ),
        7
    );
    // The domain keeps its CHECK.
    assert_eq!(
        sqlstate(pair.dst.try_execute("SELECT (-1)::postgres.posint")),
        "23514"
    );

    pair.src.execute(
        r#"INSERT INTO public.udt VALUES
             (4, 'sad', '{happy}', ROW('Cy', ROW('Side', 1, '{}'), '{}'),
              ARRAY[ROW('D', ROW('s', 2, '{x,NULL}'), '{sad}')::public.person],
              ROW('q', 9, '{q}'), 'q@q', '{q@q}', '(,5]', '{(,1],[2,)}');
           UPDATE public.udt SET p.home.zip = 99999, ms = ms || 'ok'::public.mood WHERE id = 1;
           UPDATE public.udt SET m = 'ok', r = '[0,1]' WHERE id = 2;
           DELETE FROM public.udt WHERE id = 3;
           UPDATE public.ckey SET k = ROW('z', 3, '{b}') WHERE (k).street = 'x';
           DELETE FROM public.ckey WHERE (k).street = 'y';
           UPDATE public.akey SET v = 'changed' WHERE k = '{{1,2},{3,4}}';
           UPDATE public.akey SET k = '{9}' WHERE k = '{1,2}';
           DELETE FROM public.akey WHERE k = '{}';
           UPDATE public.ekey SET k = 'happy' WHERE k = 'ok';"#,
    );
    for t in ["udt", "ckey", "akey", "ekey"] {
        same(&pair, t);
    }
    // Labels added to an enum later reach the destination's copy of it.
    pair.src
        .execute("ALTER TYPE public.mood ADD VALUE 'ecstatic' AFTER 'happy'");
    pair.src
        .execute("ALTER TYPE public.mood ADD VALUE 'meh' BEFORE 'sad'");
    pair.src.execute(
        "INSERT INTO public.ekey VALUES ('ecstatic', 'new label'), ('meh', 'first label');
         UPDATE public.udt SET ms = '{meh,ecstatic}' WHERE id = 1;",
    );
    same(&pair, "ekey");
    same(&pair, "udt");
    assert_eq!(
        pair.dst
            .query_one_string("SELECT enum_range(NULL::postgres.mood)::text"),
        pair.src
            .query_one_string("SELECT enum_range(NULL::public.mood)::text")
    );
    assert_no_error(&pair);
}

#[test]
fn extension_types_when_installed_in_the_destination() {
    let pair = replicate_with(
        "CREATE EXTENSION hstore; CREATE EXTENSION citext;
         CREATE TABLE public.ext (id int PRIMARY KEY, h hstore, c citext, ca citext[]);
         INSERT INTO public.ext VALUES (1, 'a=>1, \"b c\"=>NULL', 'MiXeD', '{One,TWO}'), (2, NULL, NULL, NULL);
         CREATE TABLE public.cikey (k citext PRIMARY KEY, v int);
         INSERT INTO public.cikey VALUES ('Alpha', 1), ('beta', 2);",
        "CREATE SCHEMA extensions; CREATE EXTENSION hstore SCHEMA extensions; CREATE EXTENSION citext;",
    );
    same(&pair, "ext");
    same(&pair, "cikey");
    pair.src.execute(
        "INSERT INTO public.ext VALUES (3, 'x=>y', 'Zed', '{}');
         UPDATE public.ext SET h = h || 'k=>v'::hstore, c = 'other' WHERE id = 1;
         DELETE FROM public.ext WHERE id = 2;
         UPDATE public.cikey SET v = 10 WHERE k = 'ALPHA';
         UPDATE public.cikey SET k = 'Gamma' WHERE k = 'beta';",
    );
    same(&pair, "ext");
    same(&pair, "cikey");
    assert_no_error(&pair);
}

#[test]
fn missing_extension_is_named_in_the_error() {
    let pair = Pair::new();
    pair.src.execute(
        "CREATE EXTENSION hstore;
         CREATE TABLE public.ext (id int PRIMARY KEY, h hstore);
         INSERT INTO public.ext VALUES (1, 'a=>1');",
    );
    pair.add_connector(NAME);
    pair.start(NAME, "initial");
    let err = wait_for_value(LONG, "an error naming the extension", || {
        pair.state(NAME)
            .map(|s| s.err)
            .filter(|e| e.contains("hstore") && e.contains("extension"))
    });
    assert!(err.contains("CREATE EXTENSION hstore"), "{err}");
    // Once the extension exists the connector recovers on its own.
    pair.dst.execute("CREATE EXTENSION hstore");
    wait_ready(&pair, NAME, 3);
    same(&pair, "ext");
}

// ---------------------------------------------------------------------------
// Table shapes.

#[test]
fn table_shapes_identity_full_using_index_and_none() {
    let pair = replicate(
        "CREATE TABLE public.full_dup (a int, j json, x xml, p point, b box, t text);
         ALTER TABLE public.full_dup REPLICA IDENTITY FULL;
         INSERT INTO public.full_dup VALUES
           (1, '{\"a\": 1}', '<a/>', '(1,2)', '(1,1),(0,0)', 'dup'),
           (1, '{\"a\": 1}', '<a/>', '(1,2)', '(1,1),(0,0)', 'dup'),
           (2, NULL, NULL, NULL, NULL, NULL),
           (2, NULL, NULL, NULL, NULL, NULL),
           (3, '{\"b\":2}', '<b/>', '(0,0)', '(2,2),(1,1)', 'other'),
           (4, '[]', '<c/>', '(5,5)', '(4,1),(0,0)', 'four'),
           (5, NULL, NULL, NULL, '(1,1),(0,0)', 'box'),
           (5, NULL, NULL, NULL, '(3,3),(2,2)', 'box');
         CREATE TABLE public.by_index (a int NOT NULL, b text NOT NULL, c text);
         CREATE UNIQUE INDEX by_index_ab ON public.by_index (a, b);
         ALTER TABLE public.by_index REPLICA IDENTITY USING INDEX by_index_ab;
         INSERT INTO public.by_index SELECT g, 'k' || g, 'v' || g FROM generate_series(1, 5) g;
         CREATE TABLE public.no_identity (a int, b text);
         INSERT INTO public.no_identity VALUES (1, 'one');",
    );
    for t in ["full_dup", "by_index", "no_identity"] {
        same(&pair, t);
    }
    pair.src.execute(
        "UPDATE public.full_dup SET t = 'changed one'
          WHERE ctid = (SELECT ctid FROM public.full_dup WHERE t = 'dup' LIMIT 1);
         DELETE FROM public.full_dup
          WHERE ctid = (SELECT ctid FROM public.full_dup WHERE a = 2 LIMIT 1);
         UPDATE public.full_dup SET b = '(3,3),(0,0)', j = '{\"b\": 3}' WHERE a = 3;
         UPDATE public.full_dup SET p = '(6,6)' WHERE a = 4;
         -- box '=' compares areas: both boxes of a = 5 have area 1.
         UPDATE public.full_dup SET t = 'box moved' WHERE a = 5 AND b ~= '(3,3),(2,2)';
         INSERT INTO public.full_dup VALUES (2, NULL, NULL, NULL, NULL, NULL);
         UPDATE public.by_index SET c = 'changed' WHERE a = 1;
         UPDATE public.by_index SET b = 'rekeyed' WHERE a = 2;
         DELETE FROM public.by_index WHERE a = 3;
         INSERT INTO public.no_identity VALUES (2, 'two');",
    );
    for t in ["full_dup", "by_index", "no_identity"] {
        same(&pair, t);
    }
    // Without an identity the source itself refuses updates and deletes of a
    // published table; inserts keep flowing.
    assert_eq!(
        sqlstate(
            pair.src
                .try_execute("UPDATE public.no_identity SET b = 'x' WHERE a = 1")
        ),
        "55000"
    );
    pair.src
        .execute("INSERT INTO public.no_identity VALUES (3, 'three')");
    same(&pair, "no_identity");
    assert_no_error(&pair);
}

#[test]
fn toast_values_left_unchanged_by_updates_keep_their_value() {
    let pair = replicate(
        "CREATE TABLE public.big (id int PRIMARY KEY, small int, doc text, blob bytea);
         ALTER TABLE public.big ALTER COLUMN doc SET STORAGE EXTERNAL;
         INSERT INTO public.big
           SELECT g, g, repeat(md5(g::text), 4000), decode(repeat(md5((g * 7)::text), 3000), 'hex')
             FROM generate_series(1, 5) g;
         CREATE TABLE public.big_full (small int, doc text);
         ALTER TABLE public.big_full REPLICA IDENTITY FULL;
         INSERT INTO public.big_full SELECT g, repeat(md5(g::text), 4000) FROM generate_series(1, 3) g;",
    );
    same(&pair, "big");
    same(&pair, "big_full");
    pair.src.execute(
        "UPDATE public.big SET small = small + 100;
         UPDATE public.big SET doc = doc || 'tail' WHERE id = 2;
         UPDATE public.big SET blob = NULL WHERE id = 3;
         UPDATE public.big_full SET small = small + 100 WHERE small = 1;
         DELETE FROM public.big_full WHERE small = 2;
         INSERT INTO public.big VALUES (6, 6, repeat('x', 100000), NULL);",
    );
    same(&pair, "big");
    same(&pair, "big_full");
    assert_no_error(&pair);
}

#[test]
fn truncate_cascade_and_restart_identity() {
    let pair = replicate(
        "CREATE TABLE public.parent (id serial PRIMARY KEY, v text);
         CREATE TABLE public.child (id serial PRIMARY KEY, pid int REFERENCES public.parent (id), v text);
         CREATE TABLE public.other (id serial PRIMARY KEY, v text);
         INSERT INTO public.parent (v) SELECT 'p' || g FROM generate_series(1, 5) g;
         INSERT INTO public.child (pid, v) SELECT g, 'c' || g FROM generate_series(1, 5) g;
         INSERT INTO public.other (v) SELECT 'o' || g FROM generate_series(1, 5) g;",
    );
    for t in ["parent", "child", "other"] {
        same(&pair, t);
    }
    pair.src.execute(
        "TRUNCATE public.parent CASCADE;
         INSERT INTO public.parent (v) VALUES ('after cascade');
         INSERT INTO public.child (pid, v) SELECT id, 'child after' FROM public.parent;",
    );
    for t in ["parent", "child", "other"] {
        same(&pair, t);
    }
    pair.src.execute(
        "TRUNCATE public.other, public.parent, public.child RESTART IDENTITY;
         INSERT INTO public.parent (v) VALUES ('restarted');
         BEGIN;
         INSERT INTO public.other (v) VALUES ('gone');
         TRUNCATE public.other;
         INSERT INTO public.other (v) VALUES ('kept');
         COMMIT;",
    );
    for t in ["parent", "child", "other"] {
        same(&pair, t);
    }
    assert_eq!(
        pair.dst
            .query_one_string("SELECT id || ':' || v FROM postgres.parent")
            .as_deref(),
        Some("1:restarted")
    );
    assert_no_error(&pair);
}

#[test]
fn partitioned_table_lands_in_one_destination_table() {
    let pair = replicate(
        "CREATE TABLE public.meas (id int, region text, v numeric, PRIMARY KEY (id, region))
           PARTITION BY LIST (region);
         CREATE TABLE public.meas_eu PARTITION OF public.meas FOR VALUES IN ('eu');
         CREATE TABLE public.meas_us PARTITION OF public.meas FOR VALUES IN ('us');
         INSERT INTO public.meas SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, g / 3.0
           FROM generate_series(1, 20) g;",
    );
    same(&pair, "meas");
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'postgres' AND tablename LIKE 'meas%'"
        ),
        1
    );
    pair.src.execute(
        "INSERT INTO public.meas VALUES (100, 'eu', 1), (101, 'us', 2);
         UPDATE public.meas SET v = -1 WHERE id = 2;
         UPDATE public.meas SET region = 'us' WHERE id = 4;
         DELETE FROM public.meas WHERE id = 5;
         INSERT INTO public.meas_eu VALUES (200, 'eu', 3);",
    );
    same(&pair, "meas");
    assert_no_error(&pair);
}

#[test]
fn generated_columns_are_computed_at_the_destination() {
    let pair = replicate(
        "CREATE TABLE public.gen (id int PRIMARY KEY, a int,
                                  b int GENERATED ALWAYS AS (a * 2) STORED,
                                  c text GENERATED ALWAYS AS ('v' || a::text) STORED);
         INSERT INTO public.gen (id, a) SELECT g, g FROM generate_series(1, 5) g;",
    );
    same(&pair, "gen");
    assert_eq!(
        pair.dst
            .query_one_string(
                "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute
              WHERE attrelid = 'postgres.gen'::regclass AND attgenerated = 's'"
            )
            .as_deref(),
        Some("b,c")
    );
    pair.src.execute(
        "INSERT INTO public.gen (id, a) VALUES (6, 60);
         UPDATE public.gen SET a = a + 10 WHERE id = 1;
         DELETE FROM public.gen WHERE id = 2;",
    );
    same(&pair, "gen");
    assert_no_error(&pair);
}

#[test]
fn identifiers_that_need_quoting() {
    let pair = Pair::new();
    pair.src.execute("CREATE DATABASE \"Sales-DB\"");
    let mut db = pair.src.client_db("Sales-DB");
    db.batch_execute(
        r#"CREATE SCHEMA "My Schema";
           CREATE TYPE "My Schema"."Mood Type" AS ENUM ('Happy Day', 'it''s');
           CREATE TYPE "My Schema"."select" AS ("From" int, "a b" text);
           CREATE TABLE "My Schema"."Order Items" (
               "Id" int PRIMARY KEY, "select" text, "with space" "My Schema"."Mood Type",
               "quo""te" int, "ünï" text, "CamelCase" "My Schema"."Mood Type"[],
               "row" "My Schema"."select");
           INSERT INTO "My Schema"."Order Items" VALUES
             (1, 'a', 'Happy Day', 1, 'ü', '{it''s}', ROW(1, 'x')),
             (2, NULL, 'it''s', NULL, NULL, NULL, NULL);
           CREATE TABLE "My Schema"."user" ("from" int PRIMARY KEY, "Group" text);
           INSERT INTO "My Schema"."user" VALUES (1, 'g');"#,
    )
    .expect("quoted source objects");
    pair.dst.execute(&format!(
        "SELECT synchdb_add_conninfo('{NAME}','127.0.0.1',{},'myuser','mypass','Sales-DB','\"My Schema\"','null','null','postgres')",
        pair.src.port()
    ));
    pair.start(NAME, "initial");
    wait_ready(&pair, NAME, 2);
    compare(&pair, &mut db, "\"Order Items\"");
    compare(&pair, &mut db, "\"user\"");
    db.batch_execute(
        r#"INSERT INTO "My Schema"."Order Items" VALUES (3, 'c', 'it''s', 3, 'ï', '{Happy Day}', ROW(3, 'z'));
           UPDATE "My Schema"."Order Items" SET "quo""te" = 42, "row"."a b" = 'changed' WHERE "Id" = 1;
           DELETE FROM "My Schema"."Order Items" WHERE "Id" = 2;
           ALTER TABLE "My Schema"."Order Items" RENAME COLUMN "select" TO "Order By";
           INSERT INTO "My Schema"."Order Items" VALUES (4, 'd', NULL, NULL, NULL, NULL, NULL);
           UPDATE "My Schema"."user" SET "Group" = 'h' WHERE "from" = 1;"#,
    )
    .expect("quoted source changes");
    compare(&pair, &mut db, "\"Order Items\"");
    compare(&pair, &mut db, "\"user\"");
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = '\"Sales-DB\".\"Order Items\"'::regclass
              AND attname = 'Order By'"
        ),
        1
    );
    assert_no_error(&pair);
}

/// `"My Schema".<t>` of database "Sales-DB" equals `"Sales-DB".<t>`.
fn compare(pair: &Pair, db: &mut postgres::Client, t: &str) {
    let q = format!("SELECT t::text FROM {{}}.{t} t ORDER BY 1");
    let src: Vec<String> = db
        .query(q.replace("{}", "\"My Schema\"").as_str(), &[])
        .expect("source rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let dst_q = q.replace("{}", "\"Sales-DB\"");
    wait_until(LONG, &format!("{t} equal"), || {
        let dst: Vec<String> = pair
            .dst
            .try_query_strings(&dst_q)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect();
        dst == src
    });
}

// ---------------------------------------------------------------------------
// Schema changes, each followed before the table's next row.

const CHANGE_SETUP: &str =
    "CREATE TABLE public.t (id int PRIMARY KEY, a int, b text, c varchar(10));
     INSERT INTO public.t SELECT g, g, 'b' || g, 'c' || g FROM generate_series(1, 5) g;";

fn followed(pair: &Pair, change: &str, then: &str) {
    followed_as(pair, change, then, "followed a schema change of public.t");
}

/// Applies `change` then `then` on the source; the tables end equal and
/// the destination log holds `logged`.
fn followed_as(pair: &Pair, change: &str, then: &str, logged: &str) {
    pair.src.execute(change);
    pair.src.execute(then);
    same(pair, "t");
    let log = pair.dst.log_contents();
    assert!(log.contains(logged), "schema change not logged: {logged}");
    assert_no_error(pair);
}

const COPIED_AGAIN: &str = "postgres.t is copied again";

#[test]
fn schema_change_add_column_with_default() {
    let pair = replicate(CHANGE_SETUP);
    // Existing rows took the defaults on the source (a default may be
    // volatile or changed since): the table is copied again.
    followed_as(
        &pair,
        "ALTER TABLE public.t ADD COLUMN extra text DEFAULT 'dflt';
         ALTER TABLE public.t ADD COLUMN n int NOT NULL DEFAULT 7;
         ALTER TABLE public.t ADD COLUMN plain numeric;",
        "INSERT INTO public.t (id, a, extra, n, plain) VALUES (10, 10, 'given', 8, 1.5);
         INSERT INTO public.t (id) VALUES (11);
         UPDATE public.t SET extra = 'changed' WHERE id = 1;",
        COPIED_AGAIN,
    );
}

#[test]
fn schema_change_drop_column() {
    let pair = replicate(CHANGE_SETUP);
    followed(
        &pair,
        "ALTER TABLE public.t DROP COLUMN b;",
        "INSERT INTO public.t VALUES (10, 10, 'c10');
         UPDATE public.t SET c = 'x' WHERE id = 1;
         DELETE FROM public.t WHERE id = 2;",
    );
}

#[test]
fn schema_change_alter_column_type() {
    let pair = replicate(CHANGE_SETUP);
    // USING rewrote every row on the source, which the stream does not
    // carry: the table is copied again, then streams on.
    followed_as(
        &pair,
        "ALTER TABLE public.t ALTER COLUMN a TYPE bigint;
         ALTER TABLE public.t ALTER COLUMN c TYPE varchar(50);
         ALTER TABLE public.t ALTER COLUMN b TYPE int USING length(b);",
        "INSERT INTO public.t VALUES (10, 9000000000, 42, repeat('z', 40));
         UPDATE public.t SET a = a * 1000000000 WHERE id = 1;",
        COPIED_AGAIN,
    );
    let shape = "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum)
                   FROM pg_attribute WHERE attrelid = '%.t'::regclass AND attnum > 0 AND NOT attisdropped";
    assert_eq!(
        pair.dst
            .query_one_string(&shape.replace('%', "postgres"))
            .as_deref(),
        Some("id integer, a bigint, b integer, c character varying(50)")
    );
    pair.src
        .execute("INSERT INTO public.t VALUES (11, 1, 1, 'after')");
    same(&pair, "t");
}

#[test]
fn schema_change_rename_column() {
    let pair = replicate(CHANGE_SETUP);
    // A rename and a drop plus an add look the same in the stream.
    followed_as(
        &pair,
        "ALTER TABLE public.t RENAME COLUMN b TO \"B renamed\";",
        "INSERT INTO public.t VALUES (10, 10, 'b10', 'c10');
         UPDATE public.t SET \"B renamed\" = 'x' WHERE id = 1;",
        COPIED_AGAIN,
    );
}

#[test]
fn schema_change_rename_table() {
    let pair = replicate(CHANGE_SETUP);
    let oid = pair
        .dst
        .query_one_string("SELECT 'postgres.t'::regclass::oid::text");
    pair.src.execute(
        "ALTER TABLE public.t RENAME TO t2;
         INSERT INTO public.t2 VALUES (10, 10, 'b10', 'c10');
         UPDATE public.t2 SET b = 'x' WHERE id = 1;",
    );
    same(&pair, "t2");
    // The same destination table, renamed, not a new copy.
    assert_eq!(
        pair.dst
            .query_one_string("SELECT 'postgres.t2'::regclass::oid::text"),
        oid
    );
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'postgres' AND tablename = 't'"
        ),
        0
    );
    // A rename while the connector is stopped is followed on the next start.
    pair.stop(NAME);
    wait_until(LONG, "stopped", || {
        pair.state(NAME).is_some_and(|s| s.pid == -1)
    });
    pair.src.execute(
        "ALTER TABLE public.t2 RENAME TO t3;
         INSERT INTO public.t3 VALUES (11, 11, 'b11', 'c11');",
    );
    pair.start(NAME, "initial");
    same(&pair, "t3");
    assert_eq!(
        pair.dst
            .query_one_string("SELECT 'postgres.t3'::regclass::oid::text"),
        oid
    );
    assert_no_error(&pair);
}

#[test]
fn table_created_after_start_is_created_and_filled() {
    let pair = replicate(CHANGE_SETUP);
    pair.src.execute(
        "CREATE TYPE public.color AS ENUM ('red', 'green');
         CREATE TABLE public.late (id int PRIMARY KEY, c public.color, note text NOT NULL);
         INSERT INTO public.late VALUES (1, 'red', 'first'), (2, NULL, 'second');
         UPDATE public.late SET c = 'green' WHERE id = 2;",
    );
    same(&pair, "late");
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM synchdb_table_state WHERE name = 'fc' AND src_table = 'late' AND state = 'ready'"
        ),
        1
    );
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM pg_index WHERE indrelid = 'postgres.late'::regclass AND indisprimary"
        ),
        1
    );
    pair.src.execute(
        "DELETE FROM public.late WHERE id = 1; INSERT INTO public.t VALUES (99, 99, 'x', 'y');",
    );
    same(&pair, "late");
    same(&pair, "t");
    assert_no_error(&pair);
}
