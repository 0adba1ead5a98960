//! The switch-over from the source to the replica: `synchdb_switchover_rows`
//! (behind `synchdb_switchover_check`) says whether the replica has caught
//! up with the source, and `synchdb_sync_sequences` carries the source's
//! sequences over (created in the destination schema when missing, set to
//! the source's values, and used as the default of the columns that take
//! their values from them on the source). Both open a short-lived source
//! connection of their own; the password never appears in what they say.

use crate::apply::sqlgen::{self, qualified, quote_ident, quote_literal};
use crate::control::api::{load_conninfo, my_database, raise, unknown_connector};
use crate::control::conninfo::{ConnInfo, TableRef};
use crate::source::catalog::{self as source, describe_pg_error, SourceError};
use pgrx::prelude::*;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio_postgres::Client;

/// Size of a WAL page header (`SizeOfXLogShortPHD`), and of the first page
/// of a segment (`SizeOfXLogLongPHD`), on 64-bit servers.
const SHORT_PAGE_HEADER_BYTES: u64 = 24;
const LONG_PAGE_HEADER_BYTES: u64 = 40;

/// The source's WAL insert position as an end-of-record position, which is
/// what the stream reports: `pg_current_wal_insert_lsn()` points past the
/// page header when the last record ended exactly at a page boundary, where
/// the end of that record is the boundary itself.
pub fn insert_lsn_as_end(lsn: u64, block_bytes: u64, segment_bytes: u64) -> u64 {
    if segment_bytes > 0 && lsn % segment_bytes == LONG_PAGE_HEADER_BYTES {
        lsn - LONG_PAGE_HEADER_BYTES
    } else if block_bytes > 0
        && lsn % block_bytes == SHORT_PAGE_HEADER_BYTES
        && (segment_bytes == 0 || lsn % segment_bytes >= block_bytes)
    {
        lsn - SHORT_PAGE_HEADER_BYTES
    } else {
        lsn
    }
}

/// Whether everything up to `source_lsn` is applied.
pub fn caught_up(applied: u64, source_lsn: u64, tables_not_ready: i64) -> bool {
    applied > 0 && applied >= source_lsn && tables_not_ready == 0
}

/// Drives a source future from a backend, answering query cancels and
/// terminations between polls.
fn wait<F: std::future::Future>(rt: &tokio::runtime::Runtime, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    loop {
        let r =
            rt.block_on(async { tokio::time::timeout(Duration::from_millis(100), &mut fut).await });
        match r {
            Ok(v) => return v,
            Err(_) => {
                pgrx::check_for_interrupts!();
            }
        }
    }
}

fn source_failed(name: &str, e: SourceError) -> ! {
    let code = match e {
        SourceError::Connect { .. } => PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
        _ => PgSqlErrorCode::ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
    };
    raise(
        code,
        format!("connector \"{name}\": {e}"),
        None,
        Some("Check that the source is reachable with the connector's settings (synchdb_conninfo_view)."),
    )
}

fn spi_failed(e: pgrx::spi::Error) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("synchdb catalog access failed: {e}"),
        None,
        None,
    )
}

/// The source's current WAL position, as an end-of-record position (a
/// standby's last replayed position).
async fn source_wal_end(client: &Client) -> Result<u64, SourceError> {
    let row = client
        .query_one(
            "SELECT CASE WHEN pg_catalog.pg_is_in_recovery()
                         THEN pg_catalog.pg_last_wal_replay_lsn()
                         ELSE pg_catalog.pg_current_wal_insert_lsn() END::text,
                    pg_catalog.pg_is_in_recovery(),
                    pg_catalog.current_setting('wal_block_size')::bigint,
                    pg_catalog.pg_size_bytes(pg_catalog.current_setting('wal_segment_size'))",
            &[],
        )
        .await
        .map_err(SourceError::from_pg)?;
    let text: Option<String> = row.try_get(0).map_err(SourceError::from_pg)?;
    let text = text.unwrap_or_default();
    let lsn = crate::lsn::parse_lsn(&text)
        .map_err(|e| SourceError::Query(format!("bad WAL position {text}: {e}")))?;
    let standby: bool = row.try_get(1).map_err(SourceError::from_pg)?;
    if standby {
        return Ok(lsn);
    }
    let block: i64 = row.try_get(2).map_err(SourceError::from_pg)?;
    let segment: i64 = row.try_get(3).map_err(SourceError::from_pg)?;
    Ok(insert_lsn_as_end(
        lsn,
        u64::try_from(block).unwrap_or(0),
        u64::try_from(segment).unwrap_or(0),
    ))
}

