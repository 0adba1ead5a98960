//! TLS to the source end to end, on both connections (the normal one and
//! the walsender): a source with `ssl = on` whose pg_hba.conf lets TCP in
//! only over TLS; each sslmode against it (disable is turned away with the
//! server's message, require / verify-ca / verify-full / prefer / allow
//! replicate, a wrong CA or a certificate for another name is an error
//! naming the certificate and retried), the connections checked encrypted
//! on the source (pg_stat_ssl, the connection log); client certificates
//! (`cert` authentication, key in its own file or with the certificate, an
//! encrypted key, a missing file); and a source asking for a cleartext
//! password, refused over an unencrypted connection or one whose
//! certificate is not verified, unless allowed.
//! Certificates are made with the `openssl` CLI in the cluster's directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use synchdb_e2e::*;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn openssl(dir: &Path, args: &[&str]) {
    run(Command::new("/usr/bin/openssl").current_dir(dir).args(args));
}

/// The test's certificates, in `dir`.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// A CA, a server certificate it signs (SAN IP 127.0.0.1 and
    /// localhost), a client certificate for `myuser` (its key alone, with
    /// the certificate, and encrypted), and a second, unrelated CA.
    fn new(cluster: &Cluster) -> Pki {
        let dir = cluster.dir().join("tls");
        std::fs::create_dir_all(&dir).expect("tls dir");
        let pki = Pki { dir };
        for ca in ["ca", "other-ca"] {
            openssl(
                &pki.dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "30",
                    "-subj",
                    &format!("/CN=synchdb test {ca}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.crt"),
                ],
            );
        }
        pki.leaf(
            "server",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
            "-sha256",
        );
        pki.leaf(
            "client",
            "myuser",
            "extendedKeyUsage=clientAuth\n",
            "-sha256",
        );
        let both = [
            std::fs::read_to_string(pki.dir.join("client.crt")).expect("client.crt"),
            std::fs::read_to_string(pki.dir.join("client.key")).expect("client.key"),
        ]
        .concat();
        std::fs::write(pki.dir.join("client-both.pem"), both).expect("client-both.pem");
        openssl(
            &pki.dir,
            &[
                "pkey",
                "-in",
                "client.key",
                "-aes256",
                "-passout",
                "pass:keypass-secret",
                "-out",
                "client-enc.key",
            ],
        );
        pki.own();
        pki
    }

    /// A key and a certificate signed by `ca`, with the extensions given.
    fn leaf(&self, name: &str, cn: &str, ext: &str, digest: &str) {
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\n{ext}"),
        )
        .expect("ext file");
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "30",
                digest,
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }

    /// Everything readable by the server's OS user only (the server refuses
    /// a key others can read).
    fn own(&self) {
        run(Command::new("chown").args(["-R", "postgres", &self.dir.display().to_string()]));
        for entry in std::fs::read_dir(&self.dir).expect("tls dir") {
            let path = entry.expect("entry").path();
            run(Command::new("chmod").args(["0600", &path.display().to_string()]));
        }
    }
}

/// Replaces the source's pg_hba.conf (the harness keeps its Unix-socket
/// access) and turns TLS on with `cert`, both through one reload.
fn tls_source(src: &Cluster, pki: &Pki, hba: &str) {
    let hba_file = src.query_one_string("SHOW hba_file").expect("hba_file");
    std::fs::write(
        &hba_file,
        format!("local all all trust\nlocal replication all trust\n{hba}\n"),
    )
    .expect("write pg_hba.conf");
    set_server_cert(src, pki, "server");
}

/// Points the source at `name`.crt / `name`.key (and the test CA for
/// client certificates), with TLS and connection logging on; waits until
/// new connections see it.
fn set_server_cert(src: &Cluster, pki: &Pki, name: &str) {
    for (k, v) in [
        ("ssl_cert_file", pki.path(&format!("{name}.crt"))),
        ("ssl_key_file", pki.path(&format!("{name}.key"))),
        ("ssl_ca_file", pki.path("ca.crt")),
        ("ssl", "on".to_string()),
        ("log_connections", "on".to_string()),
    ] {
        src.execute(&format!("ALTER SYSTEM SET {k} = '{v}'"));
    }
    src.execute("SELECT pg_reload_conf()");
    let want = pki.path(&format!("{name}.crt"));
    wait_until(LONG, "the source to reload its TLS settings", || {
        src.query_one_string(
            "SELECT current_setting('ssl') || ' ' || current_setting('ssl_cert_file')",
        )
        .as_deref()
            == Some(&format!("on {want}"))
    });
}

