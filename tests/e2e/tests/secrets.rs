//! Secrets: the source password stays out of the server log when a call
//! that carries it fails, out of `pg_dump` when set with
//! `synchdb_set_password`, and can come from a password file instead.

use std::process::Command;
use synchdb_e2e::*;

#[test]
fn failed_add_conninfo_does_not_log_the_password() {
    let dst = Cluster::destination();
    dst.execute("CREATE EXTENSION synchdb");
    let r = dst.try_execute(
        "SELECT synchdb_add_conninfo('bad','127.0.0.1',0,'myuser','leak-me-123','postgres','public','null','null','postgres')",
    );
    assert_eq!(sqlstate(r), "22023");
    let r = dst.try_execute("SELECT synchdb_set_password('nosuch', 'leak-me-456')");
    assert_eq!(sqlstate(r), "42704");
    let log = dst.log_contents();
    assert!(log.contains("port"), "the error itself is logged");
    assert!(!log.contains("leak-me-123"), "password in the server log");
    assert!(!log.contains("leak-me-456"), "password in the server log");
}

fn pg_dump(c: &Cluster) -> String {
    let out = Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "/usr/lib/postgresql/15/bin/pg_dump",
            "-h",
            &c.dir().display().to_string(),
            "-p",
            &c.port().to_string(),
            "-U",
            "postgres",
            "postgres",
        ])
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn password_set_apart_is_used_and_not_dumped() {
    let pair = Pair::new();
    pair.dst.execute(&format!(
        "SELECT synchdb_add_conninfo('sp','127.0.0.1',{},'myuser',NULL,'postgres','public','null','null','postgres')",
        pair.src.port()
    ));
    pair.dst
        .execute("SELECT synchdb_set_password('sp', 'mypass')");
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM synchdb_conninfo WHERE name = 'sp' AND data ? 'pwd'"),
        0
    );
    pair.start("sp", "initial");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    let dump = pg_dump(&pair.dst);
    assert!(dump.contains("synchdb_conninfo"), "the connector is dumped");
    assert!(!dump.contains("mypass"), "the password is not dumped");
    let st = pair.state("sp").expect("state row");
    assert!(!st.err.contains("mypass"));
}

#[test]
fn password_from_a_password_file() {
    let pair = Pair::new();
    let file = pair.dst.dir().join("pgpass");
    std::fs::write(
        &file,
        format!(
            "# synchdb\n127.0.0.1:{}:postgres:myuser:mypass\n",
            pair.src.port()
        ),
    )
    .expect("write passfile");
    let path = file.display().to_string();
    let chown = Command::new("chown")
        .args(["postgres", &path])
        .status()
        .expect("chown");
    assert!(chown.success());
    pair.dst.execute(&format!(
        "SELECT synchdb_add_conninfo('pf','127.0.0.1',{},'myuser',NULL,'postgres','public','null','null','postgres');
         UPDATE synchdb_conninfo SET data = jsonb_set(data, '{{passfile}}', to_jsonb('{path}'::text)) WHERE name = 'pf';",
        pair.src.port()
    ));
    pair.start("pf", "initial");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.src
        .execute("INSERT INTO public.orders (id, customer) VALUES (901, 'x')");
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
}