/// The rows behind `synchdb_switchover_check(name)`: where the source's WAL
/// is now, how far the connector has processed it, and whether that covers
/// everything (see the README, "Switch-over").
#[pg_extern]
fn synchdb_switchover_rows(
    name: &str,
) -> TableIterator<
    'static,
    (
        name!(source_lsn, String),
        name!(applied_lsn, String),
        name!(lag_bytes, i64),
        name!(tables_not_ready, i32),
        name!(state, String),
        name!(caught_up, bool),
    ),
> {
    let Some((_, info)) = load_conninfo(name) else {
        unknown_connector(name)
    };
    // The source first: what is applied can only grow while it is read.
    let source_lsn = match source::runtime().and_then(|rt| {
        wait(&rt, async {
            let client = source::connect(&info).await?;
            source_wal_end(&client).await
        })
    }) {
        Ok(l) => l,
        Err(e) => source_failed(name, e),
    };
    let dboid = my_database();
    // The stream's position: the end of the last applied transaction, or
    // of the WAL the source reported between transactions once everything
    // before it was applied (kept by the worker in shared memory)...
    let streamed = crate::control::shmem::stats(dboid)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s.applied_lsn)
        .unwrap_or(0);
    // ... and the replication origin, committed with every applied
    // transaction (what survives a restart of the destination).
    let origin = crate::control::worker::object_name(name);
    let committed = match Spi::get_one_with_args::<String>(
        "SELECT remote_lsn::text FROM pg_catalog.pg_replication_origin_status WHERE external_id = $1",
        &[origin.as_str().into()],
    ) {
        Ok(Some(s)) => crate::lsn::parse_lsn(&s).unwrap_or(0),
        Ok(None) | Err(pgrx::spi::Error::InvalidPosition) => 0,
        Err(e) => spi_failed(e),
    };
    let applied = streamed.max(committed);
    let not_ready = match Spi::get_one_with_args::<i64>(
        "SELECT count(*) FROM public.synchdb_table_state WHERE name = $1 AND state <> 'ready'",
        &[name.into()],
    ) {
        Ok(n) => n.unwrap_or(0),
        Err(e) => spi_failed(e),
    };
    let state = match crate::control::shmem::get(dboid, name) {
        Some(s) if s.pid >= 0 => s.state.as_str().to_string(),
        _ => "stopped".to_string(),
    };
    let lag = i64::try_from(source_lsn.saturating_sub(applied)).unwrap_or(i64::MAX);
    TableIterator::once((
        crate::lsn::format_lsn(source_lsn),
        crate::lsn::format_lsn(applied),
        lag,
        i32::try_from(not_ready).unwrap_or(i32::MAX),
        state,
        caught_up(applied, source_lsn, not_ready),
    ))
}

/// A source sequence a captured table's column takes its values from.
#[derive(Debug, Clone)]
struct SourceSequence {
    column: String,
    seq: TableRef,
    /// Owned by the column (serial: `a`, identity: `i`) rather than only
    /// named in its default.
    owned: bool,
    type_name: &'static str,
    start: i64,
    increment: i64,
    min: i64,
    max: i64,
    cache: i64,
    cycle: bool,
}