/// A destination retrying every second or two at most.
fn fast_retry_destination() -> Cluster {
    Cluster::destination_with(&[("synchdb.max_retry_interval", "2")])
}

/// A source database of its own per connector (each lands in the
/// destination schema named after it), with 20 rows in `t`.
fn source_db(src: &Cluster, db: &str) {
    src.execute(&format!("CREATE DATABASE {db}"));
    src.client_db(db)
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 20) g;",
        )
        .expect("source table");
}

/// A connector for database `db` with TLS set through the SynchDB API
/// (no call when `sslmode` is None: libpq's default, prefer).
fn add(pair: &Pair, name: &str, db: &str, sslmode: Option<&str>, keystore: &str, truststore: &str) {
    source_db(&pair.src, db);
    pair.dst.execute(&format!(
        "SELECT synchdb_add_conninfo('{name}','127.0.0.1',{},'myuser','mypass','{db}','public','null','null','postgres')",
        pair.src.port()
    ));
    if let Some(mode) = sslmode {
        pair.dst.execute(&format!(
            "SELECT synchdb_add_extra_conninfo('{name}','{mode}','{keystore}','keystore-secret','{truststore}','truststore-secret')"
        ));
    }
}

fn set_data(pair: &Pair, name: &str, key: &str, json: &str) {
    pair.dst.execute(&format!(
        "UPDATE synchdb_conninfo SET data = jsonb_set(data, '{{{key}}}', '{json}') WHERE name = '{name}'"
    ));
}

fn wait_err(pair: &Pair, name: &str, needle: &str) -> StateRow {
    wait_for_value(LONG, &format!("{name}: an error with {needle:?}"), || {
        pair.state(name).filter(|s| s.err.contains(needle))
    })
}

/// The snapshot arrives, then a row written afterwards (CDC), and both of
/// the connector's connections are encrypted.
fn replicates(pair: &Pair, name: &str, db: &str) {
    let count = |sql: &str| pair.dst.count(sql);
    wait_until(LONG, &format!("{name}: the snapshot of {db}.t"), || {
        count(&format!("SELECT count(*) FROM {db}.t")) == 20
    });
    pair.src
        .client_db(db)
        .batch_execute("INSERT INTO t VALUES (1000, 'after the snapshot')")
        .expect("source insert");
    wait_until(LONG, &format!("{name}: the change streamed"), || {
        count(&format!("SELECT count(*) FROM {db}.t WHERE id = 1000")) == 1
    });
    let st = pair.state(name).expect("state row");
    assert_eq!(st.err, "no error", "{st:?}");
    assert_encrypted(pair, db);
}

/// On the source (any version): the connector's walsender is encrypted
/// (pg_stat_ssl), and so is every synchdb backend of `db`.
fn assert_walsender_encrypted(pair: &Pair, db: &str) {
    wait_until(LONG, &format!("an encrypted walsender for {db}"), || {
        pair.src.count(&format!(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
              WHERE a.application_name = 'synchdb' AND a.datname = '{db}'
                AND a.backend_type = 'walsender' AND s.ssl"
        )) >= 1
    });
    assert_eq!(
        pair.src.count(&format!(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
              WHERE a.application_name = 'synchdb' AND a.datname = '{db}' AND NOT s.ssl"
        )),
        0
    );
}

