//! Test harness for synchdb's end-to-end tests: throwaway PostgreSQL 15
//! clusters (a source with `wal_level = logical`, a destination with synchdb
//! preloaded) on free ports in temporary directories, run as the `postgres`
//! OS user, plus helpers that wait on conditions with a timeout and compare
//! tables between the two sides. Dropping a cluster stops it and removes its
//! directory, also when a test panics.

pub mod mitm;

use postgres::{Client, NoTls, SimpleQueryMessage};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = "/usr/lib/postgresql/15/bin";

static NEXT: AtomicU16 = AtomicU16::new(0);

fn free_port() -> u16 {
    let base = 20000 + (std::process::id() % 200) as u16 * 100;
    loop {
        let p = base + NEXT.fetch_add(1, Ordering::SeqCst) % 100;
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command run as the `postgres` OS user, with the shared libraries of
/// another PostgreSQL version when `lib` is given.
fn as_postgres_with(lib: Option<&str>, args: &[&str]) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]);
    if let Some(lib) = lib {
        c.arg("env").arg(format!("LD_LIBRARY_PATH={lib}"));
    }
    c.args(args);
    c
}

/// One throwaway PostgreSQL cluster.
pub struct Cluster {
    dir: PathBuf,
    port: u16,
    running: bool,
    /// The server binaries (PostgreSQL 15 of the system, or another major
    /// fetched by scripts/pg-versions.sh) and their shared libraries.
    bin: String,
    lib: Option<String>,
    major: u32,
}

/// Whether the version-matrix tests run PostgreSQL `major` as a source:
/// all majors, or those listed in `SYNCHDB_VERSIONS` (e.g. `12,14`).
pub fn version_selected(major: u32) -> bool {
    match std::env::var("SYNCHDB_VERSIONS") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .any(|v| v.trim().parse::<u32>().ok() == Some(major)),
        _ => true,
    }
}

