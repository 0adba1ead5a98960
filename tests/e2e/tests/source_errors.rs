//! Source problems end to end: each shows a clear `err` naming the
//! connector, the worker keeps retrying with backoff (no crash loop), and it
//! recovers on its own once the problem is fixed.

use synchdb_e2e::*;

/// A destination retrying every second or two at most.
fn fast_retry_pair() -> Pair {
    Pair::with_destination(Cluster::destination_with(&[(
        "synchdb.max_retry_interval",
        "2",
    )]))
}

fn add(pair: &Pair, name: &str, user: &str, pwd: &str, port: u16) {
    pair.dst.execute(&format!(
        "SELECT synchdb_add_conninfo('{name}','127.0.0.1',{port},'{user}','{pwd}','postgres','public','null','null','postgres')"
    ));
}

fn wait_err(pair: &Pair, name: &str, needle: &str) -> StateRow {
    wait_for_value(LONG, &format!("an error with {needle:?}"), || {
        pair.state(name).filter(|s| s.err.contains(needle))
    })
}

fn wait_ready(pair: &Pair, name: &str) {
    wait_until(LONG, "the snapshot after recovery", || {
        pair.dst.count(&format!(
            "SELECT count(*) FROM synchdb_table_state WHERE name = '{name}' AND state = 'ready'"
        )) == 2
    });
}

#[test]
fn unreachable_host_is_retried_without_crashing() {
    let pair = fast_retry_pair();
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    add(&pair, "down", "myuser", "mypass", port);
    pair.start("down", "initial");
    let st = wait_err(&pair, "down", "connector \"down\"");
    assert!(st.err.contains(&port.to_string()), "{}", st.err);
    let pid = st.pid;
    // Still the same worker some retries later: backoff, not a crash loop.
    wait_until(LONG, "a few retries", || {
        pair.dst.log_contents().matches("retrying in").count() >= 3
    });
    let again = pair.state("down").expect("state row");
    assert!(again.pid > 0 && again.pid == pid, "{again:?}");
    assert!(!again.err.contains("mypass"));
}

#[test]
fn missing_replication_privilege_then_granted() {
    let pair = fast_retry_pair();
    pair.src
        .execute("CREATE ROLE plain LOGIN PASSWORD 'plainpw'");
    add(&pair, "priv", "plain", "plainpw", pair.src.port());
    pair.start("priv", "initial");
    let st = wait_err(&pair, "priv", "REPLICATION");
    assert!(st.err.contains("\"plain\""), "{}", st.err);
    assert!(!st.err.contains("plainpw"), "{}", st.err);
    pair.src.execute("ALTER ROLE plain SUPERUSER REPLICATION");
    wait_ready(&pair, "priv");
    pair.assert_tables_equal("public.orders", "postgres.orders", "id");
}

#[test]
fn wal_level_not_logical() {
    let src = Cluster::new(Kind::Source, &[("wal_level", "replica")]);
    let dst = Cluster::destination();
    dst.execute("CREATE EXTENSION synchdb");
    dst.execute(&format!(
        "SELECT synchdb_add_conninfo('wl','127.0.0.1',{},'myuser','mypass','postgres','public','null','null','postgres')",
        src.port()
    ));
    dst.execute("SELECT synchdb_start_engine_bgw('wl')");
    let pair = Pair { src, dst };
    let st = wait_err(&pair, "wl", "wal_level");
    assert!(st.err.contains("\"replica\""), "{}", st.err);
    assert!(st.err.contains("logical"), "{}", st.err);
}

#[test]
fn no_free_slot_then_freed() {
    // The connector's slot plus the temporary one of its snapshot: two.
    let src = Cluster::new(Kind::Source, &[("max_replication_slots", "2")]);
    src.execute(
        "CREATE TABLE public.orders (id int PRIMARY KEY, customer text);
         INSERT INTO public.orders SELECT g, 'c' || g FROM generate_series(1, 10) g;
         CREATE TABLE public.customers (id int PRIMARY KEY);",
    );
    src.execute("SELECT pg_create_logical_replication_slot('occupied', 'pgoutput')");
    let dst = Cluster::destination_with(&[("synchdb.max_retry_interval", "2")]);
    dst.execute("CREATE EXTENSION synchdb");
    let pair = Pair { src, dst };
    add(&pair, "slots", "myuser", "mypass", pair.src.port());
    pair.start("slots", "initial");
    let st = wait_err(&pair, "slots", "no free replication slot");
    assert!(st.err.contains("max_replication_slots"), "{}", st.err);
    pair.src
        .execute("SELECT pg_drop_replication_slot('occupied')");
    wait_ready(&pair, "slots");
    pair.assert_tables_equal("public.orders", "postgres.orders", "id");
}
