//! The source side: normal connections to the source database (preflight
//! checks, catalog queries, publication and slot management, snapshot COPY)
//! and the replication session. Runs on a tokio runtime owned by the worker
//! and never calls into Postgres; everything here is plain Rust.

use crate::control::conninfo::{ConnInfo, TableRef};
use std::cell::Cell;
use std::collections::HashMap;
use std::time::Duration;
use tokio_postgres::Client;

/// A source problem, phrased for the state view. Never carries the password.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot connect to source {host}:{port} database \"{db}\": {msg}")]
    Connect {
        host: String,
        port: i32,
        db: String,
        msg: String,
    },
    #[error("source wal_level is \"{0}\", it must be \"logical\"")]
    WalLevel(String),
    #[error("source user \"{0}\" has neither REPLICATION nor SUPERUSER")]
    NoReplicationPrivilege(String),
    #[error("source has no free replication slot ({0}); raise max_replication_slots on the source or drop an unused slot")]
    NoFreeSlot(String),
    #[error("captured table {0} does not exist on the source")]
    MissingTable(String),
    #[error("source query failed: {0}")]
    Query(String),
    #[error("replication stream: {0}")]
    Stream(String),
    /// Something only an admin of the source can do; the connector retries.
    #[error("{what}; an admin must run on the source: {sql} (the connector retries until then)")]
    NeedsAdmin {
        what: String,
        sql: String,
        /// Captured tables the publication lacks.
        tables: Vec<TableRef>,
    },
}

thread_local! {
    /// The source's server_version_num, read when a connection opens (a
    /// process talks to one source).
    static VERSION: Cell<i32> = const { Cell::new(0) };
}

/// The source's server_version_num (150000 until a connection has told).
pub fn server_version() -> i32 {
    match VERSION.with(|v| v.get()) {
        0 => 150000,
        v => v,
    }
}

impl SourceError {
    pub fn from_pg(e: tokio_postgres::Error) -> SourceError {
        SourceError::Query(describe_pg_error(&e))
    }
}

/// tokio-postgres errors print "db error" without the server message; this
/// gives the message (and SQLSTATE) the server sent.
pub fn describe_pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                src = inner.source();
            }
            s
        }
    }
}

/// Builds a current-thread runtime; the worker drives it with `block_on`
/// from its main thread. The only other thread is tokio's blocking pool for
/// host name lookups: it never calls into PostgreSQL and blocks every
/// signal, so PostgreSQL's handlers only ever run on the main thread. (A
/// separate I/O thread reading the stream was measured slower: the
/// cross-thread hand-off per message costs more than it overlaps.)
pub fn runtime() -> Result<tokio::runtime::Runtime, SourceError> {
    tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(1)
        .on_thread_start(|| {
            block_signals();
        })
        .enable_all()
        .build()
        .map_err(|e| SourceError::Query(format!("cannot create I/O runtime: {e}")))
}

/// Blocks every signal in the calling thread; returns the mask before.
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on local signal sets for the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    }
}

/// The statements that open a transaction inside the exported snapshot
/// `name` (read only, repeatable read, as every copy reads).
pub fn begin_in_snapshot(name: &str) -> String {
    format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
        name.replace('\'', "''")
    )
}

/// Session settings pinned on every source connection, normal and
/// replication, whatever the role or database defaults say: they decide how
/// values are written as text (in COPY and in pgoutput), and the destination
/// reads that text back with its input functions. Native logical
/// replication pins the same ones.
pub const PINNED_OPTIONS: &str = "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 -c bytea_output=hex -c lc_monetary=C -c client_encoding=UTF8";

/// How long one connection attempt may take (TCP, TLS and authentication).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The startup settings; the socket, and TLS on it, come from
/// `crate::source::tls` (shared with the replication connection).
fn config(info: &ConnInfo, encrypted: bool) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.options(PINNED_OPTIONS);
    c.host(&info.hostname)
        .port(u16::try_from(info.port).unwrap_or(5432))
        .user(&info.user)
        .password(info.pwd.as_bytes())
        .dbname(&info.srcdb)
        .application_name("synchdb");
    if encrypted {
        // The stream is encrypted already: tokio-postgres sends no
        // SSLRequest and takes it as it is (with its channel binding data).
        c.ssl_mode(tokio_postgres::config::SslMode::Require)
            .ssl_negotiation(tokio_postgres::config::SslNegotiation::Direct);
    } else {
        c.ssl_mode(tokio_postgres::config::SslMode::Disable);
    }
    c
}

