//! The initial copy: which tables a start copies (`Plan`), the snapshot the
//! copies read under (a slot created with an exported snapshot, checked
//! against rewrites), and copying each table into the destination in its
//! own transaction with its position recorded.

use super::*;

/// What a start does with each table.
pub(super) struct Plan<'a> {
    pub(super) mode: Mode,
    pub(super) snap_filter: Option<&'a [TableRef]>,
    pub(super) fresh_slot_at: Option<u64>,
}

impl Plan<'_> {
    /// Whether this start copies table `t` (whose state is `stored`).
    pub(super) fn copies(&self, t: &TableRef, stored: Option<&StoredTable>) -> bool {
        if self.mode == Mode::SchemaSync {
            // Copied by the start after the schema review.
            return false;
        }
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
            Mode::NoData | Mode::Never | Mode::SchemaSync => false,
        }
    }

    pub(super) fn may_copy(&self) -> bool {
        matches!(self.mode, Mode::Initial | Mode::InitialOnly | Mode::Always)
    }
}

/// The source columns the destination stores (generated ones are computed there).
pub(super) fn stored_columns(shape: &SourceTable) -> Vec<String> {
    shape
        .columns
        .iter()
        .filter(|c| c.generated.is_none())
        .map(|c| c.name.clone())
        .collect()
}

