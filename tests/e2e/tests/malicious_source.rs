//! Text from the source that becomes destination DDL (type names, column
//! defaults, generated-column expressions, domain CHECK constraints) is
//! never run as SQL beyond what it claims to be. The malicious source is a
//! real PostgreSQL whose superuser replaced the catalog functions the
//! connector reads that text through (`format_type`, `pg_get_expr`,
//! `pg_get_constraintdef`), so it answers with text that tries to run a
//! second statement, as a compromised source would (and once through the
//! tampering proxy of `mitm.rs`, as a man in the middle would): the
//! connector refuses, `err` says why, and the destination's canary table
//! and roles are untouched. Genuine but nasty text (names and literals full
//! of quotes, semicolons and comment markers) replicates exactly, and
//! built-in types keep their typmods.

use synchdb_e2e::mitm::Proxy;
use synchdb_e2e::*;

/// A destination table the injected statements try to drop.
const CANARY: &str = "public.canary";

fn pair_with_canary() -> Pair {
    let pair = Pair::new();
    pair.dst.execute(&format!(
        "CREATE TABLE {CANARY} (x int); INSERT INTO {CANARY} VALUES (1)"
    ));
    pair
}

/// Nothing that the source smuggled in ran in the destination.
fn assert_nothing_ran(pair: &Pair) {
    assert_eq!(
        pair.dst.count(&format!("SELECT count(*) FROM {CANARY}")),
        1,
        "the canary table is gone or changed"
    );
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM pg_roles WHERE rolname = 'evil'"),
        0,
        "a role was created"
    );
}

/// The source's catalog function `name(args)` (internal symbol `symbol`)
/// answers `lie` where it would have answered `truth`.
fn lie(src: &Cluster, name: &str, args: &str, symbol: &str, truth: &str, lie: &str) {
    let params: Vec<String> = (1..=args.split(',').count())
        .map(|i| format!("${i}"))
        .collect();
    let params = params.join(", ");
    src.execute(&format!(
        "CREATE FUNCTION public.real_{name}({args}) RETURNS text LANGUAGE internal STABLE AS '{symbol}';
         CREATE OR REPLACE FUNCTION pg_catalog.{name}({args}) RETURNS text LANGUAGE sql STABLE AS $lie$
           SELECT CASE WHEN public.real_{name}({params}) = {truth} THEN {lie}
                       ELSE public.real_{name}({params}) END
         $lie$",
        truth = quote(truth),
        lie = quote(lie),
    ));
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn wait_err(pair: &Pair, name: &str, needle: &str) -> String {
    wait_for_value(LONG, &format!("an error with {needle:?}"), || {
        pair.state(name)
            .map(|s| s.err)
            .filter(|e| e.contains(needle))
    })
}

fn dst_has_table(pair: &Pair, table: &str) -> bool {
    pair.dst.count(&format!(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'postgres' AND tablename = '{table}'"
    )) == 1
}

fn wait_rows(pair: &Pair, table: &str, n: i64) {
    wait_until(LONG, &format!("{n} rows in postgres.{table}"), || {
        dst_has_table(pair, table)
            && pair
                .dst
                .count(&format!("SELECT count(*) FROM postgres.{table}"))
                == n
    });
}

#[test]
fn a_type_name_that_runs_a_second_statement_is_refused() {
    let pair = pair_with_canary();
    pair.src.execute(
        "CREATE TABLE public.evil (id int PRIMARY KEY, s smallint);
         INSERT INTO public.evil VALUES (1, 1)",
    );
    lie(
        &pair.src,
        "format_type",
        "oid, integer",
        "format_type",
        "smallint",
        // Pasted as it is, this would close CREATE TABLE and drop the canary.
        "int4); DROP TABLE public.canary; --",
    );
    pair.add_connector_with("ty", "public.evil", "null");
    pair.start("ty", "initial");
    let err = wait_err(&pair, "ty", "refused");
    assert!(
        err.contains("source type of column \"s\" of public.evil does not name a built-in type"),
        "{err}"
    );
    assert!(err.contains("DROP TABLE public.canary"), "{err}");
    assert!(!dst_has_table(&pair, "evil"));
    assert_nothing_ran(&pair);
}

#[test]
fn a_man_in_the_middle_cannot_inject_through_a_type_name() {
    // The same through a tampering proxy rewriting the catalog's answer.
    let pair = pair_with_canary();
    pair.src.execute(
        "CREATE TABLE public.evil (id int PRIMARY KEY, s smallint);
         INSERT INTO public.evil VALUES (1, 1)",
    );
    let proxy = Proxy::new(pair.src.port());
    proxy.set(|t| {
        t.values = vec![(
            "smallint".into(),
            "int4); CREATE ROLE evil SUPERUSER; --".into(),
        )]
    });
    pair.dst.execute(&format!(
        "SELECT synchdb_add_conninfo('mm','127.0.0.1',{},'myuser','mypass','postgres','public','public.evil','null','postgres')",
        proxy.port()
    ));
    pair.start("mm", "initial");
    let err = wait_err(&pair, "mm", "refused");
    assert!(
        err.contains("source type of column \"s\" of public.evil does not name a built-in type"),
        "{err}"
    );
    assert!(!dst_has_table(&pair, "evil"));
    assert_nothing_ran(&pair);
    // Once the path is clean again, the table replicates.
    proxy.set(|t| t.values.clear());
    pair.wait_tables_equal("public.evil", "postgres.evil", "id");
}

#[test]
fn a_domain_check_that_runs_a_second_statement_is_refused() {
    let pair = pair_with_canary();
    pair.src.execute(
        "CREATE DOMAIN public.pos AS int CHECK (VALUE > 0);
         CREATE TABLE public.evil (id int PRIMARY KEY, p public.pos);
         INSERT INTO public.evil VALUES (1, 1)",
    );
    lie(
        &pair.src,
        "pg_get_constraintdef",
        "oid",
        "pg_get_constraintdef",
        "CHECK ((VALUE > 0))",
        "CHECK ((VALUE > 0)) ; CREATE ROLE evil SUPERUSER; --)",
    );
    pair.add_connector_with("dc", "public.evil", "null");
    pair.start("dc", "initial");
    let err = wait_err(&pair, "dc", "refused");
    assert!(
        err.contains("source CHECK constraint of domain \"pos\" is not a single expression"),
        "{err}"
    );
    assert!(err.contains("CREATE ROLE evil"), "{err}");
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
              WHERE n.nspname = 'postgres' AND t.typname = 'pos'"
        ),
        0
    );
    assert!(!dst_has_table(&pair, "evil"));
    assert_nothing_ran(&pair);
}