type Opened = (
    Client,
    tokio_postgres::Connection<crate::source::tls::Stream, crate::source::tls::Stream>,
);

/// Why one connection attempt failed.
enum AttemptError {
    /// TCP, TLS, or a file the TLS settings name.
    Transport(String),
    Pg(tokio_postgres::Error),
}

async fn open_once(
    info: &ConnInfo,
    connector: &crate::source::tls::Connector,
    attempt: crate::source::tls::Attempt,
) -> Result<Opened, AttemptError> {
    let port = u16::try_from(info.port).unwrap_or(5432);
    let stream = connector
        .open(&info.hostname, port, attempt)
        .await
        .map_err(AttemptError::Transport)?;
    config(info, stream.is_tls())
        .connect_raw(stream, crate::source::tls::AlreadyEncrypted)
        .await
        .map_err(AttemptError::Pg)
}

/// Opens a normal connection (with TLS as the connector's sslmode says);
/// its driver task runs on the current runtime.
pub async fn connect(info: &ConnInfo) -> Result<Client, SourceError> {
    let fail = |msg: String| SourceError::Connect {
        host: info.hostname.clone(),
        port: info.port,
        db: info.srcdb.clone(),
        msg,
    };
    let opts = info.tls().map_err(|e| fail(e.to_string()))?;
    let connector = crate::source::tls::Connector::new(&opts, &info.hostname).map_err(fail)?;
    let attempts = connector.attempts();
    let mut opened = None;
    for (i, attempt) in attempts.iter().enumerate() {
        let more = i + 1 < attempts.len();
        match tokio::time::timeout(CONNECT_TIMEOUT, open_once(info, &connector, *attempt)).await {
            Err(_) => {
                return Err(fail(format!(
                    "timed out after {} s",
                    CONNECT_TIMEOUT.as_secs()
                )))
            }
            Ok(Ok(o)) => {
                opened = Some(o);
                break;
            }
            // sslmode allow: the plain connection was turned away; TLS next.
            Ok(Err(AttemptError::Pg(e))) if more && rejected_plain(&e) => {}
            Ok(Err(AttemptError::Pg(e))) => return Err(fail(describe_pg_error(&e))),
            Ok(Err(AttemptError::Transport(m))) => return Err(fail(m)),
        }
    }
    let Some((client, conn)) = opened else {
        return Err(fail("no connection attempt was made".into()));
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let v: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(SourceError::from_pg)?
        .get(0);
    if v < 100000 {
        return Err(SourceError::Query(format!(
            "the source runs PostgreSQL {}.{}; sources from PostgreSQL 10 on are supported",
            v / 10000,
            v / 100 % 100
        )));
    }
    VERSION.with(|c| c.set(v));
    Ok(client)
}

/// Whether a plain connection failed in a way TLS may fix: pg_hba.conf
/// turned it away (SQLSTATE class 28), or the server asked for a
/// cleartext password.
fn rejected_plain(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.code().code().starts_with("28"))
        || crate::source::tls::is_cleartext_refusal(e)
}

/// Checks what the connector needs from the source, with a clear message
/// for each missing piece. Returns the server version number.
pub async fn preflight(client: &Client, info: &ConnInfo) -> Result<i32, SourceError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'),
                    current_setting('server_version_num')::int,
                    r.rolreplication OR r.rolsuper
               FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(SourceError::from_pg)?;
    let wal_level: String = row.get(0);
    let version: i32 = row.get(1);
    let can_replicate: bool = row.get(2);
    if wal_level != "logical" {
        return Err(SourceError::WalLevel(wal_level));
    }
    if !can_replicate {
        return Err(SourceError::NoReplicationPrivilege(info.user.clone()));
    }
    Ok(version)
}

/// The type of a source column, as the destination must name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnType {
    /// A built-in type: `format_type` text, valid in any database.
    Builtin(String),
    /// A user-defined type (enum, composite, domain, range), created in the
    /// destination schema under the same name; `dims` array dimensions.
    User { name: String, dims: usize },
    /// A type that belongs to an extension (hstore, citext, ...): used as it
    /// is when the extension exists in the destination.
    Extension {
        name: String,
        extension: String,
        dims: usize,
    },
}

/// One column of a source table, as the destination must recreate it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceColumn {
    pub name: String,
    pub ty: ColumnType,
    /// The source type's OID (of the element type for arrays).
    pub type_oid: u32,
    pub not_null: bool,
    /// The expression of a stored generated column.
    pub generated: Option<String>,
}