/// As above, and the normal connection was encrypted too (the source's
/// connection log says "SSL enabled"; PostgreSQL 15's format).
fn assert_encrypted(pair: &Pair, db: &str) {
    assert_walsender_encrypted(pair, db);
    let log = pair.src.log_contents();
    let normal: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains(&format!(
                "connection authorized: user=myuser database={db} "
            )) && l.contains("application_name=synchdb")
        })
        .collect();
    assert!(
        !normal.is_empty(),
        "no connection of synchdb to {db} logged"
    );
    for l in normal {
        assert!(l.contains("SSL enabled"), "{l}");
    }
}

fn hba_tls_only(method: &str) -> String {
    format!("hostssl all all 127.0.0.1/32 {method}\nhostssl replication all 127.0.0.1/32 {method}")
}

#[test]
fn sslmodes_against_a_tls_only_source() {
    let src = Cluster::source();
    let pki = Pki::new(&src);
    tls_source(&src, &pki, &hba_tls_only("scram-sha-256"));
    let pair = Pair::with_clusters(src, fast_retry_destination());
    let ca = pki.path("ca.crt");
    let other_ca = pki.path("other-ca.crt");

    add(&pair, "plain", "db_plain", Some("disable"), "", "");
    add(&pair, "req", "db_req", Some("require"), "", "");
    add(&pair, "ca", "db_ca", Some("verify-ca"), "", &ca);
    add(
        &pair,
        "wrongca",
        "db_wrongca",
        Some("verify-ca"),
        "",
        &other_ca,
    );
    add(&pair, "full", "db_full", Some("verify-full"), "", &ca);
    add(&pair, "pref", "db_pref", None, "", "");
    add(&pair, "allow", "db_allow", Some("allow"), "", "");
    for name in ["plain", "req", "ca", "wrongca", "full", "pref", "allow"] {
        pair.start(name, "initial");
    }

    // The server turns a plain connection away; its message is the error.
    let st = wait_err(&pair, "plain", "no pg_hba.conf entry");
    assert!(st.err.contains("no encryption"), "{}", st.err);

    // An untrusted issuer: the error names the certificate; retried by the
    // same worker.
    let st = wait_err(&pair, "wrongca", "certificate");
    assert!(st.err.contains("UnknownIssuer"), "{}", st.err);
    wait_until(LONG, "wrongca retrying", || {
        pair.dst
            .log_contents()
            .lines()
            .filter(|l| l.contains("connector \"wrongca\": ") && l.contains("retrying in"))
            .count()
            >= 2
    });
    let again = pair.state("wrongca").expect("state row");
    assert!(again.pid > 0 && again.pid == st.pid, "{again:?}");

    // SCRAM over TLS binds the channel (SCRAM-SHA-256-PLUS, which a PostgreSQL
    // 15 server offers over TLS): a wrong tls-server-end-point hash would fail
    // authentication here.
    for (name, db) in [
        ("req", "db_req"),
        ("ca", "db_ca"),
        ("full", "db_full"),
        ("pref", "db_pref"),
        ("allow", "db_allow"),
    ] {
        replicates(&pair, name, db);
    }

    // The stored settings use libpq's names; no password is stored or shown.
    let data = pair
        .dst
        .query_one_string("SELECT data::text FROM synchdb_conninfo WHERE name = 'ca'")
        .unwrap_or_default();
    assert!(data.contains("\"sslmode\": \"verify-ca\""), "{data}");
    assert!(
        data.contains(&format!("\"sslrootcert\": \"{ca}\"")),
        "{data}"
    );
    for secret in ["keystore-secret", "truststore-secret"] {
        assert!(!data.contains(secret), "{data}");
        assert!(!pair.dst.log_contents().contains(secret));
    }

    // A certificate for another name (signed with SHA-384, so channel
    // binding hashes with SHA-384): verify-full refuses it, verify-ca and
    // require take it.
    pki.leaf(
        "elsewhere",
        "db.elsewhere.example",
        "subjectAltName=DNS:db.elsewhere.example\nextendedKeyUsage=serverAuth\n",
        "-sha384",
    );
    pki.own();
    set_server_cert(&pair.src, &pki, "elsewhere");
    add(&pair, "full2", "db_full2", Some("verify-full"), "", &ca);
    add(&pair, "ca2", "db_ca2", Some("verify-ca"), "", &ca);
    add(&pair, "req2", "db_req2", Some("require"), "", "");
    for name in ["full2", "ca2", "req2"] {
        pair.start(name, "initial");
    }
    let st = wait_err(&pair, "full2", "certificate");
    assert!(st.err.contains("not valid for name"), "{}", st.err);
    replicates(&pair, "ca2", "db_ca2");
    replicates(&pair, "req2", "db_req2");

    // Back to the first certificate: the connector retrying verify-full
    // connects on its own.
    set_server_cert(&pair.src, &pki, "server");
    replicates(&pair, "full2", "db_full2");
}

