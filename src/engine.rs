//! A connector's life in its worker: read the definition, prepare the source
//! (checks, publication, slot), decide per table what the mode asks (schema,
//! copy, nothing), copy under an exported snapshot, then stream pgoutput and
//! apply it, with retries and backoff for source problems and the
//! configured strategy for apply errors. Network calls go through `source`
//! on a current-thread runtime driven from this (the main) thread.

use crate::apply::{self, Applier, TableTarget};
use crate::conninfo::{self, ConnInfo, Mode, TableRef};
use crate::decode::{self, Message};
use crate::gucs::{self, ErrorStrategy};
use crate::pgtxn;
use crate::replication::{self, Event};
use crate::schema;
use crate::shmem::{Request, Stage, State};
use crate::source::{self, SourceError, SourceTable};
use crate::sqlgen;
use crate::worker::WorkerContext;
use futures_util::StreamExt;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Why one attempt ended.
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
        if crate::worker::stopping() {
            break;
        }
        let started = Instant::now();
        let outcome = attempt(ctx, mode, &mut skip);
        match outcome {
            Stop::Shutdown => break,
            Stop::Restart => {
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
        if !crate::worker::sleep(backoff) {
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
        crate::api::load_conninfo(name).map(|(_, info)| info)
    });
    match r {
        Ok(v) => Ok(v),
        Err(e) => Err(Stop::Fatal(e)),
    }
}