/// A captured source table with its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTable {
    pub table: TableRef,
    /// The table's OID on the source (pgoutput's relation id).
    pub oid: u32,
    pub columns: Vec<SourceColumn>,
    pub primary_key: Vec<String>,
}

/// Lists the captured tables: the explicit list (each must exist), or every
/// ordinary and partitioned table of the schema (partitions excluded, they
/// replicate through their root).
pub async fn list_tables(
    client: &Client,
    schema: &str,
    explicit: Option<&[TableRef]>,
) -> Result<Vec<TableRef>, SourceError> {
    match explicit {
        Some(list) => {
            for t in list {
                let n = client
                    .query_one(
                        "SELECT count(*) FROM pg_catalog.pg_class c
                           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r','p')",
                        &[&t.schema, &t.table],
                    )
                    .await
                    .map_err(SourceError::from_pg)?;
                let count: i64 = n.get(0);
                if count == 0 {
                    return Err(SourceError::MissingTable(t.to_string()));
                }
            }
            Ok(list.to_vec())
        }
        None => {
            let rows = client
                .query(
                    "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c
                       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = $1 AND c.relkind IN ('r','p') AND NOT c.relispartition
                        AND c.relpersistence = 'p'
                      ORDER BY c.relname",
                    &[&schema],
                )
                .await
                .map_err(SourceError::from_pg)?;
            Ok(rows
                .iter()
                .map(|r| TableRef {
                    schema: r.get(0),
                    table: r.get(1),
                })
                .collect())
        }
    }
}

/// The OIDs of the given source tables (missing ones are left out).
pub async fn table_oids(
    client: &Client,
    tables: &[TableRef],
) -> Result<HashMap<TableRef, u32>, SourceError> {
    let mut out = HashMap::new();
    for t in tables {
        let rows = client
            .query(
                "SELECT c.oid FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2",
                &[&t.schema, &t.table],
            )
            .await
            .map_err(SourceError::from_pg)?;
        if let Some(r) = rows.first() {
            out.insert(t.clone(), r.get::<_, u32>(0));
        }
    }
    Ok(out)
}

/// The enum types among the given type OIDs (arrays count as their
/// element type), with their labels in order: types are found by OID, so a
/// column dropped or a table renamed since does not hide them.
pub async fn enum_types(client: &Client, oids: &[u32]) -> Result<Vec<UserType>, SourceError> {
    let rows = client
        .query(
            "SELECT t.typname::text, array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
               FROM pg_catalog.pg_type t
               JOIN pg_catalog.pg_enum e ON e.enumtypid = t.oid
              WHERE t.oid IN (SELECT CASE WHEN a.typcategory = 'A' THEN a.typelem ELSE a.oid END
                                FROM pg_catalog.pg_type a WHERE a.oid = ANY ($1))
              GROUP BY t.oid, t.typname",
            &[&oids],
        )
        .await
        .map_err(SourceError::from_pg)?;
    Ok(rows
        .iter()
        .map(|r| UserType::Enum {
            name: r.get(0),
            labels: r.get(1),
        })
        .collect())
}

/// The current name of source relation `oid`, if it still exists.
pub async fn relation_name(client: &Client, oid: u32) -> Result<Option<TableRef>, SourceError> {
    let row = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = $1",
            &[&oid],
        )
        .await
        .map_err(SourceError::from_pg)?;
    Ok(row.map(|r| TableRef {
        schema: r.get(0),
        table: r.get(1),
    }))
}

/// Reads a table's columns (names, exact types, NOT NULL) and primary key.
pub async fn describe_table(client: &Client, t: &TableRef) -> Result<SourceTable, SourceError> {
    let sql = include_str!("../../sql/source_columns.sql");
    // Generated columns exist from PostgreSQL 12.
    let sql = if server_version() < 120000 {
        sql.replace("a.attgenerated = 's'", "false")
    } else {
        sql.to_string()
    };
    let cols = client
        .query(sql.as_str(), &[&t.schema, &t.table])
        .await
        .map_err(SourceError::from_pg)?;
    if cols.is_empty() {
        return Err(SourceError::MissingTable(t.to_string()));
    }
    let pk = client
        .query(
            "SELECT a.attname
               FROM pg_catalog.pg_index i
               JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = (SELECT c.oid FROM pg_catalog.pg_class c
                                    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                                   WHERE n.nspname = $1 AND c.relname = $2)
                AND i.indisprimary
              ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&t.schema, &t.table],
        )
        .await
        .map_err(SourceError::from_pg)?;
    Ok(SourceTable {
        table: t.clone(),
        oid: cols.first().map(|r| r.get::<_, u32>(9)).unwrap_or(0),
        columns: cols
            .iter()
            .map(|r| {
                let kind: String = r.get(4);
                let elem_name: String = r.get(5);
                let dims = usize::try_from(r.get::<_, i32>(6)).unwrap_or(0);
                let ty = match kind.as_str() {
                    "user" => ColumnType::User {
                        name: elem_name,
                        dims,
                    },
                    "extension" => ColumnType::Extension {
                        name: elem_name,
                        extension: r.get::<_, Option<String>>(7).unwrap_or_default(),
                        dims,
                    },
                    _ => ColumnType::Builtin(r.get(1)),
                };
                SourceColumn {
                    name: r.get(0),
                    ty,
                    type_oid: r.get::<_, u32>(8),
                    not_null: r.get(2),
                    generated: r.get(3),
                }
            })
            .collect(),
        primary_key: pk.iter().map(|r| r.get(0)).collect(),
    })
}