/// A source sequence's state.
#[derive(Debug, Clone, Copy)]
struct SequenceValue {
    last_value: i64,
    is_called: bool,
}

/// The sequence types the destination accepts; anything else (which
/// PostgreSQL does not have) is written as bigint.
fn sequence_type(format_type: &str) -> &'static str {
    match format_type {
        "smallint" => "smallint",
        "integer" => "integer",
        _ => "bigint",
    }
}

/// `CREATE SEQUENCE` with the source's parameters.
fn create_sequence_sql(s: &SourceSequence, dst_schema: &str, dst_name: &str) -> String {
    format!(
        "CREATE SEQUENCE {} AS {} INCREMENT BY {} MINVALUE {} MAXVALUE {} START WITH {} CACHE {} {}",
        qualified(dst_schema, dst_name),
        s.type_name,
        s.increment,
        s.min,
        s.max,
        s.start,
        s.cache.max(1),
        if s.cycle { "CYCLE" } else { "NO CYCLE" }
    )
}

enum SyncError {
    Source(SourceError),
    Denied { seq: TableRef, msg: String },
}

/// The sequences the columns of source table `t` use: owned by a column
/// (`serial`, identity) or named in a column default (`nextval('s')`), with
/// their parameters (`pg_sequence`, PostgreSQL 10 and later).
async fn table_sequences(client: &Client, t: &TableRef) -> Result<Vec<SourceSequence>, SyncError> {
    let rows = client
        .query(
            include_str!("../../sql/source_sequences.sql"),
            &[&t.schema, &t.table],
        )
        .await
        .map_err(|e| SyncError::Source(SourceError::from_pg(e)))?;
    let mut out: Vec<SourceSequence> = Vec::new();
    let get_err = |e| SyncError::Source(SourceError::from_pg(e));
    for r in rows {
        let column: String = r.try_get(0).map_err(get_err)?;
        let seq = TableRef {
            schema: r.try_get(1).map_err(get_err)?,
            table: r.try_get(2).map_err(get_err)?,
        };
        // A serial column both owns its sequence and names it in its
        // default: the first row (owned) is kept.
        if out.iter().any(|s| s.column == column && s.seq == seq) {
            continue;
        }
        let ty: String = r.try_get(4).map_err(get_err)?;
        out.push(SourceSequence {
            column,
            seq,
            owned: r.try_get(3).map_err(get_err)?,
            type_name: sequence_type(&ty),
            start: r.try_get(5).map_err(get_err)?,
            increment: r.try_get(6).map_err(get_err)?,
            min: r.try_get(7).map_err(get_err)?,
            max: r.try_get(8).map_err(get_err)?,
            cache: r.try_get(9).map_err(get_err)?,
            cycle: r.try_get(10).map_err(get_err)?,
        });
    }
    Ok(out)
}

async fn sequence_value(client: &Client, seq: &TableRef) -> Result<SequenceValue, SyncError> {
    let sql = format!(
        "SELECT last_value, is_called FROM {}",
        qualified(&seq.schema, &seq.table)
    );
    match client.query_one(sql.as_str(), &[]).await {
        Ok(r) => Ok(SequenceValue {
            last_value: r
                .try_get(0)
                .map_err(|e| SyncError::Source(SourceError::from_pg(e)))?,
            is_called: r
                .try_get(1)
                .map_err(|e| SyncError::Source(SourceError::from_pg(e)))?,
        }),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            Err(SyncError::Denied {
                seq: seq.clone(),
                msg: describe_pg_error(&e),
            })
        }
        Err(e) => Err(SyncError::Source(SourceError::from_pg(e))),
    }
}

/// Reads, on the source, the sequences of the captured tables and their
/// values: (table, its sequences) in the order given, and each sequence's
/// value.
#[allow(clippy::type_complexity)]
fn read_source_sequences(
    info: &ConnInfo,
    tables: &[TableRef],
) -> Result<
    (
        Vec<(TableRef, Vec<SourceSequence>)>,
        HashMap<TableRef, SequenceValue>,
    ),
    SyncError,
