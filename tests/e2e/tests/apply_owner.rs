//! Writes run as the destination table's owner (README, Security): the
//! worker is a superuser, and code a table's owner planted in it
//! (triggers, constraint triggers deferred to commit, column defaults)
//! must run with the owner's rights only, on both apply paths (direct
//! executor and prepared statements), for TRUNCATE and for the snapshot
//! copy; settings that code changes must not outlive the change; tables
//! the connector created are written as the worker, as before.
//!
//! Every test builds its own source and destination and waits on
//! conditions with timeouts.

use std::time::{Duration, Instant};
use synchdb_e2e::*;

const NAME: &str = "owner";

/// Polls `f` until it holds; on timeout panics with `what` and the
/// connector's state row.
fn wait_reporting(pair: &Pair, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > LONG {
            panic!(
                "timed out waiting for {what}; connector {NAME}: {:?}",
                pair.state(NAME)
            );
        }
        std::thread::sleep(Duration::from_millis(150));
    }
}

fn wait_streaming(pair: &Pair) {
    wait_reporting(pair, "change data capture", || {
        pair.state(NAME)
            .is_some_and(|s| s.pid > 0 && s.stage == "change data capture")
    });
}

/// The connector's error once its worker has stopped on it.
fn wait_stopped_on_error(pair: &Pair) -> String {
    wait_for_value(LONG, "the worker to stop on an error", || {
        pair.state(NAME)
            .filter(|s| s.pid == -1 && s.err != "no error")
            .map(|s| s.err)
    })
}

/// Tells the connector it may write into tables of roles that are not
/// superusers (as those roles).
fn allow_other_owners(pair: &Pair) {
    pair.dst.execute(&format!(
        "UPDATE synchdb_conninfo SET data = jsonb_set(data, '{{apply_as_table_owner}}', 'true')
          WHERE name = '{NAME}'"
    ));
}

fn set_strategy(pair: &Pair, strategy: &str) {
    pair.dst.execute(&format!(
        "ALTER SYSTEM SET synchdb.error_handling_strategy = '{strategy}'"
    ));
    pair.dst.execute("SELECT pg_reload_conf()");
    wait_until(LONG, "the strategy in effect", || {
        pair.dst
            .query_one_string("SELECT lower(current_setting('synchdb.error_handling_strategy'))")
            .as_deref()
            == Some(strategy)
    });
}

fn is_superuser(pair: &Pair, role: &str) -> bool {
    pair.dst.count(&format!(
        "SELECT count(*) FROM pg_roles WHERE rolname = '{role}' AND rolsuper"
    )) == 1
}

/// A non-superuser `app` and the audit table (owned by it) that its
/// trigger functions write into: which table, which operation, as whom,
/// under which search_path.
const APP: &str = "
    CREATE ROLE app NOLOGIN;
    CREATE SCHEMA IF NOT EXISTS postgres;
    GRANT USAGE ON SCHEMA postgres TO app;
    CREATE TABLE postgres.audit (n serial, tbl text, op text, usr text, path text);
    ALTER TABLE postgres.audit OWNER TO app;
    CREATE FUNCTION postgres.audit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO postgres.audit (tbl, op, usr, path)
        VALUES (TG_TABLE_NAME, TG_OP, current_user, pg_catalog.current_setting('search_path'));
      RETURN NULL;
    END $$;
    ALTER FUNCTION postgres.audit() OWNER TO app;";

/// Row and TRUNCATE audit triggers on `table`, enabled under
/// session_replication_role = replica.
fn audit_triggers(table: &str) -> String {
    format!(
        "CREATE TRIGGER audit_rows AFTER INSERT OR UPDATE OR DELETE ON {table}
           FOR EACH ROW EXECUTE FUNCTION postgres.audit();
         CREATE TRIGGER audit_truncate AFTER TRUNCATE ON {table}
           FOR EACH STATEMENT EXECUTE FUNCTION postgres.audit();
         ALTER TABLE {table} ENABLE ALWAYS TRIGGER audit_rows;
         ALTER TABLE {table} ENABLE ALWAYS TRIGGER audit_truncate;"
    )
}