fn quote(ident: &str) -> String {
    crate::apply::sqlgen::quote_ident(ident)
}

fn table_list(tables: &[TableRef]) -> String {
    let names: Vec<String> = tables
        .iter()
        .map(|t| format!("{}.{}", quote(&t.schema), quote(&t.table)))
        .collect();
    names.join(", ")
}

/// The leaf partitions of each partitioned table among `tables` (a plain
/// table stands for itself): what a publication lists for them on a source
/// that cannot publish a partitioned table (before PostgreSQL 13), or when
/// a publication publishes partitions under their own names.
pub async fn leaf_tables(
    client: &Client,
    tables: &[TableRef],
) -> Result<Vec<(TableRef, TableRef)>, SourceError> {
    let mut out: Vec<(TableRef, TableRef)> = Vec::new();
    for t in tables {
        let rows = client
            .query(
                "WITH RECURSIVE tree(relid) AS (
                     SELECT c.oid FROM pg_catalog.pg_class c
                       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = $1 AND c.relname = $2
                     UNION ALL
                     SELECT i.inhrelid FROM pg_catalog.pg_inherits i
                       JOIN tree ON i.inhparent = tree.relid
                       JOIN pg_catalog.pg_class k ON k.oid = i.inhrelid AND k.relispartition)
                 SELECT n.nspname::text, c.relname::text FROM tree
                   JOIN pg_catalog.pg_class c ON c.oid = tree.relid
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind = 'r' AND c.relpersistence = 'p'
                  ORDER BY 1, 2",
                &[&t.schema, &t.table],
            )
            .await
            .map_err(SourceError::from_pg)?;
        for r in rows {
            let leaf = TableRef {
                schema: r.get(0),
                table: r.get(1),
            };
            if !out.iter().any(|(l, _)| *l == leaf) {
                out.push((leaf, t.clone()));
            }
        }
    }
    Ok(out)
}

/// The OIDs of the leaf partitions under partitioned source table `root`.
pub async fn leaf_oids(client: &Client, root: u32) -> Result<Vec<u32>, SourceError> {
    let rows = client
        .query(
            "WITH RECURSIVE tree(relid) AS (
                 SELECT $1::oid
                 UNION ALL
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i
                   JOIN tree ON i.inhparent = tree.relid
                   JOIN pg_catalog.pg_class k ON k.oid = i.inhrelid AND k.relispartition)
             SELECT c.oid FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.relid
              WHERE c.relkind = 'r'",
            &[&root],
        )
        .await
        .map_err(SourceError::from_pg)?;
    Ok(rows.iter().map(|r| r.get::<_, u32>(0)).collect())
}

/// The partitioned tables above source relation `relid` when it is a
/// partition, nearest first (OID and name).
pub async fn partition_ancestors(
    client: &Client,
    relid: u32,
) -> Result<Vec<(u32, TableRef)>, SourceError> {
    let rows = client
        .query(
            "WITH RECURSIVE up(relid, depth) AS (
                 SELECT $1::oid, 0
                 UNION ALL
                 SELECT i.inhparent, up.depth + 1 FROM up
                   JOIN pg_catalog.pg_class c ON c.oid = up.relid AND c.relispartition
                   JOIN pg_catalog.pg_inherits i ON i.inhrelid = up.relid)
             SELECT c.oid, n.nspname::text, c.relname::text FROM up
               JOIN pg_catalog.pg_class c ON c.oid = up.relid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE up.depth > 0
              ORDER BY up.depth",
            &[&relid],
        )
        .await
        .map_err(SourceError::from_pg)?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, u32>(0),
                TableRef {
                    schema: r.get(1),
                    table: r.get(2),
                },
            )
        })
        .collect())
}

