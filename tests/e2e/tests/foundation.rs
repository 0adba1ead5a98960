//! Foundation: the connector catalog, argument validation with SQLSTATEs,
//! start/stop of the worker, the state view, auto-start after a server
//! restart, password secrecy and out-of-worker-slots errors.

use synchdb_e2e::*;

fn add(pair: &Pair, args: &str) -> String {
    sqlstate(
        pair.dst
            .try_execute(&format!("SELECT synchdb_add_conninfo({args})")),
    )
}

fn conninfo_count(pair: &Pair) -> i64 {
    pair.dst.count("SELECT count(*) FROM synchdb_conninfo")
}

#[test]
fn add_validate_and_delete() {
    let pair = Pair::new();
    let port = pair.src.port();
    let good = |name: &str, table: &str, connector: &str| {
        format!("'{name}','127.0.0.1',{port},'myuser','mypass','postgres','public',{table},'null','{connector}'")
    };
    assert_eq!(add(&pair, &good("pgconn", "'null'", "postgres")), "ok");
    let data = pair.dst.query_strings(
        "SELECT isactive::text, data->>'hostname', jsonb_typeof(data->'port'), data->>'user', data->>'pwd',
                data->>'srcdb', data->>'srcschema', data->>'table', data->>'snapshottable', data->>'connector'
           FROM synchdb_conninfo WHERE name = 'pgconn'",
    );
    let row: Vec<String> = data[0]
        .iter()
        .map(|v| v.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        row,
        [
            "false",
            "127.0.0.1",
            "number",
            "myuser",
            "mypass",
            "postgres",
            "public",
            "null",
            "null",
            "postgres"
        ]
    );

    // duplicate
    assert_eq!(add(&pair, &good("pgconn", "'null'", "postgres")), "42710");
    // too long
    assert_eq!(
        add(&pair, &good(&"x".repeat(64), "'null'", "postgres")),
        "42622"
    );
    assert_eq!(
        add(&pair, &good(&"x".repeat(63), "'null'", "postgres")),
        "ok"
    );
    // empty host, bad ports
    assert_eq!(
        add(
            &pair,
            &format!(
                "'h1','',{port},'myuser','mypass','postgres','public','null','null','postgres'"
            )
        ),
        "22023"
    );
    for p in ["0", "65536", "-1"] {
        assert_eq!(
            add(&pair, &format!("'p{p}','127.0.0.1',{p},'myuser','mypass','postgres','public','null','null','postgres'")),
            "22023",
            "port {p}"
        );
    }
    // unsupported connectors, with a clear message
    for c in ["mysql", "oracle", "sqlserver", "foo"] {
        let r = pair.dst.try_execute(&format!(
            "SELECT synchdb_add_conninfo({})",
            good("c", "'null'", c)
        ));
        let e = r.expect_err("must fail");
        assert_eq!(e.code().map(|c| c.code()), Some("22023"));
        assert!(describe(&e).contains("not supported"), "{}", describe(&e));
    }
    assert_eq!(add(&pair, &good("upper", "'null'", "POSTGRES")), "ok");
    // malformed table lists
    for t in [
        "'public.'",
        "'.t'",
        "'a.b.c.d'",
        "'public.t,,public.u'",
        "'otherdb.public.t'",
    ] {
        assert_eq!(add(&pair, &good("t", t, "postgres")), "22023", "table {t}");
    }
    // accepted table lists
    assert_eq!(add(&pair, &good("t1", "''", "postgres")), "ok");
    assert_eq!(add(&pair, &good("t2", "NULL", "postgres")), "ok");
    assert_eq!(
        add(
            &pair,
            &good("t3", "'public.orders,public.customers'", "postgres")
        ),
        "ok"
    );
    assert_eq!(
        add(&pair, &good("t4", "'postgres.public.orders'", "postgres")),
        "ok"
    );
    assert_eq!(conninfo_count(&pair), 7);

    // delete
    assert_eq!(
        sqlstate(pair.dst.try_execute("SELECT synchdb_del_conninfo('t1')")),
        "ok"
    );
    assert_eq!(
        sqlstate(pair.dst.try_execute("SELECT synchdb_del_conninfo('t1')")),
        "42704"
    );
    assert_eq!(conninfo_count(&pair), 6);
}