> {
    let rt = source::runtime().map_err(SyncError::Source)?;
    wait(&rt, async {
        let client = source::connect(info).await.map_err(SyncError::Source)?;
        let mut per_table = Vec::new();
        let mut values: HashMap<TableRef, SequenceValue> = HashMap::new();
        for t in tables {
            let seqs = table_sequences(&client, t).await?;
            for s in &seqs {
                if !values.contains_key(&s.seq) {
                    let v = sequence_value(&client, &s.seq).await?;
                    values.insert(s.seq.clone(), v);
                }
            }
            per_table.push((t.clone(), seqs));
        }
        Ok((per_table, values))
    })
}

/// A destination column as the sequence sync needs it.
struct DestColumn {
    has_default: bool,
    identity: bool,
}

fn dest_column(table: &str, column: &str) -> Option<DestColumn> {
    match Spi::get_two_with_args::<bool, bool>(
        "SELECT a.atthasdef, a.attidentity <> ''
           FROM pg_catalog.pg_attribute a
          WHERE a.attrelid = $1::regclass AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
        &[table.into(), column.into()],
    ) {
        Ok((Some(has_default), Some(identity))) => Some(DestColumn {
            has_default,
            identity,
        }),
        Ok(_) | Err(pgrx::spi::Error::InvalidPosition) => None,
        Err(e) => spi_failed(e),
    }
}

fn run(sql: &str) {
    if let Err(e) = Spi::run(sql) {
        spi_failed(e);
    }
}

/// The relkind of `schema.name` in the destination, if it exists.
fn relkind(schema: &str, name: &str) -> Option<String> {
    match Spi::get_one_with_args::<String>(
        "SELECT c.relkind::text FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relname = $2",
        &[schema.into(), name.into()],
    ) {
        Ok(k) => k,
        Err(pgrx::spi::Error::InvalidPosition) => None,
        Err(e) => spi_failed(e),
    }
}

/// Sets the destination's sequences to the source's values, for every
/// column of a captured table that takes its values from a sequence on the
/// source. Missing sequences are created in the table's destination schema
/// (same name, same parameters; `<schema>_<name>` when sequences of two
/// source schemas share a name) and become the default of columns that have
/// none; an identity column made in the destination keeps its own sequence,
/// which is set instead. Meant for the switch-over, once writes on the
/// source have stopped; running it again is harmless.
#[pg_extern]
fn synchdb_sync_sequences(
    name: &str,
) -> TableIterator<
    'static,
    (
        name!(table_name, String),
        name!(column_name, String),
        name!(sequence_name, String),
        name!(last_value, i64),
        name!(is_called, bool),
    ),