/// What a publication must be for the connector: its name, whether the
/// connector may change it, and what it captures.
pub struct PublicationSpec<'a> {
    pub name: &'a str,
    /// The connector's own publication (it creates and alters it); false
    /// for one named in the connector's data, which is only checked.
    pub own: bool,
    pub schema: &'a str,
    pub explicit: Option<&'a [TableRef]>,
}

impl PublicationSpec<'_> {
    fn with_clause(&self) -> &'static str {
        if server_version() >= 130000 {
            " WITH (publish_via_partition_root = true)"
        } else {
            ""
        }
    }

    /// The statement that creates the publication for `tables`.
    fn create_sql(&self, members: &[TableRef]) -> String {
        let target = if self.explicit.is_none() && server_version() >= 150000 {
            format!(" FOR TABLES IN SCHEMA {}", quote(self.schema))
        } else if members.is_empty() {
            String::new()
        } else {
            format!(" FOR TABLE {}", table_list(members))
        };
        format!(
            "CREATE PUBLICATION {}{target}{}",
            quote(self.name),
            self.with_clause()
        )
    }
}

/// Creates the connector's publication or brings it in step with the
/// captured tables; for a publication an admin made, checks that it
/// publishes every operation of every captured table. Anything the
/// connector's role may not do is an error naming the statement an admin
/// must run. Returns the tables added to the publication just now (their
/// rows written before are not in the stream: they need a copy).
pub async fn ensure_publication(
    client: &Client,
    spec: &PublicationSpec<'_>,
    tables: &[TableRef],
    owe_copy: &mut dyn FnMut(&[TableRef]) -> Result<(), SourceError>,
) -> Result<Vec<TableRef>, SourceError> {
    let version = server_version();
    let row = client
        .query_opt(
            "SELECT p.pubowner = r.oid OR r.rolsuper, p.puballtables,
                    p.pubinsert AND p.pubupdate AND p.pubdelete
                      AND coalesce((to_jsonb(p) ->> 'pubtruncate')::bool, true),
                    coalesce((to_jsonb(p) ->> 'pubviaroot')::bool, false)
               FROM pg_catalog.pg_publication p, pg_catalog.pg_roles r
              WHERE p.pubname = $1 AND r.rolname = current_user",
            &[&spec.name],
        )
        .await
        .map_err(SourceError::from_pg)?;
    // Before 13 a partitioned table is published through its partitions.
    let by_leaf = version < 130000 || row.as_ref().is_some_and(|r| !r.get::<_, bool>(3));
    // (published table, the captured table it belongs to)
    let pairs: Vec<(TableRef, TableRef)> = if by_leaf {
        leaf_tables(client, tables).await?
    } else {
        tables.iter().map(|t| (t.clone(), t.clone())).collect()
    };
    let members: Vec<TableRef> = pairs.iter().map(|(m, _)| m.clone()).collect();
    let captured_of = |missing: &[TableRef]| -> Vec<TableRef> {
        let mut out: Vec<TableRef> = Vec::new();
        for (m, t) in &pairs {
            if missing.contains(m) && !out.contains(t) {
                out.push(t.clone());
            }
        }
        out
    };
    let Some(row) = row else {
        let sql = spec.create_sql(&members);
        if !spec.own {
            return Err(SourceError::NeedsAdmin {
                what: format!("publication \"{}\" does not exist on the source", spec.name),
                sql,
                tables: Vec::new(),
            });
        }
        return match client.batch_execute(&sql).await {
            Ok(()) => Ok(Vec::new()),
            Err(e) if is_denied(&e) => Err(SourceError::NeedsAdmin {
                what: format!(
                    "the source role may not create publication \"{}\" ({})",
                    spec.name,
                    describe_pg_error(&e)
                ),
                sql,
                tables: Vec::new(),
            }),
            Err(e) => Err(SourceError::from_pg(e)),
        };
    };
    let may_alter: bool = row.get(0);
    let all_tables: bool = row.get(1);
    let all_ops: bool = row.get(2);
    if !all_ops {
        let ops = if version >= 110000 {
            "insert, update, delete, truncate"
        } else {
            "insert, update, delete"
        };
        return Err(SourceError::NeedsAdmin {
            what: format!(
                "publication \"{}\" does not publish every operation (changes would be lost)",
                spec.name
            ),
            sql: format!(
                "ALTER PUBLICATION {} SET (publish = '{ops}')",
                quote(spec.name)
            ),
            tables: Vec::new(),
        });
    }
    if all_tables {
        return Ok(Vec::new());
    }
    if spec.own && may_alter && spec.explicit.is_none() && version >= 150000 {
        client
            .batch_execute(&format!(
                "ALTER PUBLICATION {} SET TABLES IN SCHEMA {}",
                quote(spec.name),
                quote(spec.schema)
            ))
            .await
            .map_err(SourceError::from_pg)?;
        return Ok(Vec::new());
    }
    let published = table_refs(
        client,
        "SELECT schemaname::text, tablename::text FROM pg_catalog.pg_publication_tables
          WHERE pubname = $1",
        spec.name,
    )
    .await?;
    if version >= 150000 {
        // A row filter or a column list would drop rows or columns silently.
        let filtered: Vec<TableRef> = table_refs(
            client,
            "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_publication_rel pr
               JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid
               JOIN pg_catalog.pg_class c ON c.oid = pr.prrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE p.pubname = $1 AND (pr.prqual IS NOT NULL OR pr.prattrs IS NOT NULL)",
            spec.name,
        )
        .await?
        .into_iter()
        .filter(|t| members.contains(t))
        .collect();
        if !filtered.is_empty() {
            return Err(SourceError::NeedsAdmin {
                what: format!(
                    "publication \"{}\" publishes {} with a row filter or a column list (rows or columns would be lost)",
                    spec.name,
                    table_list(&filtered)
                ),
                sql: format!(
                    "ALTER PUBLICATION {} SET TABLE {}",
                    quote(spec.name),
                    table_list(&published)
                ),
                tables: Vec::new(),
            });
        }
    }
    let missing: Vec<TableRef> = members
        .iter()
        .filter(|t| !published.contains(t))
        .cloned()
        .collect();
    if !spec.own || !may_alter {
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        return Err(SourceError::NeedsAdmin {
            what: format!(
                "publication \"{}\" does not publish captured table{} {}",
                spec.name,
                if missing.len() > 1 { "s" } else { "" },
                table_list(&missing)
            ),
            sql: format!(
                "ALTER PUBLICATION {} ADD TABLE {}",
                quote(spec.name),
                table_list(&missing)
            ),
            tables: captured_of(&missing),
        });
    }
    // The connector's own publication: exactly the captured tables.
    let extra: Vec<TableRef> = published
        .iter()
        .filter(|t| !members.contains(t))
        .cloned()
        .collect();
    if !extra.is_empty() {
        client
            .batch_execute(&format!(
                "ALTER PUBLICATION {} DROP TABLE {}",
                quote(spec.name),
                table_list(&extra)
            ))
            .await
            .map_err(SourceError::from_pg)?;
    }
    if !missing.is_empty() {
        // Recorded before the tables join: a crash in between must not
        // leave their earlier rows uncopied.
        let owed = captured_of(&missing);
        owe_copy(&owed)?;
        let sql = format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            quote(spec.name),
            table_list(&missing)
        );
        match client.batch_execute(&sql).await {
            Ok(()) => {}
            Err(e) if is_denied(&e) => {
                return Err(SourceError::NeedsAdmin {
                    what: format!(
                        "the source role may not add tables to publication \"{}\" ({})",
                        spec.name,
                        describe_pg_error(&e)
                    ),
                    sql,
                    tables: owed,
                })
            }
            Err(e) => return Err(SourceError::from_pg(e)),
        }
        return Ok(owed);
    }
    Ok(Vec::new())
}