/// Binaries of PostgreSQL `major` (fetched once into a cache by
/// scripts/pg-versions.sh; 15 is the system's): (bin dir, lib dir).
pub fn binaries(major: u32) -> (String, Option<String>) {
    if major == 15 {
        return (BIN.to_string(), None);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/pg-versions.sh");
    let out = run(Command::new(script).arg(major.to_string()));
    let line = out.lines().last().unwrap_or_default().to_string();
    let parts: Vec<&str> = line.split_whitespace().collect();
    match parts.as_slice() {
        [_, bin, lib] => (bin.to_string(), Some(lib.to_string())),
        _ => panic!("scripts/pg-versions.sh {major} printed {line:?}"),
    }
}

pub enum Kind {
    Source,
    Destination,
}

impl Cluster {
    pub fn source() -> Cluster {
        Cluster::new(Kind::Source, &[])
    }

    /// A source cluster running PostgreSQL `major` (10 to 18).
    pub fn source_version(major: u32) -> Cluster {
        Cluster::build(Kind::Source, &[], major)
    }

    pub fn major(&self) -> u32 {
        self.major
    }

    pub fn destination() -> Cluster {
        Cluster::new(Kind::Destination, &[])
    }

    pub fn destination_with(extra: &[(&str, &str)]) -> Cluster {
        Cluster::new(Kind::Destination, extra)
    }

    pub fn new(kind: Kind, extra: &[(&str, &str)]) -> Cluster {
        Cluster::build(kind, extra, 15)
    }

    fn build(kind: Kind, extra: &[(&str, &str)], major: u32) -> Cluster {
        let (bin, lib) = binaries(major);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("/tmp/synchdb-e2e-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create cluster dir");
        run(Command::new("chown").args(["postgres", dir.to_str().unwrap_or_default()]));
        let data = dir.join("data");
        run(&mut as_postgres_with(
            lib.as_deref(),
            &[
                &format!("{bin}/initdb"),
                "-D",
                data.to_str().unwrap_or_default(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ],
        ));
        let port = free_port();
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 20\nmax_wal_senders = 20\n\
             log_min_messages = info\nwal_sender_timeout = 60s\n\
             password_encryption = 'scram-sha-256'\n",
            dir.display()
        );
        if let Kind::Destination = kind {
            conf.push_str("shared_preload_libraries = 'synchdb'\nmax_worker_processes = 32\n");
        }
        for (k, v) in extra {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("read postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&path, text).expect("write postgresql.conf");
        let mut c = Cluster {
            dir,
            port,
            running: false,
            bin,
            lib,
            major,
        };
        c.start();
        if let Kind::Source = kind {
            // FOR TABLES IN SCHEMA publications need a superuser in PostgreSQL 15.
            c.execute("CREATE ROLE myuser LOGIN SUPERUSER REPLICATION PASSWORD 'mypass'");
        }
        c
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn log_path(&self) -> String {
        self.dir.join("log").display().to_string()
    }

    pub fn start(&mut self) {
        run(&mut as_postgres_with(
            self.lib.as_deref(),
            &[
                &format!("{}/pg_ctl", self.bin),
                "-D",
                &self.data(),
                "-l",
                &self.log_path(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        ));
        self.running = true;
    }

    pub fn stop(&mut self, mode: &str) {
        if self.running {
            let _ = as_postgres_with(
                self.lib.as_deref(),
                &[
                    &format!("{}/pg_ctl", self.bin),
                    "-D",
                    &self.data(),
                    "-m",
                    mode,
                    "-w",
                    "stop",
                ],
            )
            .output();
            self.running = false;
        }
    }

    /// A crash: `pg_ctl stop -m immediate`.
    pub fn stop_immediate(&mut self) {
        self.stop("immediate");
    }

    pub fn restart(&mut self) {
        self.stop("fast");
        self.start();
    }

    pub fn client(&self) -> Client {
        self.client_db("postgres")
    }

    pub fn client_db(&self, db: &str) -> Client {
        let conn = format!(
            "host={} port={} user=postgres dbname={db}",
            self.dir.display(),
            self.port
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(&conn, NoTls) {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("cannot connect to {conn}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// A client of the `postgres` database for another thread (a writer
    /// running while the test watches the destination).
    pub fn spawn_client(&self) -> impl FnOnce() -> Client + Send + 'static {
        let conn = format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.display(),
            self.port
        );
        move || Client::connect(&conn, NoTls).expect("writer connects")
    }

    pub fn client_as(&self, user: &str) -> Client {
        let conn = format!(
            "host={} port={} user={user} dbname=postgres",
            self.dir.display(),
            self.port
        );
        Client::connect(&conn, NoTls).unwrap_or_else(|e| panic!("cannot connect as {user}: {e}"))
    }

    pub fn execute(&self, sql: &str) {
        self.client()
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
    }

    pub fn try_execute(&self, sql: &str) -> Result<(), postgres::Error> {
        self.client().batch_execute(sql)
    }

    /// Every value as text (NULL as None), rows in order.
    pub fn query_strings(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let msgs = self
            .client()
            .simple_query(sql)
            .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
        msgs.into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect()
    }

    /// Like `query_strings`, but a failure (e.g. the server is restarting
    /// after a crash) is returned instead of failing the test.
    pub fn try_query_strings(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        let conn = format!(
            "host={} port={} user=postgres dbname=postgres connect_timeout=5",
            self.dir.display(),
            self.port
        );
        let mut client = Client::connect(&conn, NoTls).map_err(|e| describe(&e))?;
        let msgs = client.simple_query(sql).map_err(|e| describe(&e))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect())
    }

    pub fn query_one_string(&self, sql: &str) -> Option<String> {
        self.query_strings(sql)
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten())
    }

    /// A single integer result; -1 when the query fails (so that waits can
    /// poll through a server restart).
    pub fn count(&self, sql: &str) -> i64 {
        self.try_query_strings(sql)
            .ok()
            .and_then(|rows| rows.into_iter().next())
            .and_then(|r| r.into_iter().next().flatten())
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1)
    }

    pub fn log_contents(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop("immediate");
        if std::env::var("SYNCHDB_KEEP_CLUSTERS").as_deref() != Ok("1") {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The server's message and SQLSTATE of an error.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Polls `f` every 100 ms until it holds; panics after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if f() {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {:?} waiting for {what}", start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `f` until it returns a value; panics after `timeout`.
pub fn wait_for_value<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {:?} waiting for {what}", start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One row of `synchdb_state_view`.
#[derive(Debug, Clone)]
pub struct StateRow {
    pub name: String,
    pub connector_type: String,
    pub pid: i32,
    pub stage: String,
    pub state: String,
    pub err: String,
    pub last_dbz_offset: String,
}

pub const LONG: Duration = Duration::from_secs(60);

/// A source and a destination, with sample data on the source and the
/// extension created in the destination's `postgres` database.
pub struct Pair {
    pub src: Cluster,
    pub dst: Cluster,
}

impl Pair {
    pub fn new() -> Pair {
        Pair::with_destination(Cluster::destination())
    }

    pub fn with_destination(dst: Cluster) -> Pair {
        Pair::with_clusters(Cluster::source(), dst)
    }

    /// The sample data on `src`, the extension in `dst`.
    pub fn with_clusters(src: Cluster, dst: Cluster) -> Pair {
        src.execute(
            "CREATE TABLE public.orders (id int PRIMARY KEY, customer text NOT NULL,
                                         amount numeric(10,2), created timestamptz DEFAULT now());
             INSERT INTO public.orders (id, customer, amount)
               SELECT g, 'customer ' || g, g * 1.25 FROM generate_series(1, 100) g;
             CREATE TABLE public.customers (id serial PRIMARY KEY, name text);
             INSERT INTO public.customers (name) SELECT 'name ' || g FROM generate_series(1, 10) g;",
        );
        dst.execute("CREATE EXTENSION synchdb");
        Pair { src, dst }
    }

    pub fn add_connector(&self, name: &str) {
        self.add_connector_with(name, "null", "null");
    }

    pub fn add_connector_with(&self, name: &str, table: &str, snapshottable: &str) {
        self.dst.execute(&format!(
            "SELECT synchdb_add_conninfo('{name}','127.0.0.1',{},'myuser','mypass','postgres','public','{table}','{snapshottable}','postgres')",
            self.src.port()
        ));
    }

    pub fn start(&self, name: &str, mode: &str) {
        self.dst.execute(&format!(
            "SELECT synchdb_start_engine_bgw('{name}', '{mode}')"
        ));
    }

    pub fn stop(&self, name: &str) {
        self.dst
            .execute(&format!("SELECT synchdb_stop_engine_bgw('{name}')"));
    }

    pub fn state(&self, name: &str) -> Option<StateRow> {
        let rows = self
            .dst
            .try_query_strings(&format!(
                "SELECT name, connector_type, pid, stage, state, err, last_dbz_offset
                   FROM synchdb_state_view WHERE name = '{name}'"
            ))
            .ok()?;
        rows.into_iter().next().map(|r| {
            let s = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
            StateRow {
                name: s(0),
                connector_type: s(1),
                pid: s(2).parse().unwrap_or(-2),
                stage: s(3),
                state: s(4),
                err: s(5),
                last_dbz_offset: s(6),
            }
        })
    }

    /// The connector's slot (and publication) name on the source.
    pub fn slot_name(&self, name: &str) -> String {
        self.dst
            .query_one_string(&format!("SELECT synchdb_object_name('{name}')"))
            .unwrap_or_default()
    }

    /// Waits until the connector has applied everything the source has
    /// committed so far (its slot confirmed the current WAL position).
    pub fn wait_caught_up(&self, name: &str) {
        let target = self
            .src
            .query_one_string("SELECT pg_current_wal_lsn()::text")
            .unwrap_or_default();
        let slot = self.slot_name(name);
        wait_until(LONG, &format!("{name} to confirm {target}"), || {
            self.src.count(&format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'
                   AND confirmed_flush_lsn >= '{target}'"
            )) == 1
        });
    }

    /// Fails unless the table has the same rows on both sides.
    pub fn assert_tables_equal(&self, src_table: &str, dst_table: &str, order_by: &str) {
        let a = table_text(&self.src, src_table, order_by);
        let b = table_text(&self.dst, dst_table, order_by);
        if a != b {
            let only_src: Vec<_> = a.iter().filter(|r| !b.contains(r)).take(10).collect();
            let only_dst: Vec<_> = b.iter().filter(|r| !a.contains(r)).take(10).collect();
            panic!(
                "{src_table} ({} rows) and {dst_table} ({} rows) differ\nonly in source: {only_src:?}\nonly in destination: {only_dst:?}",
                a.len(),
                b.len()
            );
        }
    }

    pub fn tables_equal(&self, src_table: &str, dst_table: &str, order_by: &str) -> bool {
        let q = |t: &str| format!("SELECT t::text FROM {t} t ORDER BY {order_by}");
        match (
            self.src.try_query_strings(&q(src_table)),
            self.dst.try_query_strings(&q(dst_table)),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }

    pub fn wait_tables_equal(&self, src_table: &str, dst_table: &str, order_by: &str) {
        let ok = {
            let start = Instant::now();
            loop {
                if self.dst.count(&format!(
                    "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE format('%I.%I', n.nspname, c.relname) = '{dst_table}'"
                )) == 1
                    && self.tables_equal(src_table, dst_table, order_by)
                {
                    break true;
                }
                if start.elapsed() > LONG {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        if !ok {
            self.assert_tables_equal(src_table, dst_table, order_by);
        }
    }
}

impl Default for Pair {
    fn default() -> Self {
        Pair::new()
    }
}

fn table_text(c: &Cluster, table: &str, order_by: &str) -> Vec<Option<String>> {
    c.query_strings(&format!(
        "SELECT t::text FROM {table} t ORDER BY {order_by}"
    ))
    .into_iter()
    .map(|r| r.into_iter().next().flatten())
    .collect()
}

/// The SQLSTATE of a failed statement.
pub fn sqlstate(r: Result<(), postgres::Error>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => e
            .code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| format!("no sqlstate: {e}")),
    }
}

/// Private (anonymous) resident memory of a process, in kB.
pub fn rss_anon_kb(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