/// Raises an ERROR unless destination table schema.table is this
/// connector's: a table someone else created is never emptied or reshaped.
pub(super) fn check_owner(connector: &str, schema: &str, table: &str) {
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
pub(super) struct Snapshot {
    pub(super) gate: replication::Session,
    pub(super) client: tokio_postgres::Client,
    pub(super) consistent: u64,
    pub(super) shapes: Vec<SourceTable>,
    pub(super) user_types: Vec<source::UserType>,
    pub(super) names: HashMap<TableRef, String>,
    /// The captured tables as of the snapshot.
    pub(super) inside: Vec<TableRef>,
    /// The exported snapshot's name (copy workers import it).
    pub(super) name: String,
}

/// Exports a snapshot and reads, inside it, which tables to copy and their
/// shapes; then locks them (ACCESS SHARE, as pg_dump does, until the copy
/// ends). `None` when one of them was rewritten (ALTER TABLE ... TYPE, a
/// volatile default, TRUNCATE, VACUUM FULL) after the snapshot was taken
/// and before the lock: a rewrite is not MVCC-safe, the snapshot would read
/// the new, empty-looking file, so the caller takes a new snapshot.
#[allow(clippy::too_many_arguments)]
pub(super) fn open_snapshot(
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
            "SET idle_in_transaction_session_timeout = 0; {}",
            source::begin_in_snapshot(&snapshot_name)
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
    // All in one statement and one query (a round trip each, however many
    // tables).
    if !shapes.is_empty() {
        let names: Vec<String> = shapes
            .iter()
            .map(|s| sqlgen::qualified(&s.table.schema, &s.table.table))
            .collect();
        block(
            rt,
            client.batch_execute(&format!(
                "LOCK TABLE {} IN ACCESS SHARE MODE",
                names.join(", ")
            )),
        )?
        .map_err(SourceError::from_pg)?;
        let oids: Vec<u32> = shapes.iter().map(|s| s.oid).collect();
        let rewritten = block(
            rt,
            client.query(
                "WITH RECURSIVE tree(root, relid) AS (
                     SELECT r, r FROM unnest($1::oid[]) r
                     UNION ALL
                     SELECT tree.root, i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.relid)
                 SELECT DISTINCT tree.root FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.relid
                  WHERE c.relkind <> 'p' AND c.relfilenode <> 0
                    AND c.relfilenode IS DISTINCT FROM pg_catalog.pg_relation_filenode(c.oid)",
                &[&oids],
            ),
        )?
        .map_err(SourceError::from_pg)?;
        if let Some(row) = rewritten.first() {
            let oid: u32 = row.get(0);
            if let Some(shape) = shapes.iter().find(|s| s.oid == oid) {
                pgrx::log!(
                    "synchdb: connector \"{}\": {} was rewritten on the source just after the snapshot was taken; taking a new snapshot",
                    ctx.name,
                    shape.table
                );
            }
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
        name: snapshot_name,
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
pub(super) fn snapshot_tables(
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
        name: snapshot_name,
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
    // Live progress (control::progress), with the sizes read inside the snapshot.
    let progress = crate::control::progress::begin_snapshot(
        ctx.slot,
        &ctx.name,
        &progress_estimates(ctx, rt, &client, &shapes)?,
    );
    // Started at the first table copied the usual way.
    let mut reader: Option<super::reader::Reader> = None;
    let mut restart = false;
    for shape in &shapes {
        if crate::control::worker::stopping() {
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
        let src_cols = stored_columns(shape);
        let col_refs: Vec<&str> = src_cols.iter().map(|s| s.as_str()).collect();
        let sql = sqlgen::copy_out(&t.schema, &t.table, &col_refs);
        // Object mappings (apply::mapping): where the table lands, its
        // columns' names and types; `shape` is the destination's from here.
        let maps = crate::apply::mapping::current();
        let (mapped_schema, dst) = maps.destination(t, dst_schema, &dst);
        let dst_schema: &str = &mapped_schema;
        let src_shape = shape;
        let shape = &maps.map_shape(src_shape);
        let cols = stored_columns(shape);
        let mut copying = progress.table_started(&estimate_of(shape));
        let pages = if maps.has_transforms(t) {
            None
        } else {
            super::parallel::pages_for_parallel(rt, &client, src_shape)?
        };
        // A table copied in ranges is created first, in a transaction of its
        // own (the copy workers must see it), and recorded there as owing a
        // copy (it is this connector's, and a start after a failure copies
        // it again); a table that exists already is copied the usual way.
        let created = match pages {
            Some(_) => pgtxn::run(|| {
                schema::ensure_user_types(&user_types, dst_schema);
                let created = schema::create_table(dst_schema, &dst, shape, true);
                if created {
                    schema::request_copy(&ctx.name, t, dst_schema, &dst);
                }
                created
            }),
            None => Ok(false),
        };
        // What follows the rows in the table's final transaction: its
        // mapped columns shown, key and indexes built, position recorded.
        let finish = |n: u64, build_pk: bool| {
            crate::apply::mapping::record_columns(
                &ctx.name,
                &info.srcdb,
                t,
                &crate::apply::mapping::att_rows(src_shape, shape),
            );
            if build_pk {
                schema::add_primary_key(dst_schema, &dst, &shape.primary_key);
            }
            crate::apply::indexes::copy_indexes(rt, &client, &ctx.name, shape, dst_schema, &dst);
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
        };
        // COPY's binary format when both sides agree on every type.
        let binary = !maps.has_transforms(t) && binary_copy(src_shape, shape);
        let loaded = if let (Some(pages), Ok(true)) = (pages, &created) {
            let task = super::parallel::RangeTask {
                binary,
                connector: &ctx.name,
                snapshot: &snapshot_name,
                src: t,
                src_cols: &src_cols,
                dst_schema,
                dst_table: &dst,
                cols: &cols,
            };
            let build_pk = true;
            (|| {
                let ranges = super::parallel::split_pages(pages, gucs::snapshot_parallelism());
                let ids = super::parallel::record_ranges(&task, &ranges)?;
                let mut crew = super::parallel::Crew::start(&ctx.name, ids.get(1..).unwrap_or(&[]));
                pgtxn::run(|| {
                    let n = super::parallel::finish_ranges(
                        rt,
                        &client,
                        &ctx.name,
                        &mut crew,
                        &mut |r, b| copying.add(r, b),
                    );
                    finish(n, build_pk);
                    super::parallel::forget_ranges(&ctx.name);
                    n
                })
            })()
        } else if let Err(e) = created {
            Err(e)
        } else {
            let sql = if binary {
                super::parallel::binary_format(&sql)
            } else {
                sql
            };
            // Read by the reader's thread when it can, else here.
            let trim = binary.then(|| char_columns(shape));
            let mut feed_state = match reader
                .get_or_insert_with(|| {
                    super::reader::Reader::start(info, &snapshot_name, gucs::snapshot_reader())
                })
                .copy(t, &sql, trim)
            {
                Some(f) => TableFeed::Reader(f),
                None => TableFeed::Inline(
                    super::parallel::BatchedFeed::open(rt, &client, &sql)?
                        .map_err(SourceError::from_pg)?,
                ),
            };
            let mut feed = || {
                feed_state.next(rt, &client, &sql, &mut |r, b| copying.add(r, b), &|why| {
                    pgrx::log!(
                        "synchdb: connector \"{}\": the snapshot reader cannot copy {t} ({why}); copying on the snapshot connection",
                        ctx.name
                    )
                })
            };
            pgtxn::run(|| {
                schema::ensure_user_types(&user_types, dst_schema);
                let build_pk = if schema::create_table(dst_schema, &dst, shape, true) {
                    true
                } else {
                    schema::require_table(dst_schema, &dst);
                    check_owner(&ctx.name, dst_schema, &dst);
                    // As the table's owner (a DBA may have given it to another
                    // role): its TRUNCATE triggers run with the owner's rights.
                    crate::apply::usercontext::as_owner(schema::relid(dst_schema, &dst), || {
                        schema::reshape_for_copy(dst_schema, &dst, shape, prev_cols.as_deref())
                    })
                };
                // Created or emptied (TRUNCATE) in this transaction: rows go in frozen.
                let n = crate::apply::mapping::copy_into(
                    dst_schema,
                    &dst,
                    t,
                    &src_cols,
                    &cols,
                    crate::apply::applier::CopyOptions {
                        freeze: true,
                        binary,
                    },
                    &mut feed,
                );
                finish(n, build_pk);
                n
            })
        };
        match loaded {
            Ok(n) => {
                drop(copying);
                progress.table_done(&t.schema, &t.table, n);
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
                if crate::control::worker::stopping() {
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
    drop(reader);
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
    progress.finish(true);
    // Ending the session drops the temporary slot and the exported snapshot;
    // the runtime must run once more for the aborted tasks to close their
    // connections.
    drop(gate);
    block(rt, async {
        tokio::time::sleep(Duration::from_millis(20)).await
    })?;
    Ok(())
}

/// Where a table's rows come from: the snapshot reader's thread, or the
/// snapshot connection itself.
enum TableFeed {
    Reader(super::reader::ReaderFeed),
    Inline(super::parallel::BatchedFeed),
}

impl TableFeed {
    /// The next rows; a reader that could not start the copy gives way to
    /// the snapshot connection (`told` why), which then copies the table.
    fn next(
        &mut self,
        rt: &tokio::runtime::Runtime,
        client: &tokio_postgres::Client,
        sql: &str,
        on_batch: &mut dyn FnMut(u64, u64),
        told: &dyn Fn(&str),
    ) -> Result<Option<bytes::Bytes>, String> {
        if let TableFeed::Reader(f) = self {
            match f.next(on_batch)? {
                super::reader::Next::Rows(b) => return Ok(Some(b)),
                super::reader::Next::End => return Ok(None),
                super::reader::Next::NotStarted(why) => {
                    told(&why);
                    *self = TableFeed::Inline(
                        super::parallel::BatchedFeed::open(rt, client, sql)
                            .map_err(|_| "the connector is stopping".to_string())?
                            .map_err(|e| source::describe_pg_error(&e))?,
                    );
                }
            }
        }
        match self {
            TableFeed::Inline(f) => f.next(rt, on_batch),
            TableFeed::Reader(_) => Ok(None),
        }
    }
}

/// Whether a table is copied in COPY's binary format: from sources 14 on,
/// when every copied column is of a built-in type (same OID and binary form
/// on both sides) and lands in a column of the very same type (no mapping
/// changed it). Otherwise text, which every input function reads.
pub(super) fn binary_copy(src: &SourceTable, dst: &SourceTable) -> bool {
    source::server_version() >= 140000
        && src.columns.len() == dst.columns.len()
        && src
            .columns
            .iter()
            .zip(&dst.columns)
            .filter(|(c, _)| c.generated.is_none())
            .all(|(a, b)| {
                a.type_oid < 10000
                    && matches!((&a.ty, &b.ty),
                        (source::ColumnType::Builtin(x), source::ColumnType::Builtin(y)) if x == y)
            })
}

/// Per stored column, whether it is `char(n)` (with a declared length, not
/// an array): its values' trailing blanks need not be sent to the
/// destination's input function, which pads them again.
fn char_columns(shape: &SourceTable) -> Vec<bool> {
    shape
        .columns
        .iter()
        .filter(|c| c.generated.is_none())
        .map(|c| {
            c.type_oid == 1042
                && matches!(&c.ty, source::ColumnType::Builtin(t)
                    if t.starts_with("character(") && t.ends_with(')'))
        })
        .collect()
}

/// What `control::progress` shows for a table before its copy.
fn estimate_of(shape: &SourceTable) -> crate::control::progress::TableEstimate {
    crate::control::progress::TableEstimate {
        schema: shape.table.schema.clone(),
        table: shape.table.table.clone(),
        ..Default::default()
    }
}

/// The tables of a copy with their sizes read on the source, in the
/// snapshot's transaction under a savepoint (0 when that read fails:
/// progress is shown without estimates, the copy goes on).
fn progress_estimates(
    ctx: &WorkerContext,
    rt: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
    shapes: &[SourceTable],
) -> Result<Vec<crate::control::progress::TableEstimate>, Stop> {
    let mut out: Vec<_> = shapes.iter().map(estimate_of).collect();
    block(rt, client.batch_execute("SAVEPOINT synchdb_estimate"))?.map_err(SourceError::from_pg)?;
    let oids: Vec<u32> = shapes.iter().map(|s| s.oid).collect();
    match block(rt, crate::source::sizes::estimate(client, &oids))? {
        Ok(sizes) => {
            for (e, (rows, bytes)) in out.iter_mut().zip(sizes) {
                e.rows = rows;
                e.bytes = bytes;
            }
        }
        Err(err) => {
            pgrx::log!(
                "synchdb: connector \"{}\": estimating the sizes of the tables to copy: {}",
                ctx.name,
                crate::source::catalog::describe_pg_error(&err)
            );
            block(
                rt,
                client.batch_execute("ROLLBACK TO SAVEPOINT synchdb_estimate"),
            )?
            .map_err(SourceError::from_pg)?;
        }
    }
    block(
        rt,
        client.batch_execute("RELEASE SAVEPOINT synchdb_estimate"),
    )?
    .map_err(SourceError::from_pg)?;
    Ok(out)
}