/// The (schema, name) rows of a query taking one text parameter.
async fn table_refs(client: &Client, sql: &str, param: &str) -> Result<Vec<TableRef>, SourceError> {
    Ok(client
        .query(sql, &[&param])
        .await
        .map_err(SourceError::from_pg)?
        .iter()
        .map(|r| TableRef {
            schema: r.get(0),
            table: r.get(1),
        })
        .collect())
}

fn is_denied(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.code() == &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
}

/// The source's current WAL insert position: every transaction committed
/// so far has a commit LSN below it.
pub async fn current_wal_lsn(client: &Client) -> Result<u64, SourceError> {
    let s: String = client
        .query_one("SELECT pg_catalog.pg_current_wal_lsn()::text", &[])
        .await
        .map_err(SourceError::from_pg)?
        .get(0);
    crate::lsn::parse_lsn(&s).map_err(|e| SourceError::Query(format!("bad WAL position {s}: {e}")))
}

/// Whether the connector's slot exists, and its confirmed position.
pub async fn slot_position(client: &Client, slot: &str) -> Result<Option<u64>, SourceError> {
    let rows = client
        .query(
            "SELECT coalesce(confirmed_flush_lsn, restart_lsn)::text FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(SourceError::from_pg)?;
    match rows.first() {
        None => Ok(None),
        Some(r) => {
            let s: Option<String> = r.get(0);
            Ok(Some(
                s.and_then(|s| crate::lsn::parse_lsn(&s).ok()).unwrap_or(0),
            ))
        }
    }
}

/// Creates the connector's logical slot (pgoutput); returns its consistent point.
pub async fn create_slot(client: &Client, slot: &str) -> Result<u64, SourceError> {
    let r = client
        .query_one(
            "SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(|e| {
            if let Some(db) = e.as_db_error() {
                if db.code() == &tokio_postgres::error::SqlState::CONFIGURATION_LIMIT_EXCEEDED {
                    return SourceError::NoFreeSlot(db.message().to_string());
                }
            }
            SourceError::from_pg(e)
        })?;
    let s: String = r.get(0);
    crate::lsn::parse_lsn(&s).map_err(|e| SourceError::Query(format!("bad slot LSN {s}: {e}")))
}