/// `op:usr` for each audit row of `table`, in order.
fn audit(pair: &Pair, table: &str) -> Vec<String> {
    pair.dst
        .query_strings(&format!(
            "SELECT op || ':' || usr FROM postgres.audit WHERE tbl = '{table}' ORDER BY n"
        ))
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect()
}

#[test]
fn changes_apply_as_the_table_owner() {
    let pair = Pair::new();
    pair.src.execute(
        "CREATE TABLE public.t (id int PRIMARY KEY, v text);
         CREATE TABLE public.t2 (id int, v text);
         ALTER TABLE public.t2 REPLICA IDENTITY FULL;",
    );
    // Mode never: the user's tables, owned by app. t takes the direct
    // executor path, t2 (matched on the whole row) prepared statements.
    // t's CHECK constraint is app's code too (evaluated per row written,
    // and when the connector's DDL rewrites the table).
    pair.dst.execute(APP);
    pair.dst.execute(&format!(
        "CREATE FUNCTION postgres.checked(v text) RETURNS bool LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO postgres.audit (tbl, op, usr, path)
             VALUES ('t_check', 'CHECK', current_user, pg_catalog.current_setting('search_path'));
           RETURN true;
         END $$;
         ALTER FUNCTION postgres.checked(text) OWNER TO app;
         CREATE TABLE postgres.t (id int PRIMARY KEY, v text CHECK (postgres.checked(v)));
         CREATE TABLE postgres.t2 (id int, v text);
         ALTER TABLE postgres.t OWNER TO app;
         ALTER TABLE postgres.t2 OWNER TO app;
         {}{}",
        audit_triggers("postgres.t"),
        audit_triggers("postgres.t2")
    ));
    pair.add_connector_with(NAME, "public.t,public.t2", "null");
    allow_other_owners(&pair);
    pair.start(NAME, "never");
    wait_streaming(&pair);
    for t in ["t", "t2"] {
        pair.src.execute(&format!(
            "INSERT INTO public.{t} VALUES (1, 'a'), (2, 'b');
             UPDATE public.{t} SET v = 'a2' WHERE id = 1;
             DELETE FROM public.{t} WHERE id = 2;"
        ));
    }
    pair.wait_tables_equal("public.t", "postgres.t", "id");
    pair.wait_tables_equal("public.t2", "postgres.t2", "id");
    for t in ["t", "t2"] {
        assert_eq!(
            audit(&pair, t),
            ["INSERT:app", "INSERT:app", "UPDATE:app", "DELETE:app"],
            "{t}"
        );
    }
    assert_eq!(audit(&pair, "t_check"), ["CHECK:app"; 3]);

    // The column change the connector follows (mode never: in place, a
    // rewrite that checks every row) runs as app too.
    pair.src.execute(
        "ALTER TABLE public.t ALTER COLUMN v TYPE varchar(20);
         INSERT INTO public.t VALUES (4, 'd');",
    );
    pair.wait_tables_equal("public.t", "postgres.t", "id");
    assert_eq!(
        pair.dst.query_one_string(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = 'postgres.t'::regclass AND attname = 'v'"
        ),
        Some("character varying(20)".to_string())
    );
    assert_eq!(audit(&pair, "t_check"), ["CHECK:app"; 5]);
    // The owner's code sees the worker's own settings.
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.audit WHERE path <> '\"\"'"),
        0
    );

    pair.src.execute("TRUNCATE public.t, public.t2");
    wait_reporting(&pair, "the TRUNCATE", || {
        pair.dst
            .count("SELECT (SELECT count(*) FROM postgres.t) + (SELECT count(*) FROM postgres.t2)")
            == 0
    });
    for t in ["t", "t2"] {
        assert_eq!(
            audit(&pair, t).last().map(String::as_str),
            Some("TRUNCATE:app"),
            "{t}"
        );
    }
    assert!(!is_superuser(&pair, "app"));

    // Row-level security that binds the owner would be bypassed by the
    // executor path: the table is refused, with an error naming it.
    pair.dst.execute(
        "ALTER TABLE postgres.t ENABLE ROW LEVEL SECURITY;
         ALTER TABLE postgres.t FORCE ROW LEVEL SECURITY;",
    );
    pair.src.execute("INSERT INTO public.t VALUES (3, 'c')");
    let err = wait_stopped_on_error(&pair);
    assert!(err.contains("row-level security"), "{err}");
    assert!(err.contains("\"t\""), "{err}");
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.t"), 0);
}

