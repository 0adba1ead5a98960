//! Streaming: the replication session's changes handed to the applier one
//! transaction at a time (transactions the source streams while in progress,
//! from PostgreSQL 14 on, go through `spool` and are applied at their
//! commit), feedback of the locally durable position, the publication kept
//! in step with the captured tables, requests from SQL (pause, stop, reload)
//! and statistics published to shared memory.

use super::*;

/// Keeps the publication in step with the captured tables while streaming
/// (over a connection of its own: the applier holds the catalog's).
pub(super) struct PublicationWatch {
    pub(super) client: Option<tokio_postgres::Client>,
    pub(super) last: Instant,
    /// The table list as read when the connector started (a `file:` list
    /// is not read again until the next start); its patterns are matched
    /// against the source's tables at every check.
    pub(super) selection: Option<crate::control::tablelist::Selection>,
}

impl PublicationWatch {
    /// True when a table joined the publication and owes a copy (the
    /// connector starts again to make it).
    pub(super) fn check(
        &mut self,
        ctx: &WorkerContext,
        rt: &tokio::runtime::Runtime,
        info: &ConnInfo,
        object: &str,
        mode: Mode,
    ) -> Result<bool, Stop> {
        let schema = match &self.selection {
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
        let explicit: Option<Vec<TableRef>> = match &self.selection {
            Some(sel) => Some(block(rt, crate::source::selection::resolve(client, sel))??),
            None => None,
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

use super::spool::SpoolError;
use crate::source::decode::Decoded;

pub(super) fn replication_config(info: &ConnInfo) -> replication::Config {
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
        replication: true,
    }
}

/// The pgoutput options of START_REPLICATION for a source of
/// `server_version` (as `server_version_num`): protocol version 1 for
/// sources 10 to 13; from 14 on, protocol version 2 with `streaming 'on'`,
/// so a large transaction's changes come while it runs (see `spool`).
/// 16 on also offer `'parallel'` with protocol 4, which only adds the
/// abort's position for parallel apply workers: not needed here.
pub(super) fn plugin_options(publication: &str, server_version: i32) -> String {
    let publication = replication::quote_literal(&replication::quote_ident(publication));
    if server_version >= 140000 {
        format!("proto_version '2', streaming 'on', publication_names {publication}")
    } else {
        format!("proto_version '1', publication_names {publication}")
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn stream(
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
    crate::apply::relcache::register();
    let start = apply::setup_origin(object).map_err(Stop::Fatal)?;
    let cfg = replication_config(info);
    let session = block(rt, replication::Session::connect(&cfg))?
        .map_err(|e| Stop::Source(format!("replication connection: {e}")))?;
    // The version of the server this session reached (the catalog
    // connection's when it did not say).
    let server_version = session
        .server_version()
        .unwrap_or_else(source::server_version);
    // Streamed transactions left by an earlier session are sent again from
    // their start: their files go now.
    let mut spool = super::spool::Spool::open(super::spool::connector_dir(
        u32::from(unsafe { pg_sys::MyDatabaseId }),
        &ctx.name,
    ))
    .map_err(|e| Stop::Fatal(e.to_string()))?;
    // Between a Begin and its Commit (no Stream message may come then).
    let mut remote_open = false;
    let mut client = block(
        rt,
        session.start(
            object,
            start,
            &plugin_options(&info.publication_name(object), server_version),
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
    // A list with patterns is published table by table (never FOR TABLES
    // IN SCHEMA): tables created later that match join as they appear.
    let selection = info.tables().map_err(|e| Stop::Fatal(e.to_string()))?;
    let by_pattern = selection.as_ref().is_some_and(|s| s.has_patterns());
    let explicit: Option<Vec<TableRef>> = match &selection {
        Some(sel) => Some(block(
            rt,
            crate::source::selection::resolve(&source_client, sel),
        )??),
        None => None,
    };
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
    applier.copy_late_tables =
        by_pattern || !info.owns_publication() || source::server_version() < 150000;
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
    let watch_publication =
        by_pattern || !info.owns_publication() || source::server_version() < 150000;
    let mut watcher = PublicationWatch {
        client: None,
        last: Instant::now(),
        selection,
    };
    let mut paused = false;
    let mut flush = FlushTracker::default();
    let mut published = apply::Counters::default();
    loop {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if crate::control::worker::stopping() {
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
        // Between transactions only (no local one open, nor a deferred group).
        if !applier.in_transaction() && !pgtxn::in_transaction() && slot.take_reload() {
            // synchdb_reload_objmap: the new mappings apply from the next
            // transaction on (apply::mapping; README, "Object mapping").
            match pgtxn::run(|| crate::apply::mapping::load(&ctx.name, &info.srcdb)) {
                Ok(Ok(())) => {
                    applier.reload_mappings();
                    pgrx::log!(
                        "synchdb: connector \"{}\" reloaded its object mappings",
                        ctx.name
                    );
                }
                Ok(Err(e)) | Err(e) => pgrx::warning!(
                    "synchdb: connector \"{}\" keeps its object mappings: {e}",
                    ctx.name
                ),
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
            // Nothing more buffered: deferred source transactions commit now.
            None if applier.group_pending().is_some() => Err(()),
            None => rt
                .block_on(async {
                    tokio::time::timeout(Duration::from_millis(200), client.recv()).await
                })
                .map_err(|_| ()),
        };
        let ev = match ev {
            Err(_) if applier.group_pending().is_some() => None,
            Err(_) => {
                if let Some(lsn) = flush.durable(local_flush_lsn()) {
                    client.update_applied_lsn(lsn);
                }
                continue;
            }
            Ok(Ok(Some(ev))) => Some(ev),
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
            None => Incoming::CommitGroup,
            Some(Event::XLogData {
                wal_start, data, ..
            }) => {
                let decoded = match decode::decode_streamed(&data, spool.in_block()) {
                    Ok(d) => d,
                    Err(e) => {
                        applier.abort();
                        return Err(Stop::Source(format!(
                            "malformed pgoutput message at {}: {e}",
                            crate::lsn::format_lsn(wal_start)
                        )));
                    }
                };
                // Streamed blocks go to the spool as received; nothing of
                // them is applied (or confirmed) before their commit.
                let handled = match decoded {
                    Decoded::Message { msg, .. } if !spool.in_block() => {
                        match msg {
                            Message::Begin { .. } => remote_open = true,
                            Message::Commit { .. } => remote_open = false,
                            _ => {}
                        }
                        // The message's values are slices of `data`: only they keep it now.
                        drop(data);
                        Ok(Some(Incoming::Message(msg, wal_start)))
                    }
                    Decoded::Message { xid, msg } => {
                        drop(msg);
                        spool.write(xid, wal_start, &data).map(|_| None)
                    }
                    _ if remote_open => Err(SpoolError::Protocol(
                        "a Stream message between a Begin and its Commit".into(),
                    )),
                    Decoded::StreamStart { xid, first } => spool.start(xid, first).map(|_| None),
                    Decoded::StreamStop => spool.stop().map(|_| None),
                    Decoded::StreamAbort { xid, subxid, .. } => {
                        spool.abort(xid, subxid).map(|_| None)
                    }
                    Decoded::StreamCommit {
                        xid,
                        commit_lsn,
                        end_lsn,
                        commit_ts,
                        ..
                    } => Ok(Some(Incoming::StreamCommit {
                        xid,
                        commit_lsn,
                        end_lsn,
                        commit_ts,
                    })),
                };
                match handled {
                    Ok(Some(incoming)) => incoming,
                    // Spooled: source transactions whose local commit waits
                    // are not held open through a streamed block.
                    Ok(None) if applier.group_pending().is_some() => Incoming::CommitGroup,
                    Ok(None) => continue,
                    Err(e) => {
                        applier.abort();
                        return Err(Stop::Source(format!(
                            "{e} (at {})",
                            crate::lsn::format_lsn(wal_start)
                        )));
                    }
                }
            }
            Some(Event::KeepAlive { wal_end }) => Incoming::KeepAlive(wal_end),
        };
        // Source transactions whose local commit was deferred are committed
        // before anything but the next transaction's BEGIN is handled.
        let group_first = applier.group_pending().is_some()
            && !matches!(
                incoming,
                Incoming::Message(Message::Begin { .. }, _) | Incoming::CommitGroup
            );
        let queue = [group_first.then_some(Incoming::CommitGroup), Some(incoming)];
        for incoming in queue.into_iter().flatten() {
            // Set when a committed streamed transaction cannot be read back.
            let mut spool_failed: Option<SpoolError> = None;
            // Set when a stop request interrupts the apply of one.
            let mut replay_stopped = false;
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
                    // With a backlog buffered, the local commit waits for more
                    // source transactions (bounded in number and time).
                    let group = applier.group_size().map_or((0, Duration::ZERO), |g| g);
                    if client.has_buffered()
                        && group.0 + 1 < gucs::max_transactions_per_commit()
                        && group.1 < GROUP_MAX_WAIT
                    {
                        applier.defer_commit(commit_lsn, end_lsn, commit_ts);
                        return None;
                    }
                    let local_end = applier.commit(commit_lsn, end_lsn, commit_ts);
                    Some(Progress::Committed {
                        remote_end: end_lsn,
                        local_end,
                    })
                }
                Incoming::CommitGroup => {
                    applier
                        .commit_group()
                        .map(|(remote_end, local_end)| Progress::Committed {
                            remote_end,
                            local_end,
                        })
                }
                Incoming::Message(msg, wal_start) => {
                    applier.apply(msg, wal_start);
                    None
                }
                Incoming::StreamCommit {
                    xid,
                    commit_lsn,
                    end_lsn,
                    commit_ts,
                } => {
                    // The spooled transaction, applied in one local
                    // transaction exactly as if it had come between Begin
                    // and Commit.
                    slot.set_state(State::Executing);
                    let replay = match spool.replay(xid) {
                        Ok(r) => r,
                        Err(e) => {
                            spool_failed = Some(e);
                            return None;
                        }
                    };
                    applier.begin(commit_lsn, xid, commit_ts);
                    for (n, rec) in replay.enumerate() {
                        // A large one does not hold up a stop request: what
                        // was applied of it is rolled back.
                        if n % 1024 == 1023 && crate::control::worker::stopping() {
                            replay_stopped = true;
                            return None;
                        }
                        let msg = rec.and_then(|(wal_start, raw)| {
                            match decode::decode_streamed(&raw, true) {
                                Ok(Decoded::Message { msg, .. }) => Ok((msg, wal_start)),
                                Ok(other) => Err(SpoolError::Io(format!(
                                    "a spooled message of transaction {xid} is {other:?}"
                                ))),
                                Err(e) => Err(SpoolError::Io(format!(
                                    "a spooled message of transaction {xid} does not decode: {e}"
                                ))),
                            }
                        });
                        match msg {
                            Ok((msg, wal_start)) => applier.apply(msg, wal_start),
                            Err(e) => {
                                spool_failed = Some(e);
                                return None;
                            }
                        }
                    }
                    let local_end = applier.commit(commit_lsn, end_lsn, commit_ts);
                    if let Err(e) = spool.finish(xid) {
                        spool_failed = Some(e);
                    }
                    Some(Progress::Committed {
                        remote_end: end_lsn,
                        local_end,
                    })
                }
                Incoming::KeepAlive(wal_end) => {
                    if !applier.in_transaction() {
                        Some(Progress::Idle(wal_end))
                    } else {
                        None
                    }
                }
            });
            if replay_stopped {
                applier.abort();
                return Ok(());
            }
            if let Some(e) = spool_failed {
                // What of it was applied is rolled back; the source sends
                // it again from its start.
                applier.abort();
                return Err(Stop::Source(e.to_string()));
            }
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
                    // Not while a streamed transaction is spooled: nothing
                    // past the last applied commit is confirmed then.
                    if let Some(lsn) = flush.durable(local_flush_lsn()) {
                        client.update_applied_lsn(lsn);
                    }
                    if flush.is_empty() && spool.is_empty() {
                        client.update_applied_lsn(wal_end);
                        let end = wal_end;
                        slot.stats(|s| {
                            s.received_lsn = s.received_lsn.max(end);
                            s.applied_lsn = s.applied_lsn.max(end);
                        });
                    }
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
                    if e.contains(crate::apply::relcache::APPLY_AGAIN) {
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
}

/// Marks a table for a fresh copy at the next attempt (under a new
/// snapshot, with its own sync LSN: the stream skips what the copy holds),
/// into the same destination table.
pub(super) fn resync_table(
    ctx: &WorkerContext,
    table: &TableRef,
    target: &TableTarget,
) -> Result<(), Stop> {
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

pub(super) fn now_usec() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Publishes a commit: the position, stage and state, and what the applier
/// counted since the last call, in the connector's shared-memory slot.
pub(super) fn publish_stats(
    slot: crate::control::shmem::WorkerSlot,
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
        s.batches += 1;
        s.batch_begin_ts = if s.batch_open_ts != 0 {
            s.batch_open_ts
        } else {
            now
        };
        s.batch_open_ts = 0;
        s.applied_lsn = s.applied_lsn.max(remote_end);
        s.received_lsn = s.received_lsn.max(remote_end);
    });
    *published = c.clone();
}

/// What one stream event brings to the applier.
pub(super) enum Incoming {
    /// A decoded pgoutput message and where it starts in the WAL.
    Message(Message, u64),
    /// A keepalive: the server has sent everything before this position.
    KeepAlive(u64),
    /// Commit the source transactions whose local commit was deferred.
    CommitGroup,
    /// A streamed transaction committed: its spooled changes are applied.
    StreamCommit {
        xid: u32,
        commit_lsn: u64,
        end_lsn: u64,
        commit_ts: i64,
    },
}

/// The longest a source transaction's local commit is deferred while a
/// backlog is applied (see `Applier::defer_commit`).
const GROUP_MAX_WAIT: Duration = Duration::from_millis(20);

/// What handling one replication event achieved.
pub(super) enum Progress {
    /// A remote transaction ending at `remote_end` committed locally, its
    /// commit record ending at `local_end`.
    Committed { remote_end: u64, local_end: u64 },
    /// A keepalive arrived between transactions.
    Idle(u64),
}

pub(super) fn local_flush_lsn() -> u64 {
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
pub(super) struct LiveCatalog<'r> {
    pub(super) rt: &'r tokio::runtime::Runtime,
    pub(super) client: tokio_postgres::Client,
}

pub(super) fn stop_text(s: Stop) -> String {
    match s {
        Stop::Shutdown | Stop::Restart | Stop::Reviewed => "the connector is stopping".into(),
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
    use super::{plugin_options, FlushTracker};

    #[test]
    fn streaming_from_14_on() {
        assert_eq!(
            plugin_options("p\"ub", 130012),
            "proto_version '1', publication_names '\"p\"\"ub\"'"
        );
        for v in [140000, 150004, 160000, 180000] {
            assert_eq!(
                plugin_options("pub", v),
                "proto_version '2', streaming 'on', publication_names '\"pub\"'"
            );
        }
    }

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