#[test]
fn a_domain_check_that_calls_a_volatile_function_is_refused() {
    // One expression, but one that would run set_config as the worker on
    // every value applied (a genuine source may say this too).
    let pair = pair_with_canary();
    pair.src.execute(
        "CREATE DOMAIN public.sneaky AS int
           CHECK (VALUE > 0 AND pg_catalog.set_config('synchdb.pwned', 'yes', false) IS NOT NULL);
         CREATE TABLE public.evil (id int PRIMARY KEY, v public.sneaky);
         INSERT INTO public.evil VALUES (1, 1)",
    );
    pair.add_connector_with("vd", "public.evil", "null");
    pair.start("vd", "initial");
    let err = wait_err(&pair, "vd", "refused");
    assert!(
        err.contains(
            "source CHECK constraint of domain \"sneaky\" calls a function that is not an immutable built-in"
        ),
        "{err}"
    );
    assert!(!dst_has_table(&pair, "evil"));
    assert_nothing_ran(&pair);
}

#[test]
fn a_domain_check_that_reads_the_connectors_passwords_is_refused() {
    // One expression, only stable built-ins: evaluated as the worker (a
    // superuser), its cast's error would show every connector's password.
    let pair = pair_with_canary();
    pair.src.execute(
        "CREATE DOMAIN public.pos AS int CHECK (VALUE > 0);
         CREATE TABLE public.evil (id int PRIMARY KEY, p public.pos);
         INSERT INTO public.evil VALUES (1, 1)",
    );
    lie(
        &pair.src,
        "pg_get_constraintdef",
        "oid",
        "pg_get_constraintdef",
        "CHECK ((VALUE > 0))",
        "CHECK (((pg_catalog.table_to_xml('public.synchdb_conninfo'::regclass, true, false, '')::text)::integer > VALUE))",
    );
    pair.add_connector_with("px", "public.evil", "null");
    pair.start("px", "initial");
    let err = wait_err(&pair, "px", "refused");
    assert!(
        err.contains(
            "source CHECK constraint of domain \"pos\" calls a function that is not an immutable built-in"
        ),
        "{err}"
    );
    assert!(!err.contains("mypass"), "{err}");
    assert!(!pair
        .dst
        .log_contents()
        .contains("invalid input syntax for type integer"));
    assert!(!dst_has_table(&pair, "evil"));
    assert_nothing_ran(&pair);
}