/// Drops the slot and the publication (from `synchdb_del_conninfo`), waiting
/// briefly for a worker that is still letting go of the slot.
pub fn drop_objects(info: &ConnInfo, object: &str) -> Result<(), SourceError> {
    let rt = runtime()?;
    rt.block_on(async {
        let client = connect(info).await?;
        for _ in 0..50 {
            let active: Option<bool> = client
                .query_opt(
                    "SELECT active FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                    &[&object],
                )
                .await
                .map_err(SourceError::from_pg)?
                .map(|r| r.get(0));
            match active {
                Some(true) => tokio::time::sleep(Duration::from_millis(100)).await,
                Some(false) => {
                    client
                        .execute("SELECT pg_catalog.pg_drop_replication_slot($1)", &[&object])
                        .await
                        .map_err(SourceError::from_pg)?;
                    break;
                }
                None => break,
            }
        }
        // Only the connector's own publication goes; one an admin made
        // (named in the connector's data, or owned by another role) stays.
        let own: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication p, pg_catalog.pg_roles r
                                 WHERE p.pubname = $1 AND r.rolname = current_user
                                   AND (p.pubowner = r.oid OR r.rolsuper))",
                &[&object],
            )
            .await
            .map_err(SourceError::from_pg)?
            .get(0);
        if info.owns_publication() && own {
            client
                .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote(object)))
                .await
                .map_err(SourceError::from_pg)?;
        }
        Ok(())
    })
}

/// A user-defined type the destination needs, with what defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserType {
    Enum {
        name: String,
        labels: Vec<String>,
    },
    Composite {
        name: String,
        attrs: Vec<(String, ColumnType)>,
    },
    Domain {
        name: String,
        base: ColumnType,
        not_null: bool,
        checks: Vec<String>,
    },
    Range {
        name: String,
        subtype: ColumnType,
        /// The name of its multirange type (PostgreSQL 14 and later).
        multirange: Option<String>,
    },
}

impl UserType {
    pub fn name(&self) -> &str {
        match self {
            UserType::Enum { name, .. }
            | UserType::Composite { name, .. }
            | UserType::Domain { name, .. }
            | UserType::Range { name, .. } => name,
        }
    }
}

fn column_type(
    kind: &str,
    format: String,
    elem: String,
    dims: i32,
    ext: Option<String>,
) -> ColumnType {
    let dims = usize::try_from(dims).unwrap_or(0);
    match kind {
        "user" => ColumnType::User { name: elem, dims },
        "extension" => ColumnType::Extension {
            name: elem,
            extension: ext.unwrap_or_default(),
            dims,
        },
        _ => ColumnType::Builtin(format),
    }
}

/// The user-defined types the given type OIDs depend on (themselves
/// included), dependencies first, so they can be created in order.
pub async fn describe_user_types(
    client: &Client,
    roots: &[u32],
) -> Result<Vec<UserType>, SourceError> {
    let mut ordered: Vec<(u32, UserType)> = Vec::new();
    let mut visiting: Vec<u32> = Vec::new();
    for oid in roots {
        visit_type(client, *oid, &mut ordered, &mut visiting).await?;
    }
    Ok(ordered.into_iter().map(|(_, t)| t).collect())
}