#[test]
fn client_certificates() {
    let src = Cluster::source();
    let pki = Pki::new(&src);
    tls_source(&src, &pki, &hba_tls_only("cert"));
    let pair = Pair::with_clusters(src, fast_retry_destination());
    let ca = pki.path("ca.crt");

    // The SynchDB API's errors.
    assert_eq!(
        sqlstate(
            pair.dst
                .try_execute("SELECT synchdb_add_extra_conninfo('nope','require','','','','')")
        ),
        "42704"
    );
    assert_eq!(
        sqlstate(
            pair.dst
                .try_execute("SELECT synchdb_del_extra_conninfo('nope')")
        ),
        "42704"
    );

    // Key in a file of its own (data.sslkey), verify-full.
    add(
        &pair,
        "cc",
        "db_cc",
        Some("verify-full"),
        &pki.path("client.crt"),
        &ca,
    );
    let e = pair
        .dst
        .try_execute("SELECT synchdb_add_extra_conninfo('cc','sometimes','','','','')")
        .expect_err("bad sslmode");
    assert_eq!(e.code().map(|c| c.code()), Some("22023"));
    let hint = e.as_db_error().and_then(|d| d.hint()).unwrap_or_default();
    assert!(hint.contains("verify-full"), "{hint}");
    assert_eq!(
        sqlstate(
            pair.dst
                .try_execute("SELECT synchdb_add_extra_conninfo('cc','verify-ca','','','','')")
        ),
        "22023"
    );
    set_data(
        &pair,
        "cc",
        "sslkey",
        &format!("\"{}\"", pki.path("client.key")),
    );
    // Key and certificate in one file, verify-ca.
    add(
        &pair,
        "both",
        "db_both",
        Some("verify-ca"),
        &pki.path("client-both.pem"),
        &ca,
    );
    // No client certificate: the server requires one.
    add(&pair, "nocert", "db_nocert", Some("require"), "", "");
    // An encrypted key.
    add(
        &pair,
        "enc",
        "db_enc",
        Some("require"),
        &pki.path("client.crt"),
        "",
    );
    set_data(
        &pair,
        "enc",
        "sslkey",
        &format!("\"{}\"", pki.path("client-enc.key")),
    );
    // A certificate without its key.
    add(
        &pair,
        "nokey",
        "db_nokey",
        Some("require"),
        &pki.path("client.crt"),
        "",
    );
    // A root certificate file that does not exist.
    add(
        &pair,
        "missing",
        "db_missing",
        Some("verify-ca"),
        "",
        "/nonexistent/ca.pem",
    );
    for name in ["cc", "both", "nocert", "enc", "nokey", "missing"] {
        pair.start(name, "initial");
    }
    replicates(&pair, "cc", "db_cc");
    replicates(&pair, "both", "db_both");
    wait_err(&pair, "nocert", "certificate");
    let st = wait_err(&pair, "enc", "encrypted");
    assert!(st.err.contains("client-enc.key"), "{}", st.err);
    let st = wait_err(&pair, "nokey", "no private key");
    assert!(st.err.contains("client.crt"), "{}", st.err);
    let st = wait_err(&pair, "missing", "/nonexistent/ca.pem");
    assert!(st.err.contains("cannot read"), "{}", st.err);

    // synchdb_del_extra_conninfo forgets the TLS settings.
    pair.dst
        .execute("SELECT synchdb_del_extra_conninfo('missing')");
    let data = pair
        .dst
        .query_one_string("SELECT data::text FROM synchdb_conninfo WHERE name = 'missing'")
        .unwrap_or_default();
    assert!(
        !data.contains("sslmode") && !data.contains("sslrootcert"),
        "{data}"
    );
}

