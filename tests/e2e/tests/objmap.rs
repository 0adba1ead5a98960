//! Object mappings end to end (README, "Object mapping"): a table landed in
//! `public` under another name, a column renamed, int4 mapped to bigint for
//! every column and a text column to varchar(40) for one, transforms on a
//! text and a numeric column; each in the snapshot and in CDC (insert,
//! update, delete, truncate) and across a source schema change; a mapping
//! reloaded into a running connector; `synchdb_att_view`; the ERRORs of bad
//! input, with nothing stored. Source and destination data are compared in
//! every test.

use std::time::Duration;
use synchdb_e2e::*;

/// Waits until `dst_sql` on the destination returns what `src_sql` returns
/// on the source (both ordered), then returns the rows.
fn wait_same(pair: &Pair, src_sql: &str, dst_sql: &str) -> Vec<Vec<Option<String>>> {
    let mut last = (Vec::new(), Vec::new());
    let ok = {
        let start = std::time::Instant::now();
        loop {
            let a = pair.src.query_strings(src_sql);
            let b = pair.dst.try_query_strings(dst_sql).unwrap_or_default();
            if a == b && !a.is_empty() {
                break true;
            }
            last = (a, b);
            if start.elapsed() > LONG {
                break false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert!(
        ok,
        "destination differs\nsource: {:?}\ndestination: {:?}\nconnectors: {:?}",
        last.0,
        last.1,
        pair.dst
            .try_query_strings("SELECT name, stage, state, err FROM synchdb_state_view")
    );
    pair.src.query_strings(src_sql)
}

fn column_type(pair: &Pair, table: &str, column: &str) -> Option<String> {
    pair.dst.query_one_string(&format!(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
          WHERE attrelid = '{table}'::regclass AND attname = '{column}' AND NOT attisdropped"
    ))
}

fn objmap(pair: &Pair, name: &str, objtype: &str, srcobj: &str, dstobj: &str) {
    pair.dst.execute(&format!(
        "SELECT synchdb_add_objmap('{name}', '{objtype}', '{srcobj}', {})",
        literal(dstobj)
    ));
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[test]
fn table_column_and_datatype_mappings_in_snapshot_cdc_and_schema_changes() {
    let pair = Pair::new();
    pair.src.execute(
        "CREATE INDEX orders_customer_idx ON public.orders (customer) INCLUDE (amount);
         CREATE INDEX orders_lower_idx ON public.orders (lower(customer));
         CREATE TYPE public.mood AS ENUM ('sad', 'ok');
         CREATE TABLE public.moods (id int PRIMARY KEY, m public.mood, tags int[]);
         INSERT INTO public.moods VALUES (1, 'sad', '{1,2}'), (2, 'ok', NULL);",
    );
    pair.add_connector("om");
    // One column of an enum type and one of an array type, as text.
    objmap(&pair, "om", "datatype", "postgres.public.moods.m", "text");
    objmap(
        &pair,
        "om",
        "datatype",
        "postgres.public.moods.tags",
        "text",
    );
    objmap(
        &pair,
        "om",
        "table",
        "postgres.public.orders",
        "orders_copy",
    );
    objmap(
        &pair,
        "om",
        "column",
        "postgres.public.orders.customer",
        "buyer",
    );
    objmap(&pair, "om", "datatype", "int4", "bigint");
    objmap(
        &pair,
        "om",
        "datatype",
        "postgres.public.customers.name",
        "varchar|40",
    );
    pair.start("om", "initial");

    // Snapshot: the rows, where the mappings put them.
    wait_same(
        &pair,
        "SELECT id, customer, amount FROM public.orders ORDER BY id",
        "SELECT id, buyer, amount FROM public.orders_copy ORDER BY id",
    );
    wait_same(
        &pair,
        "SELECT id, name FROM public.customers ORDER BY id",
        "SELECT id, name FROM postgres.customers ORDER BY id",
    );
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM pg_class WHERE relname = 'orders' AND relnamespace = 'postgres'::regnamespace"),
        0,
        "the mapped table is not also created under its own name"
    );
    assert_eq!(
        column_type(&pair, "public.orders_copy", "id").as_deref(),
        Some("bigint")
    );
    assert_eq!(
        column_type(&pair, "public.orders_copy", "buyer").as_deref(),
        Some("text")
    );
    assert_eq!(
        column_type(&pair, "postgres.customers", "id").as_deref(),
        Some("bigint")
    );
    assert_eq!(
        column_type(&pair, "postgres.customers", "name").as_deref(),
        Some("character varying(40)")
    );
    let moods_src = "SELECT id, m::text, tags::text FROM public.moods ORDER BY id";
    let moods_dst = "SELECT id, m, tags FROM postgres.moods ORDER BY id";
    wait_same(&pair, moods_src, moods_dst);
    assert_eq!(
        column_type(&pair, "postgres.moods", "m").as_deref(),
        Some("text")
    );
    assert_eq!(
        column_type(&pair, "postgres.moods", "tags").as_deref(),
        Some("text")
    );

    // A secondary index on a renamed column is built on its new name; an
    // expression naming it is not (a WARNING says so).
    assert_eq!(
        pair.dst.query_one_string(
            "SELECT indexdef FROM pg_indexes
              WHERE schemaname = 'public' AND indexname = 'orders_customer_idx'"
        ),
        Some(
            "CREATE INDEX orders_customer_idx ON public.orders_copy USING btree (buyer) INCLUDE (amount)"
                .into()
        )
    );
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_lower_idx'"),
        0
    );

    // synchdb_att_view: each source column and what it became.
    let att = pair.dst.query_strings(
        "SELECT type, attnum::text, ext_tbname, pg_tbname, ext_attname, pg_attname,
                ext_atttypename, pg_atttypename, transform
           FROM synchdb_att_view WHERE name = 'om' AND ext_tbname = 'postgres.public.orders'
          ORDER BY attnum",
    );
    let row = |v: &[&str]| -> Vec<Option<String>> {
        v.iter()
            .map(|s| (!s.is_empty()).then(|| s.to_string()))
            .collect()
    };
    assert_eq!(
        att[..2],
        [
            row(&[
                "postgres",
                "1",
                "postgres.public.orders",
                "public.orders_copy",
                "id",
                "id",
                "integer",
                "bigint",
                ""
            ]),
            row(&[
                "postgres",
                "2",
                "postgres.public.orders",
                "public.orders_copy",
                "customer",
                "buyer",
                "text",
                "text",
                ""
            ]),
        ],
        "{att:?}"
    );

    // CDC: insert, update (also of the key), delete, truncate.
    pair.src.execute(
        "INSERT INTO public.orders (id, customer, amount) VALUES (1001, 'new', 3.5);
         UPDATE public.orders SET customer = 'changed' WHERE id = 5;
         UPDATE public.orders SET id = 2000 WHERE id = 6;
         DELETE FROM public.orders WHERE id = 7;
         TRUNCATE public.customers;
         INSERT INTO public.customers (name) VALUES ('after truncate');
         INSERT INTO public.moods VALUES (3, 'ok', '{3}');
         UPDATE public.moods SET m = 'ok', tags = '{}' WHERE id = 1;",
    );
    wait_same(&pair, moods_src, moods_dst);
    wait_same(
        &pair,
        "SELECT id, customer, amount FROM public.orders ORDER BY id",
        "SELECT id, buyer, amount FROM public.orders_copy ORDER BY id",
    );
    wait_same(
        &pair,
        "SELECT id, name FROM public.customers ORDER BY id",
        "SELECT id, name FROM postgres.customers ORDER BY id",
    );

    // A source schema change on the mapped table lands in it, mapped
    // (int4 → bigint for the new column too).
    pair.src.execute(
        "ALTER TABLE public.orders ADD COLUMN qty int;
         UPDATE public.orders SET qty = id % 7 WHERE id % 3 = 0;
         INSERT INTO public.orders (id, customer, amount, qty) VALUES (1002, 'with qty', 1, 42);",
    );
    wait_same(
        &pair,
        "SELECT id, customer, amount, qty FROM public.orders ORDER BY id",
        "SELECT id, buyer, amount, qty FROM public.orders_copy ORDER BY id",
    );
    assert_eq!(
        column_type(&pair, "public.orders_copy", "qty").as_deref(),
        Some("bigint")
    );
    // A source rename of a mapped column: the mapping names the old source
    // column, so the destination column follows the source's new name.
    pair.src.execute(
        "ALTER TABLE public.orders RENAME COLUMN customer TO client;
         INSERT INTO public.orders (id, client, amount) VALUES (1003, 'renamed', 2);",
    );
    wait_same(
        &pair,
        "SELECT id, client, amount, qty FROM public.orders ORDER BY id",
        "SELECT id, client, amount, qty FROM public.orders_copy ORDER BY id",
    );
    assert_eq!(pair.state("om").map(|s| s.err), Some("no error".into()));
}

#[test]
fn transforms_in_snapshot_cdc_and_schema_changes() {
    let pair = Pair::new();
    pair.src.execute(
        "CREATE TABLE public.items (id int PRIMARY KEY, label text, qty int, price numeric(8,2));
         INSERT INTO public.items
           SELECT g, CASE WHEN g % 10 = 0 THEN NULL ELSE 'item ' || g END, g, g * 0.5
             FROM generate_series(1, 50) g;",
    );
    // A transformed key: rows are found by the transformed value.
    pair.src.execute(
        "CREATE TABLE public.codes (code text PRIMARY KEY, v int);
         INSERT INTO public.codes SELECT 'c' || g, g FROM generate_series(1, 20) g;",
    );
    pair.add_connector_with("tf", "public.items,public.codes", "null");
    objmap(
        &pair,
        "tf",
        "transform",
        "postgres.public.codes.code",
        "upper(%d) || '-' || length(%d)",
    );
    objmap(
        &pair,
        "tf",
        "transform",
        "postgres.public.items.label",
        "'%d' || '_x'",
    );
    objmap(
        &pair,
        "tf",
        "datatype",
        "postgres.public.items.qty",
        "bigint",
    );
    objmap(
        &pair,
        "tf",
        "transform",
        "postgres.public.items.qty",
        "%d * 100",
    );
    pair.start("tf", "initial");
    let expected =
        "SELECT id, label || '_x', qty::bigint * 100, price FROM public.items ORDER BY id";
    let got = "SELECT id, label, qty, price FROM postgres.items ORDER BY id";
    let rows = wait_same(&pair, expected, got);
    assert_eq!(
        rows[0],
        vec![
            Some("1".into()),
            Some("item 1_x".into()),
            Some("100".into()),
            Some("0.50".into())
        ]
    );
    // The transform is shown with its column.
    assert_eq!(
        pair.dst.query_one_string(
            "SELECT transform FROM synchdb_att_view
              WHERE name = 'tf' AND ext_attname = 'label'"
        ),
        Some("'%d' || '_x'".into())
    );

    pair.src.execute(
        "INSERT INTO public.items VALUES (100, 'new', 7, 1.5), (101, NULL, NULL, NULL);
         UPDATE public.items SET label = 'upd', qty = qty + 1 WHERE id BETWEEN 1 AND 5;
         UPDATE public.items SET price = 9 WHERE id = 8;
         DELETE FROM public.items WHERE id IN (9, 10);",
    );
    wait_same(&pair, expected, got);
    let codes_src = "SELECT upper(code) || '-' || length(code), v FROM public.codes ORDER BY 1";
    let codes_dst = "SELECT code, v FROM postgres.codes ORDER BY 1";
    wait_same(&pair, codes_src, codes_dst);
    pair.src.execute(
        "UPDATE public.codes SET v = -v WHERE code IN ('c1', 'c2');
         UPDATE public.codes SET code = 'renamed' WHERE code = 'c3';
         DELETE FROM public.codes WHERE code IN ('c4', 'c15');
         INSERT INTO public.codes VALUES ('new', 99);",
    );
    wait_same(&pair, codes_src, codes_dst);
    assert_eq!(
        pair.dst
            .query_one_string("SELECT v::text FROM postgres.codes WHERE code = 'RENAMED-7'"),
        Some("3".into())
    );

    // A column added on the source follows; the transforms stay.
    pair.src.execute(
        "ALTER TABLE public.items ADD COLUMN note text;
         INSERT INTO public.items VALUES (102, 'late', 3, 2, 'a note');
         UPDATE public.items SET note = 'n' WHERE id = 11;",
    );
    let expected =
        "SELECT id, label || '_x', qty::bigint * 100, price, note FROM public.items ORDER BY id";
    let got = "SELECT id, label, qty, price, note FROM postgres.items ORDER BY id";
    wait_same(&pair, expected, got);
    pair.src
        .execute("TRUNCATE public.items; INSERT INTO public.items VALUES (1, 'one', 1, 1, NULL);");
    wait_same(&pair, expected, got);
    assert_eq!(pair.state("tf").map(|s| s.err), Some("no error".into()));
}

#[test]
fn reload_into_a_running_connector() {
    let pair = Pair::new();
    pair.add_connector_with("rl", "public.customers", "null");
    pair.start("rl", "initial");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    let pid = pair.state("rl").map(|s| s.pid);

    objmap(
        &pair,
        "rl",
        "transform",
        "postgres.public.customers.name",
        "upper(%d)",
    );
    // Stored, but not used before the reload.
    pair.src
        .execute("INSERT INTO public.customers (name) VALUES ('before reload')");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");

    pair.dst.execute("SELECT synchdb_reload_objmap('rl')");
    pair.src.execute(
        "INSERT INTO public.customers (name) VALUES ('after reload');
         UPDATE public.customers SET name = 'updated' WHERE id = 2;",
    );
    // New changes follow the mapping; rows already there are not rewritten.
    wait_same(
        &pair,
        "SELECT id, CASE WHEN id = 2 OR name = 'after reload' THEN upper(name) ELSE name END
           FROM public.customers ORDER BY id",
        "SELECT id, name FROM postgres.customers ORDER BY id",
    );
    assert_eq!(
        pair.state("rl").map(|s| s.pid),
        pid,
        "the worker was not restarted"
    );

    // Disabled and reloaded: values pass unchanged again.
    // Disabled and reloaded in one transaction: the worker is asked at
    // commit (before, it could not see the change).
    pair.dst.execute(
        "BEGIN;
         SELECT synchdb_del_objmap('rl', 'transform', 'postgres.public.customers.name');
         SELECT synchdb_reload_objmap('rl');
         COMMIT;",
    );
    wait_until(LONG, "the second reload", || {
        pair.dst
            .log_contents()
            .matches("connector \"rl\" reloaded its object mappings")
            .count()
            == 2
    });
    assert_eq!(
        pair.dst.query_one_string(
            "SELECT enabled::text FROM synchdb_objmap WHERE name = 'rl' AND objtype = 'transform'"
        ),
        Some("false".into())
    );
    pair.src
        .execute("INSERT INTO public.customers (name) VALUES ('mixed Case')");
    wait_same(
        &pair,
        "SELECT id, name FROM public.customers WHERE name = 'mixed Case'",
        "SELECT id, name FROM postgres.customers WHERE name = 'mixed Case'",
    );

    // A column mapping reloaded in a mode that copies: the table is copied
    // again under its new column name (the rows transformed before come
    // back as the source has them: nothing transforms them any more).
    objmap(
        &pair,
        "rl",
        "column",
        "postgres.public.customers.name",
        "full_name",
    );
    pair.dst.execute("SELECT synchdb_reload_objmap('rl')");
    pair.src
        .execute("INSERT INTO public.customers (name) VALUES ('after rename')");
    wait_same(
        &pair,
        "SELECT id, name FROM public.customers ORDER BY id",
        "SELECT id, full_name FROM postgres.customers ORDER BY id",
    );
    assert_eq!(pair.state("rl").map(|s| s.err), Some("no error".into()));
}

#[test]
fn bad_input_is_refused_and_nothing_is_stored() {
    let pair = Pair::new();
    pair.add_connector("bad");
    let add = |args: &str| {
        sqlstate(
            pair.dst
                .try_execute(&format!("SELECT synchdb_add_objmap({args})")),
        )
    };
    assert_eq!(
        add("'nope', 'table', 'postgres.public.orders', 'x'"),
        "42704"
    );
    assert_eq!(add("'bad', 'notexist', 'notexist', 'notexist'"), "22023");
    assert_eq!(add("'bad', 'table', 'orders', 'x'"), "22023");
    assert_eq!(add("'bad', 'table', 'otherdb.public.orders', 'x'"), "22023");
    assert_eq!(add("'bad', 'column', 'public.orders.id', 'x'"), "22023");
    assert_eq!(
        add("'bad', 'column', 'postgres.public.orders.id', 'a.b'"),
        "22023"
    );
    assert_eq!(
        add("'bad', 'table', 'postgres.public.orders', 'pg_catalog.x'"),
        "22023"
    );
    // A destination table that exists and is not the connector's.
    pair.dst.execute("CREATE TABLE public.taken (id int)");
    assert_eq!(
        add("'bad', 'table', 'postgres.public.orders', 'taken'"),
        "42P07"
    );
    assert_eq!(
        add("'bad', 'table', 'postgres.public.orders', 'public.synchdb_conninfo'"),
        "42P07"
    );
    // A schema another role may create in.
    pair.dst
        .execute("CREATE ROLE mallory LOGIN; CREATE SCHEMA mal AUTHORIZATION mallory;");
    assert_eq!(
        add("'bad', 'table', 'postgres.public.orders', 'mal.orders'"),
        "42501"
    );
    // Two source tables onto one destination.
    assert_eq!(
        add("'bad', 'table', 'postgres.public.orders', 'public.o2'"),
        "ok"
    );
    assert_eq!(
        add("'bad', 'table', 'postgres.public.customers', 'o2'"),
        "42710"
    );
    // Types that do not exist, or are not built in.
    assert_eq!(add("'bad', 'datatype', 'int4', 'nosuchtype'"), "42704");
    assert_eq!(add("'bad', 'datatype', 'nosuchtype', 'text'"), "42704");
    assert_eq!(add("'bad', 'datatype', 'int4', 'bigint|x'"), "22023");
    assert_eq!(add("'bad', 'datatype', 'int4[]', 'text'"), "22023");
    pair.dst.execute("CREATE TYPE public.color AS ENUM ('red')");
    assert_eq!(add("'bad', 'datatype', 'int4', 'public.color'"), "42704");
    // Transforms that do not parse, or are more than one expression.
    assert_eq!(
        add("'bad', 'transform', 'postgres.public.orders.customer', '''%d'' ||'"),
        "42601"
    );
    assert_eq!(
        add("'bad', 'transform', 'postgres.public.orders.customer', '%d; DROP TABLE x'"),
        "42601"
    );
    assert_eq!(
        add("'bad', 'transform', 'postgres.public.orders.customer', '(SELECT 1) FROM pg_class'"),
        "42601"
    );
    assert_eq!(
        add("'bad', 'transform', 'postgres.public.orders.customer', '$1'"),
        "42601"
    );
    // Only superusers.
    pair.dst.execute("CREATE ROLE joe LOGIN");
    let mut joe = pair.dst.client_as("joe");
    let r = joe.batch_execute(
        "SELECT synchdb_add_objmap('bad', 'column', 'postgres.public.orders.id', 'x')",
    );
    assert_eq!(sqlstate(r), "42501");
    pair.dst
        .execute("GRANT EXECUTE ON FUNCTION synchdb_add_objmap(text, text, text, text) TO joe");
    let r = joe.batch_execute(
        "SELECT synchdb_add_objmap('bad', 'column', 'postgres.public.orders.id', 'x')",
    );
    assert_eq!(sqlstate(r), "42501");

    // Only the one good mapping is stored, in canonical form.
    assert_eq!(
        pair.dst
            .query_strings("SELECT objtype, enabled::text, srcobj, dstobj FROM synchdb_objmap"),
        vec![vec![
            Some("table".into()),
            Some("true".into()),
            Some("postgres.public.orders".into()),
            Some("public.o2".into())
        ]]
    );
    assert_eq!(
        sqlstate(pair.dst.try_execute(
            "SELECT synchdb_del_objmap('bad', 'column', 'postgres.public.orders.nope')"
        )),
        "42704"
    );
    assert_eq!(
        sqlstate(pair.dst.try_execute("SELECT synchdb_reload_objmap('bad')")),
        "55000"
    );
    assert_eq!(
        sqlstate(pair.dst.try_execute("SELECT synchdb_reload_objmap('nope')")),
        "42704"
    );
    // Deleting the connector deletes its mappings.
    pair.dst.execute("SELECT synchdb_del_conninfo('bad')");
    assert_eq!(pair.dst.count("SELECT count(*) FROM synchdb_objmap"), 0);
}

#[test]
fn schemasync_shows_mapped_tables_and_takes_changed_mappings_on_resume() {
    let pair = Pair::new();
    pair.add_connector_with("sm", "public.orders", "null");
    objmap(
        &pair,
        "sm",
        "table",
        "postgres.public.orders",
        "public.sales",
    );
    objmap(
        &pair,
        "sm",
        "column",
        "postgres.public.orders.amount",
        "total",
    );
    pair.start("sm", "schemasync");
    wait_until(LONG, "paused in schema sync", || {
        pair.state("sm")
            .is_some_and(|s| s.stage == "schema sync" && s.state == "paused")
    });
    // Tables built, with the mappings, before any data.
    assert_eq!(pair.dst.count("SELECT count(*) FROM public.sales"), 0);
    let att = pair.dst.query_strings(
        "SELECT pg_tbname, ext_attname, pg_attname, pg_atttypename FROM synchdb_att_view
          WHERE name = 'sm' ORDER BY attnum",
    );
    assert_eq!(
        att[2],
        vec![
            Some("public.sales".into()),
            Some("amount".into()),
            Some("total".into()),
            Some("numeric(10,2)".into())
        ],
        "{att:?}"
    );
    // The operator reviews and adjusts, then resumes.
    objmap(
        &pair,
        "sm",
        "column",
        "postgres.public.orders.amount",
        "amount_usd",
    );
    objmap(
        &pair,
        "sm",
        "datatype",
        "postgres.public.orders.id",
        "bigint",
    );
    pair.dst.execute("SELECT synchdb_resume_engine('sm')");
    wait_same(
        &pair,
        "SELECT id, customer, amount FROM public.orders ORDER BY id",
        "SELECT id, customer, amount_usd FROM public.sales ORDER BY id",
    );
    assert_eq!(
        column_type(&pair, "public.sales", "id").as_deref(),
        Some("bigint")
    );
    pair.src.execute(
        "UPDATE public.orders SET amount = 1 WHERE id < 5; DELETE FROM public.orders WHERE id = 9;",
    );
    wait_same(
        &pair,
        "SELECT id, customer, amount FROM public.orders ORDER BY id",
        "SELECT id, customer, amount_usd FROM public.sales ORDER BY id",
    );
    assert_eq!(pair.state("sm").map(|s| s.err), Some("no error".into()));
}

#[test]
fn transforms_run_as_the_tables_owner() {
    let pair = Pair::new();
    pair.add_connector_with("ow", "public.customers", "null");
    pair.dst.execute(
        "UPDATE synchdb_conninfo SET data = jsonb_set(data, '{apply_as_table_owner}', 'true')
          WHERE name = 'ow'",
    );
    objmap(
        &pair,
        "ow",
        "transform",
        "postgres.public.customers.name",
        "upper(%d) || '/' || current_user",
    );
    pair.start("ow", "initial");
    wait_same(
        &pair,
        "SELECT id, upper(name) || '/postgres' FROM public.customers ORDER BY id",
        "SELECT id, name FROM postgres.customers ORDER BY id",
    );
    // A DBA gives the table to a role that is not a superuser: the
    // transform runs with its rights, in CDC and in a fresh copy.
    pair.dst.execute(
        "CREATE ROLE app NOLOGIN;
         GRANT USAGE ON SCHEMA postgres TO app;
         ALTER TABLE postgres.customers OWNER TO app;",
    );
    pair.src
        .execute("INSERT INTO public.customers (name) VALUES ('streamed')");
    wait_same(
        &pair,
        "SELECT id, upper(name) || CASE WHEN name = 'streamed' THEN '/app' ELSE '/postgres' END
           FROM public.customers ORDER BY id",
        "SELECT id, name FROM postgres.customers ORDER BY id",
    );
    pair.dst
        .execute("SELECT synchdb_restart_connector('ow', 'always')");
    wait_same(
        &pair,
        "SELECT id, upper(name) || '/app' FROM public.customers ORDER BY id",
        "SELECT id, name FROM postgres.customers ORDER BY id",
    );
    assert_eq!(
        pair.dst
            .query_one_string("SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE oid = 'postgres.customers'::regclass"),
        Some("app".into())
    );
    assert_eq!(pair.state("ow").map(|s| s.err), Some("no error".into()));
}

#[test]
fn a_column_mapping_reloaded_renames_in_place_in_no_data() {
    let pair = Pair::new();
    pair.add_connector_with("nd", "public.orders", "null");
    pair.start("nd", "no_data");
    wait_until(LONG, "the empty table", || {
        pair.dst
            .try_query_strings("SELECT count(*) FROM postgres.orders")
            .is_ok()
    });
    pair.src.execute(
        "INSERT INTO public.orders (id, customer, amount) VALUES (1001, 'streamed', 1), (1002, 'too', 2)",
    );
    let src = "SELECT id, customer, amount FROM public.orders WHERE id > 1000 ORDER BY id";
    wait_same(
        &pair,
        src,
        "SELECT id, customer, amount FROM postgres.orders ORDER BY id",
    );
    objmap(
        &pair,
        "nd",
        "column",
        "postgres.public.orders.customer",
        "buyer",
    );
    objmap(
        &pair,
        "nd",
        "datatype",
        "postgres.public.orders.amount",
        "numeric(12,3)",
    );
    pair.dst.execute("SELECT synchdb_reload_objmap('nd')");
    pair.src.execute(
        "INSERT INTO public.orders (id, customer, amount) VALUES (1003, 'mapped', 3);
         UPDATE public.orders SET customer = 'changed' WHERE id = 1001;",
    );
    // Renamed and retyped in place: the rows already there are kept (this
    // mode copies nothing), the new ones land under the new name.
    wait_same(
        &pair,
        "SELECT id, customer, amount::numeric(12,3) FROM public.orders WHERE id > 1000 ORDER BY id",
        "SELECT id, buyer, amount FROM postgres.orders ORDER BY id",
    );
    assert_eq!(
        column_type(&pair, "postgres.orders", "amount").as_deref(),
        Some("numeric(12,3)")
    );
    assert_eq!(pair.state("nd").map(|s| s.err), Some("no error".into()));
}