> {
    let Some((_, info)) = load_conninfo(name) else {
        unknown_connector(name)
    };
    // Captured tables with a destination table: (source, destination schema, table).
    let states: Vec<(TableRef, String, String)> = match Spi::connect(|c| {
        let rows = c.select(
            "SELECT src_schema, src_table, dst_schema, dst_table FROM public.synchdb_table_state
              WHERE name = $1 ORDER BY dst_schema, dst_table",
            None,
            &[name.into()],
        )?;
        let mut out = Vec::new();
        for r in rows {
            if let (Some(ss), Some(st), Some(ds), Some(dt)) = (
                r.get::<String>(1)?,
                r.get::<String>(2)?,
                r.get::<String>(3)?,
                r.get::<String>(4)?,
            ) {
                out.push((
                    TableRef {
                        schema: ss,
                        table: st,
                    },
                    ds,
                    dt,
                ));
            }
        }
        Ok::<_, pgrx::spi::Error>(out)
    }) {
        Ok(v) => v,
        Err(e) => spi_failed(e),
    };
    let sources: Vec<TableRef> = states.iter().map(|(t, _, _)| t.clone()).collect();
    let (per_table, values) = match read_source_sequences(&info, &sources) {
        Ok(v) => v,
        Err(SyncError::Source(e)) => source_failed(name, e),
        Err(SyncError::Denied { seq, msg }) => raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "connector \"{name}\": cannot read sequence {} on the source",
                qualified(&seq.schema, &seq.table)
            ),
            Some(format!("The source said: {msg}.")),
            Some(&format!(
                "On the source, run GRANT SELECT ON SEQUENCE {} TO {};",
                qualified(&seq.schema, &seq.table),
                quote_ident(&info.user)
            )),
        ),
    };
    // Destination names, as for tables: the source name, schema-prefixed
    // when sequences of two schemas share it.
    let mut all: Vec<TableRef> = Vec::new();
    for (_, seqs) in &per_table {
        for s in seqs {
            if !all.contains(&s.seq) {
                all.push(s.seq.clone());
            }
        }
    }
    let dst_names = sqlgen::destination_names(&all);
    let dst_of: HashMap<&TableRef, (&str, &str)> = states
        .iter()
        .map(|(t, ds, dt)| (t, (ds.as_str(), dt.as_str())))
        .collect();
    let mut done: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for (t, seqs) in &per_table {
        let Some(&(dst_schema, dst_table)) = dst_of.get(t) else {
            continue;
        };
        let table = qualified(dst_schema, dst_table);
        if crate::apply::schema::relid(dst_schema, dst_table).is_none() {
            if !seqs.is_empty() {
                pgrx::warning!(
                    "destination table {table} of source table {t} does not exist; its sequences are not set"
                );
            }
            continue;
        }
        for s in seqs {
            let Some(v) = values.get(&s.seq).copied() else {
                continue;
            };
            let Some(col) = dest_column(&table, &s.column) else {
                pgrx::warning!(
                    "column {} of {table} does not exist; sequence {} is not set for it",
                    quote_ident(&s.column),
                    qualified(&s.seq.schema, &s.seq.table)
                );
                continue;
            };
            let target = if col.identity {
                // An identity column the DBA made: its own sequence.
                match Spi::get_one_with_args::<String>(
                    "SELECT pg_catalog.pg_get_serial_sequence($1, $2)",
                    &[table.as_str().into(), s.column.as_str().into()],
                ) {
                    Ok(Some(q)) => q,
                    Ok(None) | Err(pgrx::spi::Error::InvalidPosition) => continue,
                    Err(e) => spi_failed(e),
                }
            } else {
                let dst_name = dst_names
                    .get(&s.seq)
                    .cloned()
                    .unwrap_or_else(|| s.seq.table.clone());
                let seq_sql = qualified(dst_schema, &dst_name);
                match relkind(dst_schema, &dst_name).as_deref() {
                    Some("S") => {}
                    Some(_) => {
                        pgrx::warning!(
                            "{seq_sql} exists and is not a sequence; source sequence {} is not copied",
                            qualified(&s.seq.schema, &s.seq.table)
                        );
                        continue;
                    }
                    None => {
                        run(&create_sequence_sql(s, dst_schema, &dst_name));
                        if s.owned && same_owner(&table, &seq_sql) {
                            run(&format!(
                                "ALTER SEQUENCE {seq_sql} OWNED BY {table}.{}",
                                quote_ident(&s.column)
                            ));
                        }
                    }
                }
                if !col.has_default {
                    run(&format!(
                        "ALTER TABLE {table} ALTER COLUMN {} SET DEFAULT pg_catalog.nextval({}::pg_catalog.regclass)",
                        quote_ident(&s.column),
                        quote_literal(&seq_sql)
                    ));
                }
                seq_sql
            };
            if done.insert(target.clone()) {
                if let Err(e) = Spi::run_with_args(
                    "SELECT pg_catalog.setval($1::pg_catalog.regclass, $2, $3)",
                    &[
                        target.as_str().into(),
                        v.last_value.into(),
                        v.is_called.into(),
                    ],
                ) {
                    raise(
                        PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
                        format!(
                            "cannot set sequence {target} to {} (the value of {} on the source): {e}",
                            v.last_value,
                            qualified(&s.seq.schema, &s.seq.table)
                        ),
                        None,
                        Some("Make the destination sequence's range match the source's (ALTER SEQUENCE)."),
                    );
                }
            }
            out.push((
                display_name(dst_schema, dst_table),
                s.column.clone(),
                display_sequence(&target),
                v.last_value,
                v.is_called,
            ));
        }
    }
    TableIterator::new(out)
}

