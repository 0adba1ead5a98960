//! A connector's life in its worker: read the definition, prepare the source
//! (checks, publication, slot), decide per table what the mode asks (schema,
//! copy, nothing), copy under an exported snapshot, then stream pgoutput and
//! apply it, with retries and backoff for source problems and the
//! configured strategy for apply errors. Network calls go through `source`
//! on a current-thread runtime driven from this (the main) thread.

use crate::apply::applier::{self as apply, Applier, TableTarget};
use crate::apply::pgtxn;
use crate::apply::schema;
use crate::apply::sqlgen;
use crate::control::conninfo::{self, ConnInfo, Mode, TableRef};
use crate::control::gucs::{self, ErrorStrategy};
use crate::control::shmem::{Request, Stage, State};
use crate::control::worker::WorkerContext;
use crate::source::catalog::{self as source, SourceError, SourceTable};
use crate::source::decode::{self, Message};
use crate::source::replication::{self, Event};
use futures_util::StreamExt;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Why one attempt ended.
mod parallel;
mod reader;
mod review;
mod snapshot;
mod spool;
mod stream;

use snapshot::*;
use stream::*;

enum Stop {
    /// SIGTERM, postmaster death, or the connector / extension is gone.
    Shutdown,
    /// Reconnect at once (a new offset was set).
    Restart,
    /// The source failed (network, configuration): retry with backoff.
    Source(String),
    /// Our own catalog or configuration is wrong: record and stop.
    Fatal(String),
    /// A change could not be applied; `at` identifies it for the skip strategy.
    Apply { msg: String, at: Option<(u64, u64)> },
    /// The schema review of mode `schemasync` ended (resume): start over in
    /// mode `initial`.
    Reviewed,
}

impl From<SourceError> for Stop {
    fn from(e: SourceError) -> Stop {
        Stop::Source(e.to_string())
    }
}

pub fn run(ctx: &WorkerContext) {
    let mut backoff = Duration::from_secs(1);
    // Changes the skip strategy skips, (commit LSN, index in the
    // transaction), kept until the stream is past them (a later restart
    // replays them). Failing again at one of them means skipping did not
    // help, so it backs off like a retry.
    let mut skip: Vec<(u64, u64)> = Vec::new();
    let mut mode = ctx.mode;
    loop {
        if crate::control::worker::stopping() {
            break;
        }
        let started = Instant::now();
        let outcome = attempt(ctx, mode, &mut skip);
        match outcome {
            Stop::Shutdown => break,
            Stop::Restart => {
                backoff = Duration::from_millis(10);
            }
            Stop::Reviewed => {
                mode = Mode::Initial;
                backoff = Duration::from_millis(10);
            }
            Stop::Fatal(msg) => {
                ctx.slot
                    .set_err(&format!("connector \"{}\": {msg}", ctx.name));
                pgrx::log!("synchdb: connector \"{}\" stopped: {msg}", ctx.name);
                break;
            }
            Stop::Source(msg) => {
                ctx.slot
                    .set_err(&format!("connector \"{}\": {msg}", ctx.name));
                pgrx::log!(
                    "synchdb: connector \"{}\": {msg}; retrying in {}s",
                    ctx.name,
                    backoff.as_secs()
                );
            }
            Stop::Apply { msg, at } => {
                let text = format!("connector \"{}\": {msg}", ctx.name);
                ctx.slot.set_err(&text);
                match gucs::error_strategy() {
                    ErrorStrategy::Exit => {
                        pgrx::log!(
                            "synchdb: {text}; stopping (synchdb.error_handling_strategy = exit)"
                        );
                        break;
                    }
                    ErrorStrategy::Skip if at.is_some_and(|a| !skip.contains(&a)) => {
                        pgrx::log!("synchdb: {text}; the change will be skipped");
                        skip.extend(at);
                        backoff = Duration::from_millis(10);
                    }
                    ErrorStrategy::Skip | ErrorStrategy::Retry => {
                        pgrx::log!("synchdb: {text}; retrying in {}s", backoff.as_secs());
                    }
                }
            }
        }
        // Once set up, restarts keep the tables that are already built.
        if mode == Mode::Always {
            mode = Mode::Initial;
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        ctx.slot.set_state(State::Restarting);
        if !crate::control::worker::sleep(backoff) {
            break;
        }
        backoff = (backoff * 2)
            .min(gucs::max_retry_interval())
            .max(Duration::from_secs(1));
    }
}

/// Reads the connector definition in a transaction (edits since the last
/// start are honoured). `None`: the connector or the extension is gone.
fn load(name: &str) -> Result<Option<ConnInfo>, Stop> {
    let r = pgtxn::run(|| {
        let has_ext = Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'synchdb')",
        );
        if !matches!(has_ext, Ok(Some(true))) {
            return None;
        }
        crate::control::api::load_conninfo(name).map(|(_, info)| info)
    });
    match r {
        Ok(v) => Ok(v),
        Err(e) => Err(Stop::Fatal(e)),
    }
}