/// A trigger function of app's that tries, by the row's value, to become
/// a superuser, create one, write where only superusers may, take the
/// worker's role, leave a setting behind, or report who and where it runs.
const ESCALATE: &str = "
    CREATE TABLE public.secret (note text);
    CREATE FUNCTION postgres.escalate() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      CASE NEW.v
        WHEN 'alter role' THEN ALTER ROLE app SUPERUSER;
        WHEN 'create role' THEN CREATE ROLE evil SUPERUSER;
        WHEN 'secret' THEN INSERT INTO public.secret VALUES ('from a trigger');
        WHEN 'set role' THEN SET ROLE postgres;
        WHEN 'guc' THEN PERFORM pg_catalog.set_config('search_path', 'postgres, pg_catalog', false);
        WHEN 'show' THEN NEW.v := 'show ' || current_user || ' ' || pg_catalog.current_setting('search_path');
        ELSE NULL;
      END CASE;
      RETURN NEW;
    END $$;
    ALTER FUNCTION postgres.escalate() OWNER TO app;
    CREATE FUNCTION postgres.later() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO public.secret VALUES ('from a deferred trigger');
      RETURN NULL;
    END $$;
    ALTER FUNCTION postgres.later() OWNER TO app;
    CREATE FUNCTION postgres.grab() RETURNS text LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO public.secret VALUES ('from a default');
      RETURN 'grabbed';
    END $$;
    ALTER FUNCTION postgres.grab() OWNER TO app;
    CREATE TABLE postgres.t (id int PRIMARY KEY, v text);
    ALTER TABLE postgres.t OWNER TO app;
    CREATE TRIGGER escalate BEFORE INSERT ON postgres.t
      FOR EACH ROW EXECUTE FUNCTION postgres.escalate();
    ALTER TABLE postgres.t ENABLE ALWAYS TRIGGER escalate;
    -- A trigger deferred to commit would run as the worker: PostgreSQL
    -- refuses to queue it inside the owner's restricted operation.
    CREATE TABLE postgres.t3 (id int PRIMARY KEY, v text);
    ALTER TABLE postgres.t3 OWNER TO app;
    CREATE CONSTRAINT TRIGGER later AFTER INSERT ON postgres.t3
      DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION postgres.later();
    ALTER TABLE postgres.t3 ENABLE ALWAYS TRIGGER later;
    -- A column of the user's whose default is app's code (prepared
    -- statement path: the source does not send it).
    CREATE TABLE postgres.t2 (id int PRIMARY KEY, v text, extra text DEFAULT postgres.grab());
    ALTER TABLE postgres.t2 OWNER TO app;";

