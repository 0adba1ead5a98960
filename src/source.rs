//! The source side: normal connections to the source database (preflight
//! checks, catalog queries, publication and slot management, snapshot COPY)
//! and the replication session. Runs on a tokio runtime owned by the worker
//! and never calls into Postgres; everything here is plain Rust.

use crate::conninfo::{ConnInfo, TableRef};
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

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
    #[error("source has no free replication slot (max_replication_slots = {0})")]
    NoFreeSlot(String),
    #[error("captured table {0} does not exist on the source")]
    MissingTable(String),
    #[error("source query failed: {0}")]
    Query(String),
    #[error("replication stream: {0}")]
    Stream(String),
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
/// from its main thread, so no other thread ever exists.
pub fn runtime() -> Result<tokio::runtime::Runtime, SourceError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SourceError::Query(format!("cannot create I/O runtime: {e}")))
}

fn config(info: &ConnInfo) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(&info.hostname)
        .port(u16::try_from(info.port).unwrap_or(5432))
        .user(&info.user)
        .password(info.pwd.as_bytes())
        .dbname(&info.srcdb)
        .application_name("synchdb")
        .connect_timeout(Duration::from_secs(10))
        .keepalives(true);
    c
}

/// Opens a normal connection; its driver task runs on the current runtime.
pub async fn connect(info: &ConnInfo) -> Result<Client, SourceError> {
    let (client, conn) = config(info)
        .connect(NoTls)
        .await
        .map_err(|e| SourceError::Connect {
            host: info.hostname.clone(),
            port: info.port,
            db: info.srcdb.clone(),
            msg: describe_pg_error(&e),
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
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

/// One column of a source table, as the destination must recreate it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceColumn {
    pub name: String,
    pub type_sql: String,
    pub not_null: bool,
    pub generated: bool,
}

/// A captured source table with its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTable {
    pub table: TableRef,
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

/// Reads a table's columns (names, exact types, NOT NULL) and primary key.
pub async fn describe_table(client: &Client, t: &TableRef) -> Result<SourceTable, SourceError> {
    let cols = client
        .query(
            "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
                    a.attgenerated <> ''
               FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = (SELECT c.oid FROM pg_catalog.pg_class c
                                    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                                   WHERE n.nspname = $1 AND c.relname = $2)
                AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&t.schema, &t.table],
        )
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
        columns: cols
            .iter()
            .map(|r| SourceColumn {
                name: r.get(0),
                type_sql: r.get(1),
                not_null: r.get(2),
                generated: r.get(3),
            })
            .collect(),
        primary_key: pk.iter().map(|r| r.get(0)).collect(),
    })
}

fn quote(ident: &str) -> String {
    crate::sqlgen::quote_ident(ident)
}

/// Creates the connector's publication, or makes an existing one cover the
/// captured tables again (the table list may have been edited).
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    schema: &str,
    explicit: Option<&[TableRef]>,
    version: i32,
) -> Result<(), SourceError> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1)",
            &[&publication],
        )
        .await
        .map_err(SourceError::from_pg)?
        .get(0);
    let target = match explicit {
        Some(list) => {
            let names: Vec<String> = list
                .iter()
                .map(|t| format!("{}.{}", quote(&t.schema), quote(&t.table)))
                .collect();
            format!("TABLE {}", names.join(", "))
        }
        None if version >= 150000 => format!("TABLES IN SCHEMA {}", quote(schema)),
        None => {
            // Before PostgreSQL 15 there is no schema publication: list the
            // tables that exist now.
            let tables = list_tables(client, schema, None).await?;
            if tables.is_empty() {
                return Err(SourceError::Query(format!(
                    "schema \"{schema}\" has no tables"
                )));
            }
            let names: Vec<String> = tables
                .iter()
                .map(|t| format!("{}.{}", quote(&t.schema), quote(&t.table)))
                .collect();
            format!("TABLE {}", names.join(", "))
        }
    };
    let sql = if exists {
        format!("ALTER PUBLICATION {} SET {target}", quote(publication))
    } else {
        format!(
            "CREATE PUBLICATION {} FOR {target} WITH (publish_via_partition_root = true)",
            quote(publication)
        )
    };
    client
        .batch_execute(&sql)
        .await
        .map_err(SourceError::from_pg)?;
    Ok(())
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
        client
            .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote(object)))
            .await
            .map_err(SourceError::from_pg)?;
        Ok(())
    })
}