#[test]
fn an_index_expression_calling_a_destination_function_is_left_out() {
    // A function outside pg_catalog, whatever volatility it declares, runs
    // any code as the worker: the index that calls it is never built.
    let pair = pair_with_canary();
    pair.src.execute(
        "CREATE FUNCTION public.evil_f(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1';
         CREATE TABLE public.evil (id int PRIMARY KEY, a int);
         CREATE INDEX evil_f_idx ON public.evil (public.evil_f(a));
         INSERT INTO public.evil VALUES (1, 1), (2, 2)",
    );
    // Where the name the source writes (unqualified: public is on its
    // search_path) resolves in the destination schema.
    pair.dst.execute(
        "CREATE SCHEMA postgres;
         CREATE FUNCTION postgres.evil_f(int) RETURNS int LANGUAGE plpgsql IMMUTABLE
           AS 'BEGIN RETURN 1 / 0; END'",
    );
    pair.add_connector_with("ix", "public.evil", "null");
    pair.start("ix", "initial");
    wait_rows(&pair, "evil", 2);
    let left_out = "calls a function that is not an immutable built-in; the index is left out";
    let deadline = std::time::Instant::now() + LONG;
    while !pair.dst.log_contents().contains(left_out) {
        let log = pair.dst.log_contents();
        let about: Vec<&str> = log.lines().filter(|l| l.contains("evil_f")).collect();
        assert!(
            std::time::Instant::now() < deadline,
            "no WARNING that the index was left out: {about:#?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let log = pair.dst.log_contents();
    assert!(!log.contains("division by zero"), "the function ran");
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'postgres' AND indexname = 'evil_f_idx'"
        ),
        0
    );
    assert_nothing_ran(&pair);
    let st = pair.state("ix").expect("state row");
    assert_eq!(st.err, "no error", "{st:?}");
}

#[test]
fn a_generated_expression_that_runs_a_second_statement_is_refused() {
    let pair = pair_with_canary();
    pair.src.execute(
        "CREATE TABLE public.evil (id int PRIMARY KEY, a int,
                                   g int GENERATED ALWAYS AS (a * 4242) STORED);
         INSERT INTO public.evil (id, a) VALUES (1, 1)",
    );
    lie(
        &pair.src,
        "pg_get_expr",
        "pg_node_tree, oid",
        "pg_get_expr",
        "(a * 4242)",
        "(a * 4242)) STORED); DROP TABLE public.canary; --",
    );
    pair.add_connector_with("ge", "public.evil", "null");
    pair.start("ge", "initial");
    let err = wait_err(&pair, "ge", "refused");
    assert!(
        err.contains(
            "source generation expression of column \"g\" of public.evil is not a single expression"
        ),
        "{err}"
    );
    assert!(!dst_has_table(&pair, "evil"));
    assert_nothing_ran(&pair);
}