/// How the destination must name type `oid` (with `typmod`).
async fn type_ref(client: &Client, oid: u32, typmod: i32) -> Result<ColumnType, SourceError> {
    let b = client
        .query_one(
            include_str!("../../sql/source_type_ref.sql"),
            &[&oid, &typmod],
        )
        .await
        .map_err(SourceError::from_pg)?;
    Ok(column_type(
        &b.get::<_, String>(0),
        b.get(1),
        b.get(2),
        b.get(3),
        b.get(4),
    ))
}

fn visit_type<'a>(
    client: &'a Client,
    oid: u32,
    ordered: &'a mut Vec<(u32, UserType)>,
    visiting: &'a mut Vec<u32>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), SourceError>> + 'a>> {
    Box::pin(async move {
        if ordered.iter().any(|(o, _)| *o == oid) || visiting.contains(&oid) {
            return Ok(());
        }
        let row = client
            .query_opt(include_str!("../../sql/source_type.sql"), &[&oid])
            .await
            .map_err(SourceError::from_pg)?;
        let Some(row) = row else { return Ok(()) };
        let kind: String = row.get(0);
        if kind != "user" {
            return Ok(());
        }
        visiting.push(oid);
        let name: String = row.get(1);
        let typtype: i8 = row.get(2);
        let ty = match typtype as u8 {
            b'e' => {
                let labels = client
                    .query(
                        "SELECT enumlabel::text FROM pg_catalog.pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder",
                        &[&oid],
                    )
                    .await
                    .map_err(SourceError::from_pg)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                Some(UserType::Enum { name, labels })
            }
            b'c' => {
                let rows = client
                    .query(
                        include_str!("../../sql/source_composite_attrs.sql"),
                        &[&oid],
                    )
                    .await
                    .map_err(SourceError::from_pg)?;
                let mut attrs = Vec::new();
                for r in rows {
                    let dep: u32 = r.get(5);
                    visit_type(client, dep, ordered, visiting).await?;
                    attrs.push((
                        r.get::<_, String>(0),
                        column_type(
                            &r.get::<_, String>(1),
                            r.get(2),
                            r.get(3),
                            r.get(4),
                            r.get(6),
                        ),
                    ));
                }
                Some(UserType::Composite { name, attrs })
            }
            b'd' => {
                let base: u32 = row.get(3);
                visit_type(client, base, ordered, visiting).await?;
                let base_ty = type_ref(client, base, row.get(4)).await?;
                let checks = client
                    .query(
                        "SELECT pg_catalog.pg_get_constraintdef(oid) FROM pg_catalog.pg_constraint
                          WHERE contypid = $1 AND contype = 'c' ORDER BY conname",
                        &[&oid],
                    )
                    .await
                    .map_err(SourceError::from_pg)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                Some(UserType::Domain {
                    name,
                    base: base_ty,
                    not_null: row.get(5),
                    checks,
                })
            }
            b'r' => {
                let sub: u32 = row.get(6);
                visit_type(client, sub, ordered, visiting).await?;
                let subtype = type_ref(client, sub, -1).await?;
                Some(UserType::Range {
                    name,
                    subtype,
                    multirange: row.get(7),
                })
            }
            b'm' => {
                // A multirange exists through its range type.
                let range: u32 = row.get(8);
                if range != 0 {
                    visiting.retain(|o| *o != oid);
                    visit_type(client, range, ordered, visiting).await?;
                }
                None
            }
            _ => None,
        };
        visiting.retain(|o| *o != oid);
        if let Some(t) = ty {
            ordered.push((oid, t));
        }
        Ok(())
    })
}

/// The default expression of a source column (by table OID and name).
pub async fn column_default(
    client: &Client,
    relid: u32,
    column: &str,
) -> Result<Option<String>, SourceError> {
    let generated = if server_version() >= 120000 {
        " AND a.attgenerated = ''"
    } else {
        ""
    };
    let row = client
        .query_opt(
            &format!(
                "SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid)
                   FROM pg_catalog.pg_attrdef d
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                  WHERE a.attrelid = $1 AND a.attname = $2{generated}"
            ),
            &[&relid, &column],
        )
        .await
        .map_err(SourceError::from_pg)?;
    Ok(row.and_then(|r| r.get(0)))
}

/// The user-defined type OIDs a table's columns use.
pub fn user_type_roots(shape: &SourceTable) -> Vec<u32> {
    let mut out = Vec::new();
    for c in &shape.columns {
        if matches!(c.ty, ColumnType::User { .. }) && !out.contains(&c.type_oid) {
            out.push(c.type_oid);
        }
    }
    out
}