/// `schema.name`, quoted where SQL needs it (as `format('%I.%I')` does).
fn display_name(schema: &str, name: &str) -> String {
    match Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.format('%I.%I', $1, $2)",
        &[schema.into(), name.into()],
    ) {
        Ok(Some(n)) => n,
        _ => qualified(schema, name),
    }
}

/// A destination sequence's name as `display_name` writes it.
fn display_sequence(seq: &str) -> String {
    match Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = $1::pg_catalog.regclass",
        &[seq.into()],
    ) {
        Ok(Some(n)) => n,
        _ => seq.to_string(),
    }
}

/// Whether a table and a sequence have the same owner (OWNED BY needs it).
fn same_owner(table: &str, seq: &str) -> bool {
    matches!(
        Spi::get_one_with_args::<bool>(
            "SELECT (SELECT relowner FROM pg_catalog.pg_class WHERE oid = $1::regclass)
                  = (SELECT relowner FROM pg_catalog.pg_class WHERE oid = $2::regclass)",
            &[table.into(), seq.into()],
        ),
        Ok(Some(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_position_at_a_page_start_is_the_boundary() {
        let block = 8192;
        let seg = 16 * 1024 * 1024;
        // Mid-page: unchanged.
        assert_eq!(insert_lsn_as_end(0x0300_1234, block, seg), 0x0300_1234);
        // Just past a page header: the page boundary.
        assert_eq!(insert_lsn_as_end(0x0300_2018, block, seg), 0x0300_2000);
        // Just past a segment's long header: the segment boundary.
        assert_eq!(insert_lsn_as_end(0x0400_0028, block, seg), 0x0400_0000);
        // 24 bytes into a segment's first page is inside its long header:
        // never an insert position, and not taken for a short header.
        assert_eq!(insert_lsn_as_end(0x0400_0018, block, seg), 0x0400_0018);
        // Unknown sizes: unchanged.
        assert_eq!(insert_lsn_as_end(0x0300_2018, 0, 0), 0x0300_2018);
    }

    #[test]
    fn caught_up_needs_every_table_ready_and_a_position() {
        assert!(caught_up(100, 100, 0));
        assert!(caught_up(120, 100, 0));
        assert!(!caught_up(99, 100, 0));
        assert!(!caught_up(100, 100, 1));
        assert!(!caught_up(0, 0, 0));
    }

    #[test]
    fn sequence_ddl() {
        let s = SourceSequence {
            column: "id".into(),
            seq: TableRef {
                schema: "public".into(),
                table: "t_id_seq".into(),
            },
            owned: true,
            type_name: sequence_type("integer"),
            start: 1,
            increment: -2,
            min: -2147483648,
            max: 2147483647,
            cache: 1,
            cycle: false,
        };
        assert_eq!(
            create_sequence_sql(&s, "postgres", "t_id_seq"),
            r#"CREATE SEQUENCE "postgres"."t_id_seq" AS integer INCREMENT BY -2 MINVALUE -2147483648 MAXVALUE 2147483647 START WITH 1 CACHE 1 NO CYCLE"#
        );
        assert_eq!(sequence_type("bigint"), "bigint");
        assert_eq!(sequence_type("smallint"), "smallint");
        assert_eq!(sequence_type("text; DROP TABLE x"), "bigint");
    }
}