#[test]
fn a_default_that_runs_a_second_statement_is_refused() {
    let pair = pair_with_canary();
    pair.src
        .execute("CREATE TABLE public.evil (id int PRIMARY KEY)");
    lie(
        &pair.src,
        "pg_get_expr",
        "pg_node_tree, oid",
        "pg_get_expr",
        "4242",
        "4242; DROP TABLE public.canary; --",
    );
    // Modes that never copy add a column with the source's default (for
    // the rows the destination already has).
    pair.add_connector_with("df", "public.evil", "null");
    pair.start("df", "no_data");
    wait_rows(&pair, "evil", 0);
    pair.src.execute("INSERT INTO public.evil VALUES (1), (2)");
    wait_rows(&pair, "evil", 2);
    pair.src.execute(
        "ALTER TABLE public.evil ADD COLUMN d int DEFAULT 4242;
         INSERT INTO public.evil VALUES (3)",
    );
    let err = wait_err(&pair, "df", "refused");
    assert!(
        err.contains("source default of column \"d\" of public.evil is not a single expression"),
        "{err}"
    );
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM information_schema.columns
              WHERE table_schema = 'postgres' AND table_name = 'evil' AND column_name = 'd'"
        ),
        0
    );
    assert_nothing_ran(&pair);
}

#[test]
fn a_volatile_default_is_not_evaluated_here() {
    let pair = pair_with_canary();
    pair.src
        .execute("CREATE TABLE public.vol (id int PRIMARY KEY)");
    pair.add_connector_with("vf", "public.vol", "null");
    pair.start("vf", "no_data");
    wait_rows(&pair, "vol", 0);
    pair.src.execute("INSERT INTO public.vol VALUES (1), (2)");
    wait_rows(&pair, "vol", 2);
    pair.src.execute(
        "ALTER TABLE public.vol ADD COLUMN d text
           DEFAULT pg_catalog.set_config('synchdb.pwned', 'yes', false);
         INSERT INTO public.vol VALUES (3)",
    );
    wait_rows(&pair, "vol", 3);
    // Added without the default: existing rows hold NULL, the new row the
    // source's value.
    assert_eq!(
        pair.dst
            .query_strings("SELECT d FROM postgres.vol ORDER BY id"),
        vec![vec![None], vec![None], vec![Some("yes".to_string())]]
    );
    assert!(pair.dst.log_contents().contains(
        "calls a function that is not an immutable built-in; the column is added without it"
    ));
    assert_nothing_ran(&pair);
    let st = pair.state("vf").expect("state row");
    assert_eq!(st.err, "no error", "{st:?}");
}