#[test]
fn an_owners_code_cannot_escalate() {
    let pair = Pair::new();
    pair.src.execute(
        "CREATE TABLE public.t (id int PRIMARY KEY, v text);
         CREATE TABLE public.t2 (id int PRIMARY KEY, v text);
         CREATE TABLE public.t3 (id int PRIMARY KEY, v text);",
    );
    pair.dst.execute(APP);
    pair.dst.execute(ESCALATE);
    pair.add_connector_with(NAME, "public.t,public.t2,public.t3", "null");
    allow_other_owners(&pair);
    pair.start(NAME, "never");
    wait_streaming(&pair);

    // exit (default): the change fails as app, the worker stops and
    // names the table; app is still not a superuser, the row not applied.
    pair.src
        .execute("INSERT INTO public.t VALUES (1, 'alter role')");
    let err = wait_stopped_on_error(&pair);
    assert!(err.contains("must be superuser"), "{err}");
    assert!(err.contains("public.t"), "{err}");
    assert!(!is_superuser(&pair, "app"));
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.t"), 0);

    // skip: each escalating change is left out and counted, the others
    // apply.
    set_strategy(&pair, "skip");
    for (id, v) in [
        (2, "create role"),
        (3, "secret"),
        (4, "set role"),
        (6, "guc"),
    ] {
        pair.src
            .execute(&format!("INSERT INTO public.t VALUES ({id}, '{v}')"));
    }
    pair.src.execute(
        "INSERT INTO public.t2 VALUES (1, 'default');
         INSERT INTO public.t3 VALUES (1, 'deferred');",
    );
    pair.src.execute(
        "INSERT INTO public.t VALUES (7, 'show');
         INSERT INTO public.t VALUES (8, 'fine');",
    );
    pair.start(NAME, "never");
    wait_reporting(&pair, "row 8", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.t WHERE id = 8")
            == 1
    });
    assert!(!is_superuser(&pair, "app"));
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM pg_roles WHERE rolname = 'evil'"),
        0,
        "a role was created"
    );
    assert_eq!(
        pair.dst.count("SELECT count(*) FROM public.secret"),
        0,
        "the superuser's table was written"
    );
    assert_eq!(
        pair.dst
            .query_strings("SELECT id::text || ' ' || v FROM postgres.t ORDER BY id")
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect::<Vec<_>>(),
        // The setting app changed (row 6) did not outlive its change:
        // row 7 sees the worker's empty search_path.
        ["6 guc", "7 show app \"\"", "8 fine"]
    );
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.t2"), 0);
    assert_eq!(pair.dst.count("SELECT count(*) FROM postgres.t3"), 0);
    wait_reporting(&pair, "the skipped changes counted", || {
        pair.dst.count(&format!(
            "SELECT bad_changes FROM synchdb_stats_view WHERE name = '{NAME}'"
        )) >= 6
    });
    let log = pair.dst.log_contents();
    assert!(
        log.contains("must be superuser to create superusers"),
        "create role"
    );
    assert!(log.contains("permission denied for table secret"), "secret");
    assert!(
        log.contains("cannot fire deferred trigger within security-restricted operation"),
        "deferred"
    );
    assert!(log.contains("within security-definer function"), "set role");
}

#[test]
fn copies_run_as_the_owner_and_the_connectors_tables_as_the_worker() {
    let pair = Pair::new();
    pair.add_connector(NAME);
    allow_other_owners(&pair);
    pair.start(NAME, "initial");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    // A DBA gives customers to app; orders stays the connector's.
    pair.dst.execute(APP);
    pair.dst.execute(&format!(
        "ALTER TABLE postgres.customers OWNER TO app;
         {}{}",
        audit_triggers("postgres.customers"),
        audit_triggers("postgres.orders")
    ));
    pair.src.execute(
        "INSERT INTO public.customers (name) VALUES ('streamed');
         INSERT INTO public.orders (id, customer) VALUES (1000, 'streamed');",
    );
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    assert_eq!(audit(&pair, "customers"), ["INSERT:app"]);
    assert_eq!(audit(&pair, "orders"), ["INSERT:postgres"]);

    // A fresh copy: emptied and loaded as app for customers (11 rows), as
    // the worker for orders (101 rows).
    pair.dst.execute("TRUNCATE postgres.audit");
    pair.dst.execute(&format!(
        "SELECT synchdb_restart_connector('{NAME}', 'always')"
    ));
    wait_reporting(&pair, "both copies", || {
        pair.dst
            .count("SELECT count(*) FROM postgres.audit WHERE op = 'INSERT'")
            == 112
    });
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    let customers = audit(&pair, "customers");
    assert_eq!(customers.first().map(String::as_str), Some("TRUNCATE:app"));
    assert_eq!(customers.len(), 12, "{customers:?}");
    assert!(
        customers.iter().all(|a| a.ends_with(":app")),
        "{customers:?}"
    );
    let orders = audit(&pair, "orders");
    assert_eq!(orders.len(), 102, "{orders:?}");
    assert!(
        orders.iter().all(|a| a.ends_with(":postgres")),
        "{orders:?}"
    );
}