fn still_defined(name: &str) -> bool {
    // Called every few seconds between transactions: the statistics are
    // saved then too.
    crate::control::stats::maybe_persist();
    matches!(load(name), Ok(Some(_)))
}

/// Per-table state stored in `synchdb_table_state`.
#[derive(Debug, Clone)]
struct StoredTable {
    dst_schema: String,
    dst_table: String,
    sync_lsn: u64,
    src_relid: u32,
    /// Whether its copy is complete (else it is copied at the next start).
    ready: bool,
    /// A copy is owed whatever the mode (state 'copy'): the table joined
    /// the publication after rows were written to it.
    forced: bool,
    src_columns: Option<Vec<String>>,
}

fn load_table_states(name: &str) -> Result<HashMap<TableRef, StoredTable>, Stop> {
    pgtxn::run(|| {
        Spi::connect(|client| {
            let mut out = HashMap::new();
            let rows = client.select(
                "SELECT src_schema, src_table, dst_schema, dst_table, sync_lsn::text,
                        coalesce(src_relid, 0)::bigint, state = 'ready', src_columns,
                        state = 'copy'
                   FROM public.synchdb_table_state WHERE name = $1",
                None,
                &[name.into()],
            )?;
            for row in rows {
                let (Some(ss), Some(st), Some(ds), Some(dt), Some(l)) = (
                    row.get::<String>(1)?,
                    row.get::<String>(2)?,
                    row.get::<String>(3)?,
                    row.get::<String>(4)?,
                    row.get::<String>(5)?,
                ) else {
                    continue;
                };
                out.insert(
                    TableRef {
                        schema: ss,
                        table: st,
                    },
                    StoredTable {
                        dst_schema: ds,
                        dst_table: dt,
                        sync_lsn: crate::lsn::parse_lsn(&l).unwrap_or(0),
                        src_relid: row
                            .get::<i64>(6)?
                            .and_then(|v| u32::try_from(v).ok())
                            .unwrap_or(0),
                        ready: row.get::<bool>(7)?.unwrap_or(false),
                        src_columns: row.get::<Vec<String>>(8)?,
                        forced: row.get::<bool>(9)?.unwrap_or(false),
                    },
                );
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
    })
    .map_err(Stop::Fatal)?
    .map_err(|e| Stop::Fatal(e.to_string()))
}

/// Source tables renamed while the connector was stopped keep their OID:
/// their destination table and state row follow the new name instead of a
/// new copy being made. States are matched to the captured tables by OID;
/// a move waits until its new name is free (a table renamed away first), and
/// the state of a table gone from the source gives way to a table renamed
/// into its name. Returns whether anything was renamed.
fn follow_renames(
    ctx: &WorkerContext,
    rt: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
    tables: &[TableRef],
    stored: &HashMap<TableRef, StoredTable>,
) -> Result<bool, Stop> {
    if stored.values().all(|s| s.src_relid == 0) {
        return Ok(false);
    }
    let oids = block(rt, source::table_oids(client, tables))??;
    let name_of: HashMap<u32, TableRef> = oids.iter().map(|(k, o)| (*o, k.clone())).collect();
    let mut moves: Vec<(TableRef, TableRef, StoredTable)> = stored
        .iter()
        .filter(|(_, s)| s.src_relid != 0)
        .filter_map(|(k, s)| {
            name_of
                .get(&s.src_relid)
                .filter(|n| *n != k)
                .map(|n| (k.clone(), n.clone(), s.clone()))
        })
        .collect();
    if moves.is_empty() {
        return Ok(false);
    }
    let mut occupied: Vec<TableRef> = stored.keys().cloned().collect();
    let mut renamed = false;
    loop {
        let next = moves
            .iter()
            .position(|(_, new, _)| !occupied.contains(new))
            .or_else(|| {
                // The name is held by the state of a table that is gone.
                moves.iter().position(|(_, new, _)| {
                    stored
                        .get(new)
                        .is_some_and(|s| s.src_relid != 0 && !name_of.contains_key(&s.src_relid))
                })
            });
        let Some(i) = next else { break };
        let (old, new, s) = moves.remove(i);
        let dst_table = pgtxn::run(|| {
            if occupied.contains(&new) {
                schema::forget_table(&ctx.name, &new);
            }
            schema::follow_table_rename(&ctx.name, &old, &new, &s.dst_schema, &s.dst_table)
        })
        .map_err(|e| Stop::Apply {
            msg: format!("following the rename of {old} to {new}: {e}"),
            at: None,
        })?;
        pgrx::log!(
            "synchdb: connector \"{}\": source table {old} was renamed to {new} while stopped; {}.{} now receives it",
            ctx.name,
            s.dst_schema,
            dst_table
        );
        occupied.retain(|k| *k != old);
        occupied.push(new);
        renamed = true;
    }
    for (old, new, _) in &moves {
        pgrx::log!(
            "synchdb: connector \"{}\": source table {old} is now named {new}, which another captured table's state holds; left as it is",
            ctx.name
        );
    }
    Ok(renamed)
}

fn sleep_or_stop(d: Duration) -> bool {
    crate::control::worker::sleep(d)
}

/// Drives a future on the runtime, returning early (as a shutdown) when the
/// worker is asked to stop, so SIGTERM is honoured within a fraction of a
/// second even while the source is slow or silent.
fn block<F: std::future::Future>(rt: &tokio::runtime::Runtime, fut: F) -> Result<F::Output, Stop> {
    let mut fut = std::pin::pin!(fut);
    loop {
        let r =
            rt.block_on(async { tokio::time::timeout(Duration::from_millis(250), &mut fut).await });
        match r {
            Ok(v) => return Ok(v),
            Err(_) => {
                if crate::control::worker::stopping() {
                    return Err(Stop::Shutdown);
                }
            }
        }
    }
}

fn attempt(ctx: &WorkerContext, mode: Mode, skip: &mut Vec<(u64, u64)>) -> Stop {
    // Any ERROR or panic that escapes is recorded instead of ending the
    // worker with an empty `err`.
    let r = pgtxn::catch(|| attempt_inner(ctx, mode, skip));
    if pgtxn::in_transaction() {
        pgtxn::abort();
    }
    match r {
        Ok(Ok(())) => Stop::Shutdown,
        Ok(Err(s)) => s,
        Err(msg) => Stop::Fatal(format!("internal error: {msg}")),
    }
}

fn attempt_inner(ctx: &WorkerContext, mode: Mode, skip: &mut Vec<(u64, u64)>) -> Result<(), Stop> {
    let slot = ctx.slot;
    slot.set_state(State::Initializing);
    let info = match load(&ctx.name)? {
        Some(i) => i,
        None => return Ok(()),
    };
    info.validate().map_err(|e| Stop::Fatal(e.to_string()))?;
    let object =
        pgtxn::run(|| crate::control::worker::object_name(&ctx.name)).map_err(Stop::Fatal)?;
    let dst_schema = info.srcdb.clone();
    pgtxn::run(|| schema::require_trusted_schema(&dst_schema)).map_err(Stop::Fatal)?;
    // Object mappings (apply::mapping), read again at every start.
    pgtxn::run(|| crate::apply::mapping::load(&ctx.name, &info.srcdb))
        .map_err(Stop::Fatal)?
        .map_err(Stop::Fatal)?;
    crate::apply::usercontext::allow_other_owners(info.apply_as_table_owner);
    // Table lists are read (a `file:` list from its file) at every start.
    let selection = info.tables().map_err(|e| Stop::Fatal(e.to_string()))?;
    let src_schema = match &selection {
        Some(_) => String::new(),
        None => info
            .source_schema()
            .map_err(|e| Stop::Fatal(e.to_string()))?,
    };
    let snap_selection = info
        .snapshot_tables()
        .map_err(|e| Stop::Fatal(e.to_string()))?;

    let rt = &source::runtime()?;
    let client = block(rt, source::connect(&info))??;
    block(rt, source::preflight(&client, &info))??;
    if source::server_version() < 110000 {
        pgrx::warning!(
            "synchdb: connector \"{}\": the source runs PostgreSQL 10, which does not decode TRUNCATE: a TRUNCATE there is not replicated",
            ctx.name
        );
    }
    // Patterns select among the source's tables as they are now.
    let explicit: Option<Vec<TableRef>> = match &selection {
        Some(sel) => Some(block(rt, crate::source::selection::resolve(&client, sel))??),
        None => None,
    };
    let snap_filter: Option<Vec<TableRef>> = match &snap_selection {
        Some(sel) => Some(block(rt, crate::source::selection::resolve(&client, sel))??),
        None => None,
    };
    let tables = block(
        rt,
        source::list_tables(&client, &src_schema, explicit.as_deref()),
    )??;
    let dest_names = sqlgen::destination_names(&tables);

    // A schema review streams nothing yet: the publication and the slot are
    // made by the start that follows the resume (see `review`).
    let prepares_stream = mode.streams() && mode != Mode::SchemaSync;
    if prepares_stream {
        let publication = info.publication_name(&object);
        let spec = source::PublicationSpec {
            name: &publication,
            own: info.owns_publication(),
            schema: &src_schema,
            explicit: explicit.as_deref(),
        };
        let mut owe = |owed: &[TableRef]| owe_copies(&ctx.name, mode, &tables, owed, &dst_schema);
        block(
            rt,
            source::ensure_publication(&client, &spec, &tables, &mut owe),
        )??;
    }
    let mut fresh_slot_at: Option<u64> = None;
    if prepares_stream && block(rt, source::slot_position(&client, &object))??.is_none() {
        fresh_slot_at = Some(block(rt, source::create_slot(&client, &object))??);
    }

    let mut stored = load_table_states(&ctx.name)?;
    if follow_renames(ctx, rt, &client, &tables, &stored)? {
        stored = load_table_states(&ctx.name)?;
    }
    // A copy pending for a table that no longer exists on the source (or is
    // no longer captured) can never happen: its older changes are skipped.
    let mut vanished: Vec<TableRef> = Vec::new();
    for (t, s) in &stored {
        if s.ready || tables.contains(t) {
            continue;
        }
        // Found by OID: a table renamed to a captured name is not gone.
        if s.src_relid != 0 {
            if let Some(now) = block(rt, source::relation_name(&client, s.src_relid))?? {
                if tables.contains(&now) {
                    continue;
                }
            }
        }
        vanished.push(t.clone());
    }
    if !vanished.is_empty() {
        let now = block(rt, source::current_wal_lsn(&client))??;
        settle_vanished(&ctx.name, &vanished, now)?;
        stored = load_table_states(&ctx.name)?;
    }
    // Decide, per table, what this start does with it.
    let plan = Plan {
        mode,
        snap_filter: snap_filter.as_deref(),
        fresh_slot_at,
    };
    let copy: Vec<TableRef> = tables
        .iter()
        .filter(|t| plan.copies(t, stored.get(*t)))
        .cloned()
        .collect();
    let schema_only: Vec<TableRef> = tables
        .iter()
        .filter(|t| match mode {
            Mode::NoData => !stored.get(*t).is_some_and(|s| s.ready || s.forced),
            // Every table without a finished copy, for the review.
            Mode::SchemaSync => !stored.get(*t).is_some_and(|s| s.ready),
            _ => false,
        })
        .cloned()
        .collect();

    let copied_now = !copy.is_empty();
    if !schema_only.is_empty() {
        slot.set_stage(Stage::SchemaSync);
        slot.set_state(State::Syncing);
        let (shapes, user_types) = describe_tables(rt, &client, &schema_only)?;
        pgtxn::run(|| {
            schema::ensure_user_types(&user_types, &dst_schema);
            schema::add_enum_labels(&user_types, &dst_schema)
        })
        .map_err(|e| Stop::Apply {
            msg: format!("creating types in {dst_schema}: {e}"),
            at: None,
        })?;
        for src_shape in &shapes {
            let t = &src_shape.table;
            let dst = stored
                .get(t)
                .map(|s| s.dst_table.clone())
                .or_else(|| dest_names.get(t).cloned())
                .unwrap_or_else(|| t.table.clone());
            // Object mappings: the table's place, its columns' names and types.
            let maps = crate::apply::mapping::current();
            let (dst_schema, dst) = maps.destination(t, &dst_schema, &dst);
            let shape = &maps.map_shape(src_shape);
            pgtxn::run(|| {
                schema::ensure_user_types(&user_types, &dst_schema);
                if !schema::create_table(&dst_schema, &dst, shape, false) {
                    check_owner(&ctx.name, &dst_schema, &dst);
                }
                crate::apply::mapping::record_columns(
                    &ctx.name,
                    &info.srcdb,
                    t,
                    &crate::apply::mapping::att_rows(src_shape, shape),
                );
                let cols = stored_columns(shape);
                schema::record_table(
                    &ctx.name,
                    t,
                    &dst_schema,
                    &dst,
                    shape.oid,
                    0,
                    0,
                    Some(&cols),
                );
                if mode == Mode::SchemaSync {
                    // Built, not copied: the start after the review copies
                    // it (a copy owed whatever the mode stays owed).
                    if stored.get(t).is_some_and(|s| s.forced) {
                        schema::request_copy(&ctx.name, t, &dst_schema, &dst);
                    } else {
                        schema::mark_for_copy(&ctx.name, t, shape.oid);
                    }
                }
            })
            .map_err(|e| Stop::Apply {
                msg: format!("creating {dst_schema}.{dst}: {e}"),
                at: None,
            })?;
        }
    }
    if mode == Mode::SchemaSync {
        drop(client);
        return review::hold_for_review(ctx, rt);
    }
    let forced = copy.iter().any(|t| stored.get(t).is_some_and(|s| s.forced));
    if (plan.may_copy() || forced) && !copy.is_empty() {
        slot.set_stage(Stage::InitialSnapshot);
        slot.set_state(State::Syncing);
        snapshot_tables(
            ctx,
            rt,
            &info,
            &object,
            &copy,
            &plan,
            (&src_schema, explicit.as_deref()),
            &stored,
            &dst_schema,
        )?;
    }

    if !mode.streams() {
        slot.set_stage(Stage::InitialSnapshot);
        slot.set_state(State::Polling);
        slot.set_err("no error");
        drop(client);
        block(rt, async {
            tokio::time::sleep(Duration::from_millis(20)).await
        })?;
        loop {
            if !sleep_or_stop(Duration::from_secs(5)) || !still_defined(&ctx.name) {
                return Ok(());
            }
        }
    }

    // synchdb.cdc_start_delay_ms: a pause between the start (and its
    // snapshot) and streaming; a stop ends it at once.
    let delay = gucs::cdc_start_delay();
    if !delay.is_zero() {
        pgrx::log!(
            "synchdb: connector \"{}\": change data capture begins in {} ms (synchdb.cdc_start_delay_ms)",
            ctx.name,
            delay.as_millis()
        );
        // The latch wakes a wait early (signals, requests): wait out the rest.
        let until = Instant::now() + delay;
        while let Some(left) = until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            if !sleep_or_stop(left) {
                return Ok(());
            }
        }
    }
    // Stream: every table with a state, and the captured ones without.
    let stored = load_table_states(&ctx.name)?;
    let mut targets: HashMap<TableRef, TableTarget> = HashMap::new();
    for (t, s) in &stored {
        targets.insert(
            t.clone(),
            TableTarget {
                dst_schema: s.dst_schema.clone(),
                dst_table: s.dst_table.clone(),
                sync_lsn: s.sync_lsn,
                src_relid: s.src_relid,
                src_columns: s.src_columns.clone(),
            },
        );
    }
    let maps = crate::apply::mapping::current();
    for t in &tables {
        targets.entry(t.clone()).or_insert_with(|| {
            let (dst_schema, dst_table) =
                maps.destination(t, &dst_schema, dest_names.get(t).unwrap_or(&t.table));
            TableTarget {
                dst_schema,
                dst_table,
                sync_lsn: 0,
                src_relid: 0,
                src_columns: None,
            }
        });
    }
    stream(
        ctx,
        rt,
        client,
        &info,
        &object,
        targets,
        &dst_schema,
        mode,
        copied_now,
        skip,
    )
}

/// Captured tables that join the publication after rows were written to
/// them (a source before PostgreSQL 15 has no schema publication, one
/// before 13 publishes each partition) owe a copy, whatever the mode but
/// never: recorded (state 'copy') before they join.
fn owe_copies(
    connector: &str,
    mode: Mode,
    tables: &[TableRef],
    owed: &[TableRef],
    dst_schema: &str,
) -> Result<(), SourceError> {
    if owed.is_empty() {
        return Ok(());
    }
    if mode == Mode::Never {
        pgrx::warning!(
            "synchdb: connector \"{connector}\": {} joined the publication now; in mode never rows written before are not copied",
            owed.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
        );
        return Ok(());
    }
    let names = sqlgen::destination_names(tables);
    pgtxn::run(|| {
        for t in owed {
            let dst = names.get(t).cloned().unwrap_or_else(|| t.table.clone());
            let (dst_schema, dst) =
                crate::apply::mapping::current().destination(t, dst_schema, &dst);
            schema::request_copy(connector, t, &dst_schema, &dst);
        }
    })
    .map_err(|e| SourceError::Query(format!("recording the copies owed: {e}")))?;
    for t in owed {
        pgrx::log!("synchdb: connector \"{connector}\": {t} joined the publication; it is copied");
    }
    Ok(())
}

/// The shapes of the given source tables (those that no longer exist left
/// out) and the user-defined types they use, dependencies first.
fn describe_tables(
    rt: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
    tables: &[TableRef],
) -> Result<(Vec<SourceTable>, Vec<source::UserType>), Stop> {
    let mut shapes: Vec<SourceTable> = Vec::new();
    // Read-only queries, pipelined on the connection (sent without waiting
    // for each other's answers), up to DESCRIBE_AHEAD tables at once; the
    // answers come in order, so the first error is the one that happened
    // (those after it only say the transaction is aborted).
    const DESCRIBE_AHEAD: usize = 32;
    let described: Vec<_> = block(
        rt,
        futures_util::stream::iter(tables.iter().map(|t| source::describe_table(client, t)))
            .buffered(DESCRIBE_AHEAD)
            .collect(),
    )?;
    for r in described {
        match r {
            Ok(s) => shapes.push(s),
            Err(SourceError::MissingTable(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let mut roots: Vec<u32> = Vec::new();
    for shape in &shapes {
        for oid in source::user_type_roots(shape) {
            if !roots.contains(&oid) {
                roots.push(oid);
            }
        }
    }
    let user_types = block(rt, source::describe_user_types(client, &roots))??;
    Ok((shapes, user_types))
}

/// Marks pending copies of tables gone from the source as done at `lsn`.
fn settle_vanished(connector: &str, tables: &[TableRef], lsn: u64) -> Result<(), Stop> {
    pgtxn::run(|| {
        for t in tables {
            schema::mark_ready_at(connector, t, lsn);
            pgrx::log!(
                "synchdb: connector \"{connector}\": {t} is gone from the source; its pending copy is dropped and its changes before {} are skipped",
                crate::lsn::format_lsn(lsn)
            );
        }
    })
    .map_err(Stop::Fatal)
}

thread_local! {
    /// Consecutive restarts because a table was renamed while a snapshot
    /// started (bounded: a rename the next start cannot sort out is copied
    /// as it is rather than restarting for ever).
    static RENAME_RESTARTS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}