fn still_defined(name: &str) -> bool {
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
    crate::worker::sleep(d)
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
                if crate::worker::stopping() {
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
    let object = pgtxn::run(|| crate::worker::object_name(&ctx.name)).map_err(Stop::Fatal)?;
    let dst_schema = info.srcdb.clone();
    pgtxn::run(|| schema::require_trusted_schema(&dst_schema)).map_err(Stop::Fatal)?;
    crate::usercontext::allow_other_owners(info.apply_as_table_owner);
    let explicit = info.tables().map_err(|e| Stop::Fatal(e.to_string()))?;
    let src_schema = match &explicit {
        Some(_) => String::new(),
        None => info
            .source_schema()
            .map_err(|e| Stop::Fatal(e.to_string()))?,
    };
    let snap_filter = info
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
    let tables = block(
        rt,
        source::list_tables(&client, &src_schema, explicit.as_deref()),
    )??;
    let dest_names = sqlgen::destination_names(&tables);

    if mode.streams() {
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
    if mode.streams() && block(rt, source::slot_position(&client, &object))??.is_none() {
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
        .filter(|t| mode == Mode::NoData && !stored.get(*t).is_some_and(|s| s.ready || s.forced))
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
        for shape in &shapes {
            let t = &shape.table;
            let dst = stored
                .get(t)
                .map(|s| s.dst_table.clone())
                .or_else(|| dest_names.get(t).cloned())
                .unwrap_or_else(|| t.table.clone());
            pgtxn::run(|| {
                schema::ensure_user_types(&user_types, &dst_schema);
                if !schema::create_table(&dst_schema, &dst, shape, false) {
                    check_owner(&ctx.name, &dst_schema, &dst);
                }
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
            })
            .map_err(|e| Stop::Apply {
                msg: format!("creating {dst_schema}.{dst}: {e}"),
                at: None,
            })?;
        }
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
    for t in &tables {
        targets.entry(t.clone()).or_insert_with(|| TableTarget {
            dst_schema: dst_schema.clone(),
            dst_table: dest_names
                .get(t)
                .cloned()
                .unwrap_or_else(|| t.table.clone()),
            sync_lsn: 0,
            src_relid: 0,
            src_columns: None,
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

/// Keeps the publication in step with the captured tables while streaming
/// (over a connection of its own: the applier holds the catalog's).
struct PublicationWatch {
    client: Option<tokio_postgres::Client>,
    last: Instant,
}

impl PublicationWatch {
    /// True when a table joined the publication and owes a copy (the
    /// connector starts again to make it).
    fn check(
        &mut self,
        ctx: &WorkerContext,
        rt: &tokio::runtime::Runtime,
        info: &ConnInfo,
        object: &str,
        mode: Mode,
    ) -> Result<bool, Stop> {
        let explicit = info.tables().map_err(|e| Stop::Fatal(e.to_string()))?;
        let schema = match &explicit {
            Some(_) => String::new(),
            None => info
                .source_schema()
                .map_err(|e| Stop::Fatal(e.to_string()))?,
        };
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(block(rt, source::connect(info))??);
        }
        let Some(client) = self.client.as_ref() else {
            return Ok(false);
        };
        let tables = match block(
            rt,
            source::list_tables(client, &schema, explicit.as_deref()),
        )? {
            Ok(t) => t,
            // A captured table dropped: the stream tells what happened to it.
            Err(SourceError::MissingTable(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let publication = info.publication_name(object);
        let spec = source::PublicationSpec {
            name: &publication,
            own: info.owns_publication(),
            schema: &schema,
            explicit: explicit.as_deref(),
        };
        let dst_schema = info.srcdb.clone();
        let mut owe = |owed: &[TableRef]| owe_copies(&ctx.name, mode, &tables, owed, &dst_schema);
        match block(
            rt,
            source::ensure_publication(client, &spec, &tables, &mut owe),
        )? {
            Ok(added) => Ok(!added.is_empty() && mode != Mode::Never),
            Err(SourceError::NeedsAdmin {
                what,
                sql,
                tables: missing,
            }) => {
                // A table that appeared while streaming and is not in an
                // admin's publication: once an admin adds it, its rows
                // written before come from a copy.
                owe_copies(&ctx.name, mode, &tables, &missing, &dst_schema)?;
                Err(SourceError::NeedsAdmin {
                    what,
                    sql,
                    tables: missing,
                }
                .into())
            }
            Err(e) => Err(e.into()),
        }
    }
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
            schema::request_copy(connector, t, dst_schema, &dst);
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
    for t in tables {
        match block(rt, source::describe_table(client, t))? {
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

/// What a start does with each table.
struct Plan<'a> {
    mode: Mode,
    snap_filter: Option<&'a [TableRef]>,
    fresh_slot_at: Option<u64>,
}

impl Plan<'_> {
    /// Whether this start copies table `t` (whose state is `stored`).
    fn copies(&self, t: &TableRef, stored: Option<&StoredTable>) -> bool {
        if stored.is_some_and(|s| s.forced) {
            // Rows the stream cannot bring (written before the table joined
            // the publication): copied in every mode but never.
            return self.mode != Mode::Never;
        }
        let ready = stored.filter(|s| s.ready);
        // The connector's slot was lost and made again: a copy older than
        // the new slot misses what happened in between.
        let gap = matches!((ready, self.fresh_slot_at), (Some(s), Some(at)) if s.sync_lsn < at && s.sync_lsn != 0);
        match self.mode {
            Mode::Initial | Mode::InitialOnly => ready.is_none() || gap,
            Mode::Always => {
                let selected = self.snap_filter.is_none_or(|list| list.contains(t));
                selected || ready.is_none() || gap
            }
            Mode::NoData | Mode::Never => false,
        }
    }

    fn may_copy(&self) -> bool {
        matches!(self.mode, Mode::Initial | Mode::InitialOnly | Mode::Always)
    }
}

/// The source columns the destination stores (generated ones are computed there).
fn stored_columns(shape: &SourceTable) -> Vec<String> {
    shape
        .columns
        .iter()
        .filter(|c| c.generated.is_none())
        .map(|c| c.name.clone())
        .collect()
}

/// Raises an ERROR unless destination table schema.table is this
/// connector's: a table someone else created is never emptied or reshaped.
fn check_owner(connector: &str, schema: &str, table: &str) {
    if schema::owned_by(connector, schema, table) {
        return;
    }
    match schema::owner_other_than(connector, schema, table) {
        Some(other) => pgrx::error!(
            "destination table {}.{} belongs to connector \"{other}\"; connector \"{connector}\" does not write into it",
            sqlgen::quote_ident(schema),
            sqlgen::quote_ident(table)
        ),
        None => pgrx::error!(
            "destination table {}.{} already exists and was not created by connector \"{connector}\"; drop or rename it, or start the connector in mode never to replicate into existing tables",
            sqlgen::quote_ident(schema),
            sqlgen::quote_ident(table)
        ),
    }
}

/// An exported snapshot held open for a copy: the session that exported it
/// (its temporary slot), a connection inside it, the slot's consistent
/// point, and the tables to copy with their shapes as of the snapshot.
struct Snapshot {
    gate: replication::Session,
    client: tokio_postgres::Client,
    consistent: u64,
    shapes: Vec<SourceTable>,
    user_types: Vec<source::UserType>,
    names: HashMap<TableRef, String>,
    /// The captured tables as of the snapshot.
    inside: Vec<TableRef>,
}

/// Exports a snapshot and reads, inside it, which tables to copy and their
/// shapes; then locks them (ACCESS SHARE, as pg_dump does, until the copy
/// ends). `None` when one of them was rewritten (ALTER TABLE ... TYPE, a
/// volatile default, TRUNCATE, VACUUM FULL) after the snapshot was taken
/// and before the lock: a rewrite is not MVCC-safe, the snapshot would read
/// the new, empty-looking file, so the caller takes a new snapshot.
#[allow(clippy::too_many_arguments)]
fn open_snapshot(
    ctx: &WorkerContext,
    rt: &tokio::runtime::Runtime,
    info: &ConnInfo,
    object: &str,
    copy: &[TableRef],
    plan: &Plan<'_>,
    captured: (&str, Option<&[TableRef]>),
    stored: &HashMap<TableRef, StoredTable>,
) -> Result<Option<Snapshot>, Stop> {
    let cfg = replication_config(info);
    let mut gate = block(rt, replication::Session::connect(&cfg))?
        .map_err(|e| Stop::Source(format!("replication connection: {e}")))?;
    // Temporary; unique on the source across destinations (the connector's
    // unique name hashed) and attempts (pid).
    let tmp_slot = format!("synchdb_snap_{}_{}", conninfo::name_hash(object), unsafe {
        pg_sys::MyProcPid
    });
    // The option list form exists from PostgreSQL 15; older servers take
    // the keyword form (10 to 14).
    let create = if source::server_version() >= 150000 {
        format!("CREATE_REPLICATION_SLOT {tmp_slot} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')")
    } else {
        format!("CREATE_REPLICATION_SLOT {tmp_slot} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT")
    };
    let rows = block(rt, gate.simple_query(&create))?
    .map_err(|e| {
        let text = e.to_string();
        if text.contains("all replication slots are in use") {
            Stop::Source(format!(
                "creating the snapshot slot: source has no free replication slot ({text}); a snapshot needs one more slot than the connector's own while it runs: raise max_replication_slots on the source or drop an unused slot"
            ))
        } else {
            Stop::Source(format!("creating the snapshot slot: {text}"))
        }
    })?;
    let row = rows
        .first()
        .ok_or_else(|| Stop::Source("CREATE_REPLICATION_SLOT returned no row".into()))?;
    let text = |i: usize| -> String { row.get(i).cloned().flatten().unwrap_or_default() };
    let consistent = crate::lsn::parse_lsn(&text(1))
        .map_err(|e| Stop::Source(format!("bad consistent point: {e}")))?;
    let snapshot_name = text(2);

    let client = block(rt, source::connect(info))??;
    block(
        rt,
        client.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            snapshot_name.replace('\'', "''")
        )),
    )?
    .map_err(SourceError::from_pg)?;

    // The captured tables as of the snapshot: a table created since the
    // start decided what to copy is copied too (when this start copies
    // tables without a finished copy), one dropped since is left to the
    // stream.
    let inside = block(rt, source::list_tables(&client, captured.0, captured.1))??;
    let mut gone: Vec<TableRef> = Vec::new();
    for t in copy.iter().filter(|t| !inside.contains(t)) {
        let Some(s) = stored.get(t) else { continue };
        if s.src_relid != 0 {
            if let Some(now) = block(rt, source::relation_name(&client, s.src_relid))?? {
                if inside.contains(&now) {
                    // Renamed: the next start follows the rename.
                    continue;
                }
            }
        }
        gone.push(t.clone());
    }
    if !gone.is_empty() {
        settle_vanished(&ctx.name, &gone, consistent)?;
    }
    let mut todo: Vec<TableRef> = copy
        .iter()
        .filter(|t| inside.contains(t))
        .cloned()
        .collect();
    for t in &inside {
        if !todo.contains(t) && plan.copies(t, stored.get(t)) {
            todo.push(t.clone());
        }
    }
    let names = sqlgen::destination_names(&inside);
    let (shapes, user_types) = describe_tables(rt, &client, &todo)?;
    for shape in &shapes {
        block(
            rt,
            client.batch_execute(&format!(
                "LOCK TABLE {} IN ACCESS SHARE MODE",
                sqlgen::qualified(&shape.table.schema, &shape.table.table)
            )),
        )?
        .map_err(SourceError::from_pg)?;
        let rewritten: i64 = block(
            rt,
            client.query_one(
                "WITH RECURSIVE tree(relid) AS (
                     SELECT $1::oid
                     UNION ALL
                     SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.relid)
                 SELECT count(*) FROM pg_catalog.pg_class c
                  WHERE c.oid IN (SELECT relid FROM tree)
                    AND c.relkind <> 'p' AND c.relfilenode <> 0
                    AND c.relfilenode IS DISTINCT FROM pg_catalog.pg_relation_filenode(c.oid)",
                &[&shape.oid],
            ),
        )?
        .map_err(SourceError::from_pg)?
        .get(0);
        if rewritten > 0 {
            pgrx::log!(
                "synchdb: connector \"{}\": {} was rewritten on the source just after the snapshot was taken; taking a new snapshot",
                ctx.name,
                shape.table
            );
            return Ok(None);
        }
    }
    Ok(Some(Snapshot {
        gate,
        client,
        consistent,
        shapes,
        user_types,
        names,
        inside,
    }))
}

/// Copies tables inside one snapshot exported by a temporary slot. Which
/// tables exist and their shapes are read inside that snapshot too (a table
/// created or dropped, or a column changed, just before it cannot slip
/// between the shape and the rows). Each table is loaded and marked ready
/// (with the slot's consistent point) in its own destination transaction, so
/// an interrupted copy leaves nothing half-done and is redone cleanly on the
/// next start.
#[allow(clippy::too_many_arguments)]
fn snapshot_tables(
    ctx: &WorkerContext,
    rt: &tokio::runtime::Runtime,
    info: &ConnInfo,
    object: &str,
    copy: &[TableRef],
    plan: &Plan<'_>,
    captured: (&str, Option<&[TableRef]>),
    stored: &HashMap<TableRef, StoredTable>,
    dst_schema: &str,
) -> Result<(), Stop> {
    let mut tries = 0;
    let Snapshot {
        gate,
        client,
        consistent,
        shapes,
        user_types,
        names,
        inside,
    } = loop {
        tries += 1;
        if let Some(snap) = open_snapshot(ctx, rt, info, object, copy, plan, captured, stored)? {
            break snap;
        }
        if tries >= 5 {
            return Err(Stop::Source(
                "captured tables keep being rewritten while a snapshot starts; retrying".into(),
            ));
        }
        // Ending the sessions drops the temporary slot and the snapshot.
        block(rt, async {
            tokio::time::sleep(Duration::from_millis(100)).await
        })?;
    };

    // Labels added to source enums since their destination copies were
    // made; in a transaction of their own, as a new label cannot be used in
    // the transaction that adds it.
    pgtxn::run(|| {
        schema::ensure_user_types(&user_types, dst_schema);
        schema::add_enum_labels(&user_types, dst_schema)
    })
    .map_err(|e| Stop::Apply {
        msg: format!("preparing the types of the snapshot: {e}"),
        at: None,
    })?;
    let mut restart = false;
    for shape in &shapes {
        if crate::worker::stopping() {
            return Err(Stop::Shutdown);
        }
        let t = &shape.table;
        // A table renamed after this start listed the tables (its OID held
        // by another name's state), or a name now held by another table
        // than its state's: the states are matched again by OID at the next
        // start, which then copies it.
        let moved = match stored.get(t) {
            None => stored.values().any(|s| s.src_relid == shape.oid),
            Some(s) if s.src_relid != 0 && s.src_relid != shape.oid => {
                // Its table still exists under another captured name?
                block(rt, source::relation_name(&client, s.src_relid))??
                    .is_some_and(|n| n != *t && inside.contains(&n))
            }
            Some(_) => false,
        };
        if moved && RENAME_RESTARTS.with(|c| c.get()) < 3 {
            pgrx::log!(
                "synchdb: connector \"{}\": {t} was renamed or replaced while the snapshot started; starting again",
                ctx.name
            );
            RENAME_RESTARTS.with(|c| c.set(c.get() + 1));
            restart = true;
            continue;
        }
        let state = stored.get(t);
        let dst = state
            .map(|s| s.dst_table.clone())
            .or_else(|| names.get(t).cloned())
            .unwrap_or_else(|| t.table.clone());
        let prev_cols = state.and_then(|s| s.src_columns.clone());
        let cols = stored_columns(shape);
        let col_refs: Vec<&str> = cols.iter().map(|s| s.as_str()).collect();
        let sql = sqlgen::copy_out(&t.schema, &t.table, &col_refs);
        let stream = block(rt, client.copy_out(sql.as_str()))?.map_err(SourceError::from_pg)?;
        let mut stream = Box::pin(stream);
        let mut feed = || -> Result<Option<bytes::Bytes>, String> {
            if crate::worker::stopping() {
                return Err("the connector is stopping".into());
            }
            match block(rt, stream.next()).map_err(|_| "the connector is stopping".to_string())? {
                None => Ok(None),
                Some(Ok(b)) => Ok(Some(b)),
                Some(Err(e)) => Err(source::describe_pg_error(&e)),
            }
        };
        let loaded = pgtxn::run(|| {
            schema::ensure_user_types(&user_types, dst_schema);
            let build_pk = if schema::create_table(dst_schema, &dst, shape, true) {
                true
            } else {
                schema::require_table(dst_schema, &dst);
                check_owner(&ctx.name, dst_schema, &dst);
                // As the table's owner (a DBA may have given it to another
                // role): its TRUNCATE triggers run with the owner's rights.
                crate::usercontext::as_owner(schema::relid(dst_schema, &dst), || {
                    schema::reshape_for_copy(dst_schema, &dst, shape, prev_cols.as_deref())
                })
            };
            let n = apply::copy_into(dst_schema, &dst, &cols, &mut feed);
            if build_pk {
                schema::add_primary_key(dst_schema, &dst, &shape.primary_key);
            }
            crate::indexes::copy_indexes(rt, &client, &ctx.name, shape, dst_schema, &dst);
            schema::record_table(
                &ctx.name,
                t,
                dst_schema,
                &dst,
                shape.oid,
                consistent,
                n,
                Some(&cols),
            );
            n
        });
        match loaded {
            Ok(n) => {
                ctx.slot.stats(|s| {
                    s.tables_copied += 1;
                    s.rows_copied += n;
                });
                pgrx::log!(
                    "synchdb: connector \"{}\" copied {n} rows of {t} into {dst_schema}.{dst}",
                    ctx.name
                )
            }
            Err(e) => {
                if crate::worker::stopping() {
                    return Err(Stop::Shutdown);
                }
                if e.contains("was not created by connector") || e.contains("belongs to connector")
                {
                    return Err(Stop::Apply {
                        msg: format!("snapshot of {t}: {e}"),
                        at: None,
                    });
                }
                return Err(Stop::Source(format!("snapshot of {t}: {e}")));
            }
        }
    }
    let _ = block(rt, client.batch_execute("COMMIT"));
    drop(client);
    if restart {
        drop(gate);
        block(rt, async {
            tokio::time::sleep(Duration::from_millis(20)).await
        })?;
        return Err(Stop::Restart);
    }
    RENAME_RESTARTS.with(|c| c.set(0));
    // Ending the session drops the temporary slot and the exported snapshot;
    // the runtime must run once more for the aborted tasks to close their
    // connections.
    drop(gate);
    block(rt, async {
        tokio::time::sleep(Duration::from_millis(20)).await
    })?;
    Ok(())
}

fn replication_config(info: &ConnInfo) -> replication::Config {
    replication::Config {
        host: info.hostname.clone(),
        port: u16::try_from(info.port).unwrap_or(5432),
        user: info.user.clone(),
        password: info.pwd.clone(),
        dbname: info.srcdb.clone(),
        application_name: "synchdb".into(),
        options: source::PINNED_OPTIONS.into(),
        // Checked when the connector started, and by source::connect,
        // which always opens the normal connection first.
        tls: info.tls().unwrap_or_default(),
    }
}

/// The pgoutput options of START_REPLICATION for this source: protocol
/// version 1 (every server from 10 on speaks it) and the publication.
fn plugin_options(publication: &str) -> String {
    format!(
        "proto_version '1', publication_names {}",
        replication::quote_literal(&replication::quote_ident(publication))
    )
}

#[allow(clippy::too_many_arguments)]
fn stream(
    ctx: &WorkerContext,
    rt: &tokio::runtime::Runtime,
    source_client: tokio_postgres::Client,
    info: &ConnInfo,
    object: &str,
    targets: HashMap<TableRef, TableTarget>,
    dst_schema: &str,
    mode: Mode,
    copied_now: bool,
    skip: &mut Vec<(u64, u64)>,
) -> Result<(), Stop> {
    let slot = ctx.slot;
    crate::relcache::register();
    let start = apply::setup_origin(object).map_err(Stop::Fatal)?;
    let cfg = replication_config(info);
    let session = block(rt, replication::Session::connect(&cfg))?
        .map_err(|e| Stop::Source(format!("replication connection: {e}")))?;
    let mut client = block(
        rt,
        session.start(
            object,
            start,
            &plugin_options(&info.publication_name(object)),
            4096,
        ),
    )?
    .map_err(|e| Stop::Source(format!("START_REPLICATION: {e}")))?;
    if !copied_now || start != 0 {
        slot.set_stage(Stage::ChangeDataCapture);
    }
    if start != 0 {
        slot.set_offset(&format!(
            "{{\"lsn_proc\":{start},\"lsn_commit\":{start},\"lsn\":{start}}}"
        ));
    }
    slot.set_state(State::Polling);
    slot.set_err("no error");
    let mut catalog = LiveCatalog {
        rt,
        client: source_client,
    };
    let mut applier = Applier::new(
        &ctx.name,
        &mut catalog,
        targets,
        dst_schema,
        mode.captures_schema(),
    );
    skip.retain(|(lsn, _)| *lsn >= start);
    applier.skip = skip.clone();
    applier.can_resync = matches!(mode, Mode::Initial | Mode::Always);
    applier.copy_late_tables = !info.owns_publication() || source::server_version() < 150000;
    let explicit = info.tables().map_err(|e| Stop::Fatal(e.to_string()))?;
    applier.captured = Some(match explicit {
        Some(list) => (String::new(), Some(list)),
        None => (
            info.source_schema()
                .map_err(|e| Stop::Fatal(e.to_string()))?,
            None,
        ),
    });
    let mut last_check = Instant::now();
    let mut last_request_check = Instant::now();
    let mut last_received_check = Instant::now();
    // Where the source's stream has got to (what it sent, buffered or not
    // yet applied): lag_bytes is measured against it.
    // Sources before 15 have no schema publication (and before 13 publish
    // each partition): new tables and partitions join the connector's
    // publication as they appear. A publication an admin made is checked
    // to cover them.
    let watch_publication = !info.owns_publication() || source::server_version() < 150000;
    let mut watcher = PublicationWatch {
        client: None,
        last: Instant::now(),
    };
    let mut paused = false;
    let mut flush = FlushTracker::default();
    let mut published = apply::Counters::default();
    loop {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if crate::worker::stopping() {
            applier.abort();
            return Ok(());
        }
        if last_received_check.elapsed() >= Duration::from_millis(100) {
            last_received_check = Instant::now();
            let end = client.last_wal_end();
            slot.stats(|s| s.received_lsn = s.received_lsn.max(end));
        }
        if !applier.in_transaction() && last_request_check.elapsed() >= Duration::from_millis(20) {
            last_request_check = Instant::now();
            let (req, offset) = slot.take_request();
            match req {
                Request::Pause => {
                    paused = true;
                    slot.set_state(State::Paused);
                }
                Request::SetOffset => {
                    slot.set_state(State::Paused);
                    slot.set_offset(&format!(
                        "{{\"lsn_proc\":{offset},\"lsn_commit\":{offset},\"lsn\":{offset}}}"
                    ));
                }
                Request::Resume if offset != 0 => {
                    slot.set_state(State::UpdatingOffset);
                    drop(client);
                    apply::reset_origin(object, offset).map_err(Stop::Fatal)?;
                    pgrx::log!(
                        "synchdb: connector \"{}\" resumes from offset {}",
                        ctx.name,
                        crate::lsn::format_lsn(offset)
                    );
                    return Err(Stop::Restart);
                }
                Request::Resume => {
                    paused = false;
                    slot.set_state(State::Polling);
                }
                Request::None => {}
            }
        }
        if paused {
            // Keep driving the runtime so the replication session answers
            // keepalives while nothing is applied.
            block(rt, async {
                tokio::time::sleep(Duration::from_millis(200)).await
            })?;
            continue;
        }
        if !applier.in_transaction() && last_check.elapsed() > Duration::from_secs(5) {
            last_check = Instant::now();
            if !still_defined(&ctx.name) {
                return Ok(());
            }
        }
        if watch_publication
            && !applier.in_transaction()
            && watcher.last.elapsed() > Duration::from_secs(2)
        {
            watcher.last = Instant::now();
            if watcher.check(ctx, rt, info, object, mode)? {
                applier.abort();
                drop(client);
                return Err(Stop::Restart);
            }
        }
        // Events the replication task already buffered are taken without
        // entering the runtime; only an empty buffer waits (and lets the
        // task read the socket and send feedback).
        let ev = match futures_util::FutureExt::now_or_never(client.recv()) {
            Some(r) => Ok(r),
            None => rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(200), client.recv()).await
            }),
        };
        let ev = match ev {
            Err(_) => {
                if let Some(lsn) = flush.durable(local_flush_lsn()) {
                    client.update_applied_lsn(lsn);
                }
                continue;
            }
            Ok(Ok(Some(ev))) => ev,
            Ok(Ok(None)) => {
                applier.abort();
                return Err(Stop::Source(
                    "the source ended the replication stream".into(),
                ));
            }
            Ok(Err(e)) => {
                applier.abort();
                return Err(Stop::Source(format!("replication stream: {e}")));
            }
        };
        // A message that does not decode is the source's (or the
        // network's) fault, not the destination's: nothing of it is
        // applied, and the stream is read again from the last applied
        // position.
        let incoming = match ev {
            Event::XLogData {
                wal_start, data, ..
            } => {
                let decoded = decode::decode_bytes(&data);
                // The message's values are slices of `data`: only they keep it now.
                drop(data);
                match decoded {
                    Ok(msg) => Incoming::Message(msg, wal_start),
                    Err(e) => {
                        applier.abort();
                        return Err(Stop::Source(format!(
                            "malformed pgoutput message at {}: {e}",
                            crate::lsn::format_lsn(wal_start)
                        )));
                    }
                }
            }
            Event::KeepAlive { wal_end } => Incoming::KeepAlive(wal_end),
        };
        let outcome = pgtxn::catch(|| match incoming {
            Incoming::Message(
                Message::Begin {
                    final_lsn,
                    commit_ts,
                    xid,
                },
                _,
            ) => {
                slot.set_state(State::Executing);
                applier.begin(final_lsn, xid, commit_ts);
                None
            }
            Incoming::Message(
                Message::Commit {
                    commit_lsn,
                    end_lsn,
                    commit_ts,
                    ..
                },
                _,
            ) => {
                let local_end = applier.commit(commit_lsn, end_lsn, commit_ts);
                Some(Progress::Committed {
                    remote_end: end_lsn,
                    local_end,
                })
            }
            Incoming::Message(msg, wal_start) => {
                applier.apply(msg, wal_start);
                None
            }
            Incoming::KeepAlive(wal_end) => {
                if !applier.in_transaction() {
                    Some(Progress::Idle(wal_end))
                } else {
                    None
                }
            }
        });
        match outcome {
            Ok(Some(Progress::Committed {
                remote_end,
                local_end,
            })) => {
                flush.committed(remote_end, local_end);
                publish_stats(slot, &applier, &mut published, remote_end);
                if let Some(lsn) = flush.durable(local_flush_lsn()) {
                    client.update_applied_lsn(lsn);
                }
            }
            Ok(Some(Progress::Idle(wal_end))) => {
                // Between transactions with nothing pending: everything the
                // server sent before this keepalive is applied and durable.
                if let Some(lsn) = flush.durable(local_flush_lsn()) {
                    client.update_applied_lsn(lsn);
                }
                if flush.is_empty() {
                    client.update_applied_lsn(wal_end);
                }
                let end = wal_end;
                slot.stats(|s| {
                    s.received_lsn = s.received_lsn.max(end);
                    s.applied_lsn = s.applied_lsn.max(end);
                });
            }
            Ok(None) => {}
            Err(e) => {
                let at = applier.failed_change();
                let e = format!("{e} ({})", applier.context());
                let resync = applier.resync.take();
                let late_copy = applier.late_copy.take();
                let type_oids = applier.current_type_oids();
                applier.abort();
                drop(client);
                if let Some((table, target)) = resync {
                    return resync_table(ctx, &table, &target);
                }
                if let Some(table) = late_copy {
                    owe_copies(
                        &ctx.name,
                        mode,
                        std::slice::from_ref(&table),
                        std::slice::from_ref(&table),
                        dst_schema,
                    )?;
                    return Err(Stop::Restart);
                }
                if e.contains(crate::relcache::APPLY_AGAIN) {
                    pgrx::log!("synchdb: connector \"{}\": {e}", ctx.name);
                    return Err(Stop::Restart);
                }
                if e.contains("invalid input value for enum") {
                    match applier.sync_enum_labels(&type_oids) {
                        Ok(n) if n > 0 => return Err(Stop::Restart),
                        Ok(_) => pgrx::log!(
                            "synchdb: connector \"{}\": no enum label to add for types {type_oids:?}",
                            ctx.name
                        ),
                        // The source is unavailable: retried like any source problem.
                        Err(err) => {
                            return Err(Stop::Source(format!(
                                "reading the source's enum labels after \"{e}\": {err}"
                            )))
                        }
                    }
                }
                return Err(Stop::Apply { msg: e, at });
            }
        }
    }
}

/// Marks a table for a fresh copy at the next attempt (under a new
/// snapshot, with its own sync LSN: the stream skips what the copy holds),
/// into the same destination table.
fn resync_table(ctx: &WorkerContext, table: &TableRef, target: &TableTarget) -> Result<(), Stop> {
    pgtxn::run(|| schema::mark_for_copy(&ctx.name, table, target.src_relid)).map_err(|e| {
        Stop::Apply {
            msg: format!("preparing a fresh copy of {table}: {e}"),
            at: None,
        }
    })?;
    ctx.slot.stats(|s| s.ddls += 1);
    pgrx::log!(
        "synchdb: connector \"{}\": {table} changed on the source in a way only a fresh copy follows exactly; {}.{} is copied again",
        ctx.name,
        target.dst_schema,
        target.dst_table
    );
    Err(Stop::Restart)
}

fn now_usec() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Publishes a commit: the position, stage and state, and what the applier
/// counted since the last call, in the connector's shared-memory slot.
fn publish_stats(
    slot: crate::shmem::WorkerSlot,
    applier: &Applier<'_>,
    published: &mut apply::Counters,
    remote_end: u64,
) {
    let c = &applier.counters;
    let p = published.clone();
    let src_ts = applier.last.ts_usec;
    let now = now_usec();
    slot.committed(&applier.last.to_json(), |s| {
        s.ddls += c.ddl - p.ddl;
        s.inserts += c.inserts - p.inserts;
        s.updates += c.updates - p.updates;
        s.deletes += c.deletes - p.deletes;
        s.truncates += c.truncates - p.truncates;
        s.transactions += c.transactions - p.transactions;
        s.bad_changes += (c.skipped + c.missing_rows) - (p.skipped + p.missing_rows);
        if s.first_src_ts == 0 {
            s.first_src_ts = src_ts;
        }
        s.last_src_ts = src_ts;
        if s.first_apply_ts == 0 {
            s.first_apply_ts = now;
        }
        s.last_apply_ts = now;
        s.applied_lsn = s.applied_lsn.max(remote_end);
        s.received_lsn = s.received_lsn.max(remote_end);
    });
    *published = c.clone();
}

/// What one stream event brings to the applier.
enum Incoming {
    /// A decoded pgoutput message and where it starts in the WAL.
    Message(Message, u64),
    /// A keepalive: the server has sent everything before this position.
    KeepAlive(u64),
}

/// What handling one replication event achieved.
enum Progress {
    /// A remote transaction ending at `remote_end` committed locally, its
    /// commit record ending at `local_end`.
    Committed { remote_end: u64, local_end: u64 },
    /// A keepalive arrived between transactions.
    Idle(u64),
}

fn local_flush_lsn() -> u64 {
    unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) }
}

/// Commits are asynchronous (as in native logical replication), so a
/// remote position may be reported as flushed only once the local commit
/// that applied it is on disk: this keeps (remote end, local end) pairs until
/// the local WAL flush passes them.
#[derive(Default)]
pub struct FlushTracker {
    pending: std::collections::VecDeque<(u64, u64)>,
}

impl FlushTracker {
    pub fn committed(&mut self, remote_end: u64, local_end: u64) {
        self.pending.push_back((remote_end, local_end));
    }

    /// The highest remote position whose local commit is durable at
    /// `local_flushed`, if it advanced.
    pub fn durable(&mut self, local_flushed: u64) -> Option<u64> {
        let mut best = None;
        while let Some(&(remote, local)) = self.pending.front() {
            if local > local_flushed {
                break;
            }
            best = Some(remote);
            self.pending.pop_front();
        }
        best
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// The source catalog as the applier sees it while streaming.
struct LiveCatalog<'r> {
    rt: &'r tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

fn stop_text(s: Stop) -> String {
    match s {
        Stop::Shutdown | Stop::Restart => "the connector is stopping".into(),
        Stop::Source(m) | Stop::Fatal(m) | Stop::Apply { msg: m, .. } => m,
    }
}

impl apply::SourceCatalog for LiveCatalog<'_> {
    fn describe(
        &mut self,
        table: &TableRef,
    ) -> Result<(SourceTable, Vec<source::UserType>), String> {
        let shape = block(self.rt, source::describe_table(&self.client, table))
            .map_err(stop_text)?
            .map_err(|e| e.to_string())?;
        let roots = source::user_type_roots(&shape);
        let types = block(self.rt, source::describe_user_types(&self.client, &roots))
            .map_err(stop_text)?
            .map_err(|e| e.to_string())?;
        Ok((shape, types))
    }

    fn enum_types(&mut self, oids: &[u32]) -> Result<Vec<source::UserType>, String> {
        block(self.rt, source::enum_types(&self.client, oids))
            .map_err(stop_text)?
            .map_err(|e| e.to_string())
    }

    fn relation_name(&mut self, relid: u32) -> Result<Option<TableRef>, String> {
        block(self.rt, source::relation_name(&self.client, relid))
            .map_err(stop_text)?
            .map_err(|e| e.to_string())
    }

    fn column_default(&mut self, relid: u32, column: &str) -> Result<Option<String>, String> {
        block(self.rt, source::column_default(&self.client, relid, column))
            .map_err(stop_text)?
            .map_err(|e| e.to_string())
    }

    fn partition_ancestors(&mut self, relid: u32) -> Result<Vec<(u32, TableRef)>, String> {
        block(self.rt, source::partition_ancestors(&self.client, relid))
            .map_err(stop_text)?
            .map_err(|e| e.to_string())
    }

    fn partition_leaves(&mut self, root: u32) -> Result<Vec<u32>, String> {
        block(self.rt, source::leaf_oids(&self.client, root))
            .map_err(stop_text)?
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::FlushTracker;

    #[test]
    fn feedback_never_runs_ahead_of_local_flush() {
        let mut f = FlushTracker::default();
        assert_eq!(f.durable(100), None);
        f.committed(1000, 50);
        f.committed(2000, 80);
        f.committed(3000, 120);
        assert_eq!(f.durable(40), None);
        assert_eq!(f.durable(80), Some(2000));
        assert!(!f.is_empty());
        assert_eq!(f.durable(100), None);
        assert_eq!(f.durable(120), Some(3000));
        assert!(f.is_empty());
    }
}