#[test]
fn a_destination_table_turned_into_a_view_is_refused() {
    let pair = Pair::new();
    pair.add_connector(NAME);
    pair.start(NAME, "initial");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_caught_up(NAME);
    // A view in the destination table's place: reading it would run its
    // definition (and any function in it) as the worker.
    pair.dst.execute(
        "DROP TABLE postgres.orders;
         CREATE VIEW postgres.orders AS
           SELECT 1 AS id, 'x'::text AS customer, 1.0::numeric(10,2) AS amount, now() AS created;",
    );
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (990, 'after the view')");
    let err = wait_stopped_on_error(&pair);
    assert!(err.contains("is not a table"), "{err}");
}

#[test]
fn an_untrusted_destination_schema_is_refused() {
    let pair = Pair::new();
    pair.dst.execute(
        "CREATE ROLE app LOGIN;
         CREATE SCHEMA postgres AUTHORIZATION app;",
    );
    pair.add_connector(NAME);
    pair.start(NAME, "initial");
    let err = wait_stopped_on_error(&pair);
    assert!(err.contains("belongs to role \"app\""), "{err}");

    pair.dst.execute(
        "ALTER SCHEMA postgres OWNER TO postgres;
         GRANT CREATE ON SCHEMA postgres TO app;",
    );
    pair.start(NAME, "initial");
    let err = wait_for_value(LONG, "the schema's CREATE grant refused", || {
        pair.state(NAME)
            .filter(|s| s.pid == -1 && s.err.contains("may create objects"))
            .map(|s| s.err)
    });
    assert!(err.contains("REVOKE CREATE ON SCHEMA"), "{err}");

    pair.dst.execute(
        "REVOKE CREATE ON SCHEMA postgres FROM app;
         SET ROLE app; SET ROLE NONE;
         CREATE TYPE postgres.planted AS (a int);
         ALTER TYPE postgres.planted OWNER TO app;",
    );
    pair.start(NAME, "initial");
    let err = wait_for_value(LONG, "a planted type refused", || {
        pair.state(NAME)
            .filter(|s| s.pid == -1 && s.err.contains("holds types owned by"))
            .map(|s| s.err)
    });
    assert!(err.contains("planted"), "{err}");

    pair.dst.execute("DROP TYPE postgres.planted");
    pair.start(NAME, "initial");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
}

#[test]
fn tables_of_other_roles_are_refused_unless_told() {
    let pair = Pair::new();
    pair.add_connector(NAME);
    pair.start(NAME, "initial");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    pair.wait_caught_up(NAME);
    pair.dst.execute(
        "CREATE ROLE app LOGIN;
         GRANT USAGE ON SCHEMA postgres TO app;
         ALTER TABLE postgres.customers OWNER TO app;",
    );
    pair.src
        .execute("INSERT INTO public.customers (name) VALUES ('for app')");
    let err = wait_stopped_on_error(&pair);
    assert!(
        err.contains("belongs to role \"app\"") && err.contains("apply_as_table_owner"),
        "{err}"
    );
    // Nothing was written into app's table.
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.customers WHERE name = 'for app'"),
        0
    );
    allow_other_owners(&pair);
    pair.start(NAME, "initial");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
}