#[test]
fn cleartext_password_only_over_tls_unless_allowed() {
    let src = Cluster::source();
    let pki = Pki::new(&src);
    tls_source(
        &src,
        &pki,
        "host all all 127.0.0.1/32 password\nhost replication all 127.0.0.1/32 password",
    );
    let pair = Pair::with_clusters(src, fast_retry_destination());
    let ca = pki.path("ca.crt");
    add(&pair, "clear", "db_clear", Some("disable"), "", "");
    // TLS whose certificate is not checked: a man in the middle with a
    // certificate of its own would get the password; refused.
    add(
        &pair,
        "cleartlsnoca",
        "db_cleartlsnoca",
        Some("require"),
        "",
        "",
    );
    // require with a root certificate checks the chain: sent.
    add(&pair, "cleartls", "db_cleartls", Some("require"), "", &ca);
    // allow: the plain attempt is refused, TLS (verified) is tried next.
    add(&pair, "clearallow", "db_clearallow", Some("allow"), "", &ca);
    for name in ["clear", "cleartlsnoca", "cleartls", "clearallow"] {
        pair.start(name, "initial");
    }
    for (name, db) in [("clear", "db_clear"), ("cleartlsnoca", "db_cleartlsnoca")] {
        let st = wait_err(&pair, name, "cleartext");
        assert!(!st.err.contains("mypass"), "{}", st.err);
        assert_eq!(
            pair.dst.count(&format!("SELECT count(*) FROM {db}.t")),
            -1,
            "{name}: nothing copied"
        );
    }
    replicates(&pair, "cleartls", "db_cleartls");
    replicates(&pair, "clearallow", "db_clearallow");

    // Allowed explicitly: the same connector replicates, unencrypted.
    set_data(&pair, "clear", "allow_cleartext_password", "true");
    pair.dst
        .execute("SELECT synchdb_restart_connector('clear')");
    wait_until(LONG, "clear: the snapshot", || {
        pair.dst.count("SELECT count(*) FROM db_clear.t") == 20
    });
    wait_until(
        Duration::from_secs(30),
        "clear: an unencrypted walsender",
        || {
            pair.src.count(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
              WHERE a.application_name = 'synchdb' AND a.datname = 'db_clear'
                AND a.backend_type = 'walsender' AND NOT s.ssl",
            ) >= 1
        },
    );
}

/// Another source version: PostgreSQL 10 has no channel binding (plain
/// SCRAM over TLS), 18 checks ALPN when a client sends it.
fn tls_to_source_version(major: u32) {
    let src = Cluster::source_version(major);
    let pki = Pki::new(&src);
    tls_source(&src, &pki, &hba_tls_only("scram-sha-256"));
    let pair = Pair::with_clusters(src, fast_retry_destination());
    let ca = pki.path("ca.crt");
    add(&pair, "full", "db_full", Some("verify-full"), "", &ca);
    add(&pair, "pref", "db_pref", None, "", "");
    for name in ["full", "pref"] {
        pair.start(name, "initial");
    }
    for (name, db) in [("full", "db_full"), ("pref", "db_pref")] {
        let count = |sql: &str| pair.dst.count(sql);
        wait_until(LONG, &format!("{name}: the snapshot"), || {
            count(&format!("SELECT count(*) FROM {db}.t")) == 20
        });
        pair.src
            .client_db(db)
            .batch_execute("INSERT INTO t VALUES (1000, 'after the snapshot')")
            .expect("source insert");
        wait_until(LONG, &format!("{name}: the change streamed"), || {
            count(&format!("SELECT count(*) FROM {db}.t WHERE id = 1000")) == 1
        });
        assert_walsender_encrypted(&pair, db);
    }
}

#[test]
fn tls_to_postgresql_10() {
    tls_to_source_version(10);
}

#[test]
fn tls_to_postgresql_18() {
    tls_to_source_version(18);
}