#[test]
fn start_stop_state_view_and_restart() {
    let mut pair = Pair::new();
    pair.add_connector("pgconn");
    pair.add_connector("idle");

    // columns, in order
    let cols = pair.dst.query_strings(
        "SELECT string_agg(attname || ':' || format_type(atttypid, atttypmod), ',' ORDER BY attnum)
           FROM pg_attribute WHERE attrelid = 'synchdb_state_view'::regclass AND attnum > 0",
    );
    assert_eq!(
        cols[0][0].as_deref(),
        Some("name:text,connector_type:text,pid:integer,stage:text,state:text,err:text,last_dbz_offset:text")
    );
    let idle = pair
        .state("idle")
        .expect("row for a connector that never ran");
    assert_eq!((idle.pid, idle.state.as_str()), (-1, "stopped"));
    assert_eq!(idle.err, "no error");
    assert_eq!(idle.last_dbz_offset, "offset file not flushed yet");
    assert_eq!(idle.connector_type, "postgres");

    // errors
    assert_eq!(
        sqlstate(
            pair.dst
                .try_execute("SELECT synchdb_start_engine_bgw('nope')")
        ),
        "42704"
    );
    assert_eq!(
        sqlstate(
            pair.dst
                .try_execute("SELECT synchdb_start_engine_bgw('pgconn', 'sometimes')")
        ),
        "22023"
    );

    pair.start("pgconn", "initial");
    let pid = wait_for_value(LONG, "a live pid", || {
        pair.state("pgconn").filter(|s| s.pid > 0).map(|s| s.pid)
    });
    assert_eq!(
        pair.state("pgconn").map(|s| s.connector_type),
        Some("postgres".into())
    );
    assert_eq!(
        pair.dst
            .query_one_string("SELECT isactive::text FROM synchdb_conninfo WHERE name='pgconn'")
            .as_deref(),
        Some("true")
    );
    let again = pair
        .dst
        .try_execute("SELECT synchdb_start_engine_bgw('pgconn')")
        .expect_err("second start must fail");
    assert_eq!(again.code().map(|c| c.code()), Some("55006"));
    assert!(again.as_db_error().and_then(|d| d.hint()).is_some());

    pair.stop("pgconn");
    wait_until(LONG, "stopped", || {
        pair.state("pgconn").map(|s| (s.pid, s.state)) == Some((-1, "stopped".into()))
    });
    assert_eq!(
        pair.dst
            .query_one_string("SELECT isactive::text FROM synchdb_conninfo WHERE name='pgconn'")
            .as_deref(),
        Some("false")
    );
    assert!(
        pair.src.count(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
        )) == 0
    );

    // An active connector comes back after a server restart; a stopped one stays stopped.
    pair.start("pgconn", "initial");
    wait_until(LONG, "running", || {
        pair.state("pgconn").is_some_and(|s| s.pid > 0)
    });
    let before = pair.state("pgconn").map(|s| s.pid).unwrap_or(0);
    pair.dst.restart();
    let after = wait_for_value(LONG, "pid after restart", || {
        pair.state("pgconn").filter(|s| s.pid > 0).map(|s| s.pid)
    });
    assert_ne!(before, after);
    assert_eq!(pair.state("idle").map(|s| s.pid), Some(-1));
    // and it still replicates
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (5000, 'after restart')");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
}

#[test]
fn every_mode_is_accepted() {
    let pair = Pair::new();
    for (i, mode) in ["initial", "initial_only", "no_data", "never", "always"]
        .iter()
        .enumerate()
    {
        let name = format!("m{i}");
        pair.add_connector(&name);
        pair.start(&name, mode);
        wait_until(LONG, "live pid", || {
            pair.state(&name).is_some_and(|s| s.pid > 0)
        });
        pair.stop(&name);
        wait_until(LONG, "stopped", || {
            pair.state(&name).is_some_and(|s| s.pid == -1)
        });
    }
}

#[test]
fn password_is_never_shown() {
    let pair = Pair::new();
    pair.dst.execute("CREATE ROLE joe LOGIN");
    pair.add_connector("pgconn");
    pair.dst.execute(&format!(
        "SELECT synchdb_add_conninfo('badpw','127.0.0.1',{},'myuser','wrongpass','postgres','public','null','null','postgres')",
        pair.src.port()
    ));
    let mut joe = pair.dst.client_as("joe");
    let e = joe
        .batch_execute("SELECT * FROM synchdb_conninfo")
        .expect_err("joe must not read the catalog");
    assert_eq!(e.code().map(|c| c.code()), Some("42501"));
    for view in ["synchdb_state_view", "synchdb_conninfo_view"] {
        let rows = joe
            .simple_query(&format!("SELECT t::text FROM {view} t"))
            .expect("readable by everyone");
        for m in rows {
            if let postgres::SimpleQueryMessage::Row(r) = m {
                let text = r.get(0).unwrap_or_default();
                assert!(
                    !text.contains("mypass") && !text.contains("wrongpass"),
                    "{view}: {text}"
                );
            }
        }
    }
    assert!(joe
        .batch_execute("SELECT synchdb_start_engine_bgw('pgconn')")
        .is_err());

    pair.start("badpw", "initial");
    let st = wait_for_value(LONG, "an authentication error", || {
        pair.state("badpw").filter(|s| s.err != "no error")
    });
    assert!(
        st.err.contains("badpw"),
        "err names the connector: {}",
        st.err
    );
    assert!(!st.err.contains("wrongpass"), "{}", st.err);
    assert!(!pair.dst.log_contents().contains("wrongpass"));
    assert!(!pair.dst.log_contents().contains("mypass"));
}

#[test]
fn out_of_worker_slots() {
    // The launcher takes one worker slot for good.
    let pair = Pair::with_destination(Cluster::destination_with(&[("max_worker_processes", "2")]));
    for n in ["a", "b", "c"] {
        pair.add_connector(n);
    }
    let mut failure = None;
    for n in ["a", "b", "c"] {
        if let Err(e) = pair
            .dst
            .try_execute(&format!("SELECT synchdb_start_engine_bgw('{n}')"))
        {
            failure = Some(e);
            break;
        }
    }
    let e = failure.expect("one start must run out of worker slots");
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
    assert!(hint.contains("max_worker_processes"), "{hint}");
}

#[test]
fn requires_preload() {
    let plain = Cluster::new(Kind::Source, &[]);
    let e = plain
        .try_execute("CREATE EXTENSION synchdb")
        .expect_err("must refuse without shared_preload_libraries");
    assert!(
        describe(&e).contains("shared_preload_libraries"),
        "{}",
        describe(&e)
    );
    assert_eq!(
        plain.count("SELECT count(*) FROM pg_extension WHERE extname = 'synchdb'"),
        0
    );
}