#[test]
fn nasty_but_genuine_text_is_quoted_and_replicated() {
    let pair = pair_with_canary();
    pair.src.execute(
        r#"CREATE TYPE public."mood""; DROP TABLE public.canary; --" AS
             ENUM ('ok', 'it''s''); DROP TABLE public.canary; --', 'semi;colon /* x', E'back\\slash');
           CREATE DOMAIN public."d""; DROP TABLE public.canary; --" AS text
             CHECK (VALUE <> 'x''); DROP TABLE public.canary; --' AND VALUE !~ '/\*');
           CREATE TABLE public.nasty (
             id int PRIMARY KEY,
             m public."mood""; DROP TABLE public.canary; --",
             t public."d""; DROP TABLE public.canary; --",
             s text DEFAULT '''); DROP TABLE public.canary; --',
             g text GENERATED ALWAYS AS (s || '; DROP TABLE public.canary; -- $$') STORED,
             "c""; DROP TABLE public.canary; --" varchar(7)[]);"#,
    );
    pair.add_connector_with("ok", "public.nasty", "null");
    pair.start("ok", "no_data");
    wait_rows(&pair, "nasty", 0);
    pair.src.execute(
        r#"INSERT INTO public.nasty (id, m, t, "c""; DROP TABLE public.canary; --") VALUES
             (1, 'it''s''); DROP TABLE public.canary; --', 'a''; b', '{"x;y",NULL}'),
             (2, 'semi;colon /* x', NULL, NULL),
             (3, E'back\\slash', 'z', '{}');
           INSERT INTO public.nasty (id, m, s) VALUES (4, 'ok', 'own value');"#,
    );
    pair.wait_tables_equal("public.nasty", "postgres.nasty", "id");
    // A column added later with a default full of quotes and semicolons:
    // existing destination rows get it, as on the source.
    pair.src.execute(
        "ALTER TABLE public.nasty ADD COLUMN later text DEFAULT 'a''); DROP TABLE public.canary; -- /*';
         INSERT INTO public.nasty (id, m) VALUES (5, 'ok')",
    );
    wait_rows(&pair, "nasty", 5);
    pair.wait_tables_equal("public.nasty", "postgres.nasty", "id");
    assert_nothing_ran(&pair);
    let st = pair.state("ok").expect("state row");
    assert_eq!(st.err, "no error", "{st:?}");
}

/// `attname: format_type` of a table's columns.
fn column_types(c: &Cluster, table: &str) -> Vec<Vec<Option<String>>> {
    c.query_strings(&format!(
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
          WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped
          ORDER BY attnum"
    ))
}

#[test]
fn built_in_type_names_keep_their_typmods() {
    // What the source's format_type writes must resolve here to the same
    // type and typmod, when a table is created and when it is reshaped.
    let pair = pair_with_canary();
    pair.src.execute(
        r#"CREATE TYPE public.pair AS (x numeric(6,2), y varchar(3)[]);
           CREATE TYPE public.frange AS RANGE (subtype = float8);
           CREATE DOMAIN public.small AS numeric(4,1) CHECK (VALUE > 0) CHECK (VALUE < 100);
           CREATE TABLE public.typed (
             id int PRIMARY KEY, a character varying(10), b numeric(12,3),
             c timestamp(3) with time zone, d integer[], e interval year to month,
             f bit varying(5), g "char", h time(2) without time zone, i character(4)[],
             j double precision, k information_schema.cardinal_number,
             l interval day to second(2), m bigint[][],
             n int GENERATED ALWAYS AS (coalesce(array_length(d, 1), 0) + 1) STORED,
             u public.pair, v public.frange, w public.small[]);
           INSERT INTO public.typed (id, a, b, c, d, e, f, g, h, i, j, k, l, m, u, v, w) VALUES
             (1, 'x;y', 1.5, '2024-01-02 03:04:05.678+00', '{1,2}', '1 year 2 mons', B'101',
              'q', '01:02:03.45', '{ab,NULL}', 1e300, 7, '1 day 00:00:01.25', '{{1,2},{3,4}}',
              '(1.25,"{a,bc}")', '[1.5,2.5)', '{1.5,99.9}'),
             (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
              NULL, NULL, NULL);"#,
    );
    // The user-defined types' parts, as each side defines them.
    let parts = |c: &Cluster, schema: &str| {
        c.query_strings(&format!(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
              WHERE a.attrelid = (SELECT typrelid FROM pg_type WHERE oid = '{schema}.pair'::regtype)
             UNION ALL SELECT format_type(typbasetype, typtypmod) FROM pg_type
              WHERE oid = '{schema}.small'::regtype
             UNION ALL (SELECT pg_get_constraintdef(oid) FROM pg_constraint
              WHERE contypid = '{schema}.small'::regtype ORDER BY 1)
             UNION ALL SELECT format_type(rngsubtype, NULL) FROM pg_range
              WHERE rngtypid = '{schema}.frange'::regtype"
        ))
    };
    pair.add_connector_with("tm", "public.typed", "null");
    pair.start("tm", "initial");
    pair.wait_tables_equal("public.typed", "postgres.typed", "id");
    assert_eq!(
        column_types(&pair.src, "public.typed"),
        column_types(&pair.dst, "postgres.typed")
    );
    assert_eq!(parts(&pair.src, "public"), parts(&pair.dst, "postgres"));
    // Columns added to a table with rows: it is copied again, reshaped.
    pair.src.execute(
        "ALTER TABLE public.typed ADD COLUMN o numeric(5,1)[],
                                  ADD COLUMN p text GENERATED ALWAYS AS (a || '; --') STORED;
         UPDATE public.typed SET o = '{1.5}' WHERE id = 1;",
    );
    wait_until(LONG, "the added columns", || {
        column_types(&pair.dst, "postgres.typed").len() == 20
    });
    pair.wait_tables_equal("public.typed", "postgres.typed", "id");
    assert_eq!(
        column_types(&pair.src, "public.typed"),
        column_types(&pair.dst, "postgres.typed")
    );
    assert_nothing_ran(&pair);
    let st = pair.state("tm").expect("state row");
    assert_eq!(st.err, "no error", "{st:?}");
}
