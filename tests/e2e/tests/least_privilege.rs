//! Least-privilege source roles: a role with only REPLICATION, CONNECT and
//! SELECT cannot create a publication; the connector says exactly which
//! statement an admin must run, retries, and replicates once it exists. A
//! publication an admin made (named in the connector's data) is used as it
//! is, never altered or dropped; what it lacks (an operation, a table that
//! appears later) is an error naming the statement to run, and a table it
//! gains later is copied.

use synchdb_e2e::*;

/// A source role with only REPLICATION, CONNECT and SELECT.
fn least_privilege_role(src: &Cluster) {
    src.execute(
        "CREATE ROLE repl LOGIN REPLICATION PASSWORD 'replpass';
         REVOKE CREATE ON DATABASE postgres FROM PUBLIC;
         GRANT CONNECT ON DATABASE postgres TO repl;
         GRANT USAGE ON SCHEMA public TO repl;
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO repl;
         ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO repl;",
    );
}

fn add_as_repl(pair: &Pair, name: &str) {
    pair.dst.execute(&format!(
        "SELECT synchdb_add_conninfo('{name}','127.0.0.1',{},'repl','replpass','postgres','public','null','null','postgres')",
        pair.src.port()
    ));
}

/// Waits for the connector's error to contain `needle`; returns it.
fn wait_err(pair: &Pair, name: &str, needle: &str) -> String {
    wait_for_value(
        LONG,
        &format!("{name}: an error containing {needle:?}"),
        || {
            pair.state(name)
                .map(|st| st.err)
                .filter(|e| e.contains(needle))
        },
    )
}

/// The statement an error tells an admin to run.
fn statement_in(err: &str) -> String {
    let start = err
        .find("an admin must run on the source: ")
        .map(|i| i + "an admin must run on the source: ".len())
        .unwrap_or_else(|| panic!("no statement in {err:?}"));
    let rest = &err[start..];
    let end = rest.find(" (the connector retries").unwrap_or(rest.len());
    rest[..end].to_string()
}

fn wait_ready(pair: &Pair, name: &str, n: i64) {
    wait_until(LONG, &format!("{name}: {n} tables copied"), || {
        pair.dst.count(&format!(
            "SELECT count(*) FROM synchdb_table_state WHERE name = '{name}' AND state = 'ready'"
        )) == n
    });
}

fn own_publication_needs_an_admin(major: u32) {
    let src = if major == 15 {
        Cluster::source()
    } else {
        Cluster::source_version(major)
    };
    let pair = Pair::with_clusters(src, Cluster::destination());
    least_privilege_role(&pair.src);
    add_as_repl(&pair, "lp");
    pair.start("lp", "initial");
    let err = wait_err(&pair, "lp", "CREATE PUBLICATION");
    assert!(
        err.contains("may not create publication") && err.contains("permission denied"),
        "{err}"
    );
    let sql = statement_in(&err);
    if major >= 15 {
        assert!(sql.contains(r#"FOR TABLES IN SCHEMA "public""#), "{sql}");
    } else {
        assert!(
            sql.contains(r#"FOR TABLE "public"."customers", "public"."orders""#),
            "{sql}"
        );
    }
    // Nothing was copied while the publication was missing.
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM synchdb_table_state WHERE name = 'lp'"),
        0
    );
    pair.src.execute(&sql);
    wait_ready(&pair, "lp", 2);
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (500, 'after')");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    // Deleting the connector leaves the admin's publication alone.
    pair.stop("lp");
    let publication = pair.slot_name("lp");
    pair.dst.execute("SELECT synchdb_del_conninfo('lp')");
    assert_eq!(
        pair.src.count(&format!(
            "SELECT count(*) FROM pg_publication WHERE pubname = '{publication}'"
        )),
        1
    );
}

#[test]
fn least_privilege_role_gets_the_create_publication_statement() {
    own_publication_needs_an_admin(15);
}

#[test]
fn least_privilege_role_on_postgresql_12() {
    own_publication_needs_an_admin(12);
}

#[test]
fn admin_publication_named_in_the_connector_data() {
    let pair = Pair::new();
    least_privilege_role(&pair.src);
    // An admin's publication that misses deletes at first.
    pair.src.execute(
        "CREATE PUBLICATION app_pub FOR TABLE public.orders, public.customers
           WITH (publish = 'insert, update')",
    );
    add_as_repl(&pair, "ap");
    pair.dst.execute(
        "UPDATE synchdb_conninfo SET data = jsonb_set(data, '{publication}', '\"app_pub\"')
          WHERE name = 'ap'",
    );
    pair.start("ap", "initial");
    let err = wait_err(&pair, "ap", "does not publish every operation");
    assert!(
        err.contains(
            r#"ALTER PUBLICATION "app_pub" SET (publish = 'insert, update, delete, truncate')"#
        ),
        "{err}"
    );
    pair.src.execute(&statement_in(&err));
    wait_ready(&pair, "ap", 2);
    pair.src.execute("DELETE FROM public.orders WHERE id <= 10");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");

    // A table created later is not in the admin's publication: the
    // connector says so; once added, its earlier rows are copied.
    pair.src.execute(
        "CREATE TABLE public.late (id int PRIMARY KEY, v text);
         INSERT INTO public.late SELECT g, 'v' || g FROM generate_series(1, 30) g;",
    );
    let err = wait_err(
        &pair,
        "ap",
        r#"does not publish captured table "public"."late""#,
    );
    let sql = statement_in(&err);
    assert_eq!(
        sql,
        r#"ALTER PUBLICATION "app_pub" ADD TABLE "public"."late""#
    );
    pair.src.execute(&sql);
    pair.src
        .execute("INSERT INTO public.late VALUES (31, 'after')");
    pair.wait_tables_equal("public.late", "postgres.late", "id");
    wait_until(LONG, "ap back to no error", || {
        pair.state("ap").is_some_and(|st| st.err == "no error")
    });
    // The connector never altered the admin's publication beyond what the
    // admin ran, and deleting it leaves the publication.
    pair.stop("ap");
    pair.dst.execute("SELECT synchdb_del_conninfo('ap')");
    assert_eq!(
        pair.src
            .count("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'app_pub'"),
        3
    );
}

#[test]
fn admin_publication_for_all_tables_applies_only_captured_tables() {
    let pair = Pair::new();
    // Another schema with a table of the same name and another shape.
    pair.src.execute(
        "CREATE SCHEMA other;
         CREATE TABLE other.orders (id int PRIMARY KEY, something_else text);
         INSERT INTO other.orders VALUES (1, 'not captured');
         CREATE PUBLICATION everything FOR ALL TABLES;",
    );
    pair.add_connector("fa");
    pair.dst.execute(
        "UPDATE synchdb_conninfo SET data = jsonb_set(data, '{publication}', '\"everything\"')
          WHERE name = 'fa'",
    );
    pair.start("fa", "initial");
    wait_ready(&pair, "fa", 2);
    pair.src.execute(
        "INSERT INTO other.orders VALUES (2, 'still not captured');
         UPDATE other.orders SET something_else = 'x';
         CREATE TABLE other.extra (id int PRIMARY KEY);
         INSERT INTO other.extra VALUES (1);
         INSERT INTO public.orders (id, customer) VALUES (700, 'captured');",
    );
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_caught_up("fa");
    pair.assert_tables_equal("public.orders", "postgres.orders", "id");
    assert_eq!(
        pair.dst.count(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'postgres' AND c.relkind = 'r'"
        ),
        2,
        "only the captured tables exist in the destination"
    );
    let st = pair.state("fa").expect("state row");
    assert_eq!(st.err, "no error", "{st:?}");
}
