//! Parallel copy of one large table: its pages are split into ctid ranges
//! (`synchdb.snapshot_parallelism` of them), the connector's worker copies
//! the first and short-lived copy workers (dynamic background workers, each
//! with its own source connection) copy the others, all under the one
//! snapshot the connector exported, so together they are exactly the rows
//! of that snapshot. Each range is a row of `synchdb_copy_range`, marked
//! done in the same destination transaction as its rows: a range whose
//! worker failed is redone (by another worker or the connector's own)
//! while the snapshot lives; the table becomes ready — primary key and
//! indexes built, position recorded — only in the transaction that finds
//! every range done. An interrupted copy leaves the table not ready: the
//! next start copies it again, whole, under a new snapshot (the ranges
//! already copied belong to a snapshot that is gone).
//!
//! Only for plain tables without inheritance children on sources from 14 (a TID range scan reads just
//! the range; before 14 each range would read the whole table), larger
//! than `synchdb.snapshot_parallel_min_size`, without transforms.

use super::*;
use crate::control::worker::stopping;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker,
    SignalWakeFlags,
};

/// One range of pages of the table: `[first, end)`, the last open-ended.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PageRange {
    pub(super) first: i64,
    pub(super) end: Option<i64>,
}

/// Splits `pages` pages into `n` ranges of about equal size; the last is
/// open-ended (rows of the snapshot are never beyond the size read inside
/// it, but nothing is lost if they were).
pub(super) fn split_pages(pages: i64, n: usize) -> Vec<PageRange> {
    let n = i64::try_from(n.max(1)).unwrap_or(1).min(pages.max(1));
    let step = (pages.max(1) + n - 1) / n;
    (0..n)
        .map(|i| PageRange {
            first: i * step,
            end: (i + 1 < n).then_some((i + 1) * step),
        })
        .collect()
}

/// A `COPY ... TO STDOUT` statement asking for the binary format.
pub(super) fn binary_format(copy_sql: &str) -> String {
    format!("{copy_sql} (FORMAT binary)")
}

/// The source query of one range.
pub(super) fn range_query(schema: &str, table: &str, cols: &[&str], r: &PageRange) -> String {
    let names: Vec<String> = cols.iter().map(|c| sqlgen::quote_ident(c)).collect();
    let mut q = format!(
        "COPY (SELECT {} FROM ONLY {} WHERE ctid >= '({},0)'::tid",
        names.join(", "),
        sqlgen::qualified(schema, table),
        r.first
    );
    if let Some(end) = r.end {
        q.push_str(&format!(" AND ctid < '({end},0)'::tid"));
    }
    q.push_str(") TO STDOUT");
    q
}

/// Whether `shape` is copied in ranges, and how many pages it has. Asked
/// inside the snapshot's transaction.
pub(super) fn pages_for_parallel(
    rt: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
    shape: &SourceTable,
) -> Result<Option<i64>, Stop> {
    if gucs::snapshot_parallelism() < 2 || source::server_version() < 140000 {
        return Ok(None);
    }
    let row = block(
        rt,
        client.query_opt(
            "SELECT pg_catalog.pg_relation_size(c.oid),
                    pg_catalog.current_setting('block_size')::bigint
               FROM pg_catalog.pg_class c
              WHERE c.oid = $1 AND c.relkind = 'r' AND NOT c.relhassubclass",
            &[&shape.oid],
        ),
    )?
    .map_err(SourceError::from_pg)?;
    let Some(row) = row else { return Ok(None) };
    let (bytes, block_size): (i64, i64) = match (row.try_get(0), row.try_get(1)) {
        (Ok(b), Ok(s)) if s > 0 => (b, s),
        _ => return Ok(None),
    };
    Ok((bytes >= gucs::snapshot_parallel_min_bytes()).then_some(bytes / block_size + 1))
}

/// What one range copies, as stored in `synchdb_copy_range`.
pub(super) struct RangeTask<'a> {
    pub(super) binary: bool,
    pub(super) connector: &'a str,
    pub(super) snapshot: &'a str,
    pub(super) src: &'a TableRef,
    pub(super) src_cols: &'a [String],
    pub(super) dst_schema: &'a str,
    pub(super) dst_table: &'a str,
    pub(super) cols: &'a [String],
}

thread_local! {
    static NEXT_RANGE_ID: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

/// Records the ranges of a table (after forgetting older ones of the
/// connector: they belong to a snapshot that is gone) and returns their
/// ids. The ids are new for every table copy (they start from the worker's
/// process id and count up), so a copy worker that starts late, after its
/// table was finished without it, finds no range of its own and ends.
/// Committed before any worker starts.
pub(super) fn record_ranges(
    task: &RangeTask<'_>,
    ranges: &[PageRange],
) -> Result<Vec<i32>, String> {
    let n = i32::try_from(ranges.len()).unwrap_or(i32::MAX);
    let base = NEXT_RANGE_ID.with(|c| {
        let mut b = c.get();
        if b == 0 {
            b = unsafe { pg_sys::MyProcPid }.rem_euclid(1 << 20) << 10;
        }
        c.set(b.wrapping_add(n).rem_euclid(i32::MAX - 4096).max(1));
        b
    });
    let ids: Vec<i32> = (0..n).map(|i| base.wrapping_add(i)).collect();
    pgtxn::run(|| {
        Spi::run_with_args(
            "DELETE FROM public.synchdb_copy_range WHERE name = $1",
            &[task.connector.into()],
        )?;
        for (id, r) in ids.iter().zip(ranges) {
            Spi::run_with_args(
                "INSERT INTO public.synchdb_copy_range
                   (name, id, snapshot, src_schema, src_table, src_columns,
                    dst_schema, dst_table, dst_columns, first_page, end_page, binary_rows)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                &[
                    task.connector.into(),
                    (*id).into(),
                    task.snapshot.into(),
                    task.src.schema.as_str().into(),
                    task.src.table.as_str().into(),
                    task.src_cols.to_vec().into(),
                    task.dst_schema.into(),
                    task.dst_table.into(),
                    task.cols.to_vec().into(),
                    r.first.into(),
                    r.end.into(),
                    task.binary.into(),
                ],
            )?;
        }
        Ok::<(), pgrx::spi::SpiError>(())
    })?
    .map_err(|e| e.to_string())?;
    Ok(ids)
}

/// Forgets the connector's ranges (in the caller's transaction).
pub(super) fn forget_ranges(connector: &str) {
    if let Err(e) = Spi::run_with_args(
        "DELETE FROM public.synchdb_copy_range WHERE name = $1",
        &[connector.into()],
    ) {
        pgrx::error!("forgetting the copied ranges: {e}");
    }
}

/// The copy workers of one table; terminated when dropped (the connector
/// stops or fails), so none outlives the copy it belongs to.
pub(super) struct Crew {
    workers: Vec<(i32, DynamicBackgroundWorker)>,
}

impl Drop for Crew {
    fn drop(&mut self) {
        for (_, w) in self.workers.drain(..) {
            let _ = w.terminate();
        }
    }
}

impl Crew {
    /// Starts a copy worker for each range id in `ids`; a range no worker
    /// could be started for (no free background worker slot) is left to
    /// the connector's own worker.
    pub(super) fn start(connector: &str, ids: &[i32]) -> Crew {
        let mut workers = Vec::new();
        for id in ids {
            let builder = BackgroundWorkerBuilder::new("synchdb copy")
                .set_type("synchdb copy")
                .set_library("synchdb")
                .set_function("synchdb_copy_main")
                .enable_shmem_access(None)
                .enable_spi_access()
                .set_restart_time(None)
                .set_argument(Some(pg_sys::Datum::from(u32::from(
                    crate::control::api::my_database(),
                ))))
                .set_extra(&format!("{id}:{connector}"))
                .set_notify_pid(unsafe { pg_sys::MyProcPid });
            match builder.load_dynamic() {
                Ok(w) => workers.push((*id, w)),
                Err(_) => pgrx::log!(
                    "synchdb: connector \"{connector}\": no background worker slot for copy range {id}; copied by the connector itself"
                ),
            }
        }
        Crew { workers }
    }

    /// Range ids whose worker has exited (for whatever reason).
    pub(super) fn exited(&mut self) -> Vec<i32> {
        let mut out = Vec::new();
        self.workers.retain(|(id, w)| {
            // Not yet started is still on its way: only a stopped worker
            // (or none at all, the postmaster gone) has let its range go.
            let gone = matches!(
                w.pid(),
                Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied)
            );
            if gone {
                out.push(*id);
                false
            } else {
                true
            }
        });
        out
    }

    /// Whether a worker was started for range `id` and has not exited.
    pub(super) fn has(&self, id: i32) -> bool {
        self.workers.iter().any(|(i, _)| *i == id)
    }
}

/// Most bytes of COPY rows handed to the destination's COPY at once.
pub(super) const FEED_BATCH: usize = 64 * 1024;

/// In the table's final transaction: copies range 0 and every range no
/// worker took, waits for the workers, and copies here again a range whose
/// worker exited without finishing it. Returns the rows of all ranges;
/// raises an ERROR when a range cannot be copied.
pub(super) fn finish_ranges(
    rt: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
    connector: &str,
    crew: &mut Crew,
    on_batch: &mut dyn FnMut(u64, u64),
) -> u64 {
    let states = range_states(connector);
    let first = states.first().map(|(id, ..)| *id);
    let here: Vec<i32> = states
        .into_iter()
        .map(|(id, ..)| id)
        .filter(|id| Some(*id) == first || !crew.has(*id))
        .collect();
    for id in here {
        if let Err(e) = copy_range(rt, client, connector, id, on_batch) {
            pgrx::error!("{e}");
        }
    }
    loop {
        if stopping() {
            pgrx::error!("the connector is stopping");
        }
        let exited = crew.exited();
        // The workers' commits are seen through a fresh snapshot.
        unsafe {
            if pg_sys::ActiveSnapshotSet() {
                pg_sys::PopActiveSnapshot();
            }
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        }
        let states = range_states(connector);
        let mut redo = Vec::new();
        for (id, done, _, err) in &states {
            if !done && exited.contains(id) {
                pgrx::log!(
                    "synchdb: connector \"{connector}\": copy range {id} is copied again ({})",
                    err.as_deref().unwrap_or("its worker exited")
                );
                redo.push(*id);
            }
        }
        // Read again only when this process has just marked ranges done.
        let states = if redo.is_empty() {
            states
        } else {
            for id in redo {
                if let Err(e) = copy_range(rt, client, connector, id, on_batch) {
                    pgrx::error!("{e}");
                }
            }
            range_states(connector)
        };
        if states.iter().all(|(_, done, ..)| *done) {
            return states
                .iter()
                .map(|(_, _, n, _)| u64::try_from(*n).unwrap_or(0))
                .sum();
        }
        BackgroundWorker::wait_latch(Some(std::time::Duration::from_millis(50)));
    }
}

/// State of the ranges of the connector: (id, done, rows, err).
pub(super) fn range_states(connector: &str) -> Vec<(i32, bool, i64, Option<String>)> {
    Spi::connect(|c| {
        let mut out = Vec::new();
        let rows = c.select(
            "SELECT id, done, coalesce(rows, 0), err FROM public.synchdb_copy_range
              WHERE name = $1 ORDER BY id",
            None,
            &[connector.into()],
        );
        if let Ok(rows) = rows {
            for r in rows {
                let id: Option<i32> = r.get(1).ok().flatten();
                let done: Option<bool> = r.get(2).ok().flatten();
                let n: Option<i64> = r.get(3).ok().flatten();
                let err: Option<String> = r.get(4).ok().flatten();
                if let Some(id) = id {
                    out.push((id, done.unwrap_or(false), n.unwrap_or(0), err));
                }
            }
        }
        out
    })
}

/// Copies range `id` of the connector in the current transaction and marks
/// it done there; returns the rows copied.
pub(super) fn copy_range(
    rt: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
    connector: &str,
    id: i32,
    on_batch: &mut dyn FnMut(u64, u64),
) -> Result<u64, String> {
    let row = Spi::connect(|c| {
        c.select(
            "SELECT src_schema, src_table, src_columns, dst_schema, dst_table, dst_columns,
                    first_page, end_page, binary_rows
               FROM public.synchdb_copy_range WHERE name = $1 AND id = $2",
            None,
            &[connector.into(), id.into()],
        )
        .ok()
        .and_then(|rows| rows.into_iter().next())
        .map(|r| {
            (
                r.get::<String>(1).ok().flatten().unwrap_or_default(),
                r.get::<String>(2).ok().flatten().unwrap_or_default(),
                r.get::<Vec<String>>(3).ok().flatten().unwrap_or_default(),
                r.get::<String>(4).ok().flatten().unwrap_or_default(),
                r.get::<String>(5).ok().flatten().unwrap_or_default(),
                r.get::<Vec<String>>(6).ok().flatten().unwrap_or_default(),
                r.get::<i64>(7).ok().flatten().unwrap_or(0),
                r.get::<i64>(8).ok().flatten(),
                r.get::<bool>(9).ok().flatten().unwrap_or(false),
            )
        })
    });
    let Some((s_schema, s_table, s_cols, d_schema, d_table, d_cols, first, end, binary)) = row
    else {
        return Err(format!(
            "copy range {id} of connector \"{connector}\" is not recorded"
        ));
    };
    let refs: Vec<&str> = s_cols.iter().map(|s| s.as_str()).collect();
    let sql = range_query(&s_schema, &s_table, &refs, &PageRange { first, end });
    let sql = if binary { binary_format(&sql) } else { sql };
    let mut feed_state = BatchedFeed::open(rt, client, &sql)
        .map_err(stop_text)?
        .map_err(|e| source::describe_pg_error(&e))?;
    let mut feed = || feed_state.next(rt, on_batch);
    let opts = crate::apply::applier::CopyOptions {
        freeze: false,
        binary,
    };
    let n = crate::apply::applier::copy_into(&d_schema, &d_table, &d_cols, opts, &mut feed);
    // Exactly this range marked done, or the rows go back (an ERROR).
    let marked = Spi::get_one_with_args::<i32>(
        "UPDATE public.synchdb_copy_range SET done = true, rows = $3, err = NULL
          WHERE name = $1 AND id = $2 AND NOT done RETURNING id",
        &[
            connector.into(),
            id.into(),
            i64::try_from(n).unwrap_or(i64::MAX).into(),
        ],
    );
    if !matches!(marked, Ok(Some(m)) if m == id) {
        pgrx::error!("copy range {id} of connector \"{connector}\" is no longer recorded");
    }
    Ok(n)
}

/// COPY rows from the source, handed to the destination's COPY in batches:
/// the source sends one CopyData message per row, so the rows already
/// received go together (up to `FEED_BATCH` bytes), and the runtime is
/// entered only to wait for more.
pub(super) struct BatchedFeed {
    stream: std::pin::Pin<Box<tokio_postgres::CopyOutStream>>,
    ended: bool,
}

impl BatchedFeed {
    /// Starts `sql`, a COPY ... TO STDOUT, on `client`.
    pub(super) fn open(
        rt: &tokio::runtime::Runtime,
        client: &tokio_postgres::Client,
        sql: &str,
    ) -> Result<Result<Self, tokio_postgres::Error>, Stop> {
        Ok(block(rt, client.copy_out(sql))?.map(|stream| BatchedFeed {
            stream: Box::pin(stream),
            ended: false,
        }))
    }

    /// The next batch (None at the end); `on_batch(rows, bytes)` is told
    /// of each.
    pub(super) fn next(
        &mut self,
        rt: &tokio::runtime::Runtime,
        on_batch: &mut dyn FnMut(u64, u64),
    ) -> Result<Option<bytes::Bytes>, String> {
        if stopping() {
            return Err("the connector is stopping".into());
        }
        if self.ended {
            return Ok(None);
        }
        let first = match futures_util::FutureExt::now_or_never(self.stream.next()) {
            Some(r) => r,
            None => block(rt, self.stream.next())
                .map_err(|_| "the connector is stopping".to_string())?,
        };
        let first = match first {
            None => {
                self.ended = true;
                return Ok(None);
            }
            Some(Ok(b)) => b,
            Some(Err(e)) => return Err(source::describe_pg_error(&e)),
        };
        let mut batch = bytes::BytesMut::new();
        // PostgreSQL sends one row per CopyData message, in either format.
        let mut rows = 1;
        while batch.len().max(first.len()) < FEED_BATCH {
            match futures_util::FutureExt::now_or_never(self.stream.next()) {
                Some(Some(Ok(b))) => {
                    if batch.is_empty() {
                        batch.reserve(FEED_BATCH + first.len());
                        batch.extend_from_slice(&first);
                    }
                    rows += 1;
                    batch.extend_from_slice(&b);
                }
                Some(Some(Err(e))) => return Err(source::describe_pg_error(&e)),
                Some(None) => {
                    self.ended = true;
                    break;
                }
                None => break,
            }
        }
        let out = if batch.is_empty() {
            first
        } else {
            batch.freeze()
        };
        on_batch(rows, out.len() as u64);
        Ok(Some(out))
    }
}

/// Entry point of a copy worker: `extra` is `<range id>:<connector>`.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn synchdb_copy_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let dboid = pg_sys::Oid::from(arg.value() as u32);
    let extra = BackgroundWorker::get_extra().to_string();
    let Some((id, connector)) = extra
        .split_once(':')
        .and_then(|(i, n)| Some((i.parse::<i32>().ok()?, n.to_string())))
    else {
        pgrx::log!("synchdb: copy worker started with malformed arguments");
        return;
    };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(dboid), None);
    // The connector's own session settings: text is read as it was written.
    let result = if crate::control::worker::apply_session_settings() {
        copy_worker(&connector, id)
    } else {
        Err("could not apply the session settings".into())
    };
    if let Err(e) = result {
        pgrx::log!("synchdb: connector \"{connector}\": copy range {id} failed: {e}");
        let _ = pgtxn::run(|| {
            Spi::run_with_args(
                "UPDATE public.synchdb_copy_range SET err = $3 WHERE name = $1 AND id = $2",
                &[connector.as_str().into(), id.into(), e.as_str().into()],
            )
        });
    }
}

fn copy_worker(connector: &str, id: i32) -> Result<(), String> {
    let info = load(connector)
        .map_err(stop_text)?
        .ok_or_else(|| format!("connector \"{connector}\" is gone"))?;
    let snapshot: Option<String> = pgtxn::run(|| {
        Spi::get_one_with_args::<String>(
            "SELECT snapshot FROM public.synchdb_copy_range WHERE name = $1 AND id = $2",
            &[connector.into(), id.into()],
        )
        .ok()
        .flatten()
    })?;
    let snapshot = snapshot.ok_or_else(|| format!("copy range {id} is not recorded"))?;
    let rt = source::runtime().map_err(|e| e.to_string())?;
    let client = block(&rt, source::connect(&info))
        .map_err(stop_text)?
        .map_err(|e| e.to_string())?;
    block(
        &rt,
        client.batch_execute(&format!(
            "{}; SET LOCAL lock_timeout = '1s'",
            source::begin_in_snapshot(&snapshot)
        )),
    )
    .map_err(stop_text)?
    .map_err(|e| source::describe_pg_error(&e))?;
    // The lock timeout: the connector's own snapshot transaction holds the
    // table's lock, but a request queued behind it (an ALTER TABLE on the
    // source waiting for the snapshot to end) would make this worker wait
    // for ever while the connector waits for this worker. The worker gives
    // up instead, and the connector copies the range itself.
    // Nor does it wait for the destination table's lock behind another
    // session's request queued behind the connector's lock: it gives up,
    // and the connector (which holds the lock) copies the range.
    let n = pgtxn::run(|| {
        if let Err(e) = Spi::run("SET LOCAL lock_timeout = '1s'") {
            pgrx::error!("{e}");
        }
        // An Err after rows were written must not commit them: raised.
        match copy_range(&rt, &client, connector, id, &mut |_, _| {}) {
            Ok(n) => n,
            Err(e) => pgrx::error!("{e}"),
        }
    })?;
    pgrx::log!("synchdb: connector \"{connector}\": copy range {id} copied {n} rows");
    let _ = block(&rt, client.batch_execute("COMMIT"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_split_into_ranges_that_cover_everything() {
        let r = split_pages(1000, 3);
        assert_eq!(r.len(), 3);
        assert_eq!(
            r[0],
            PageRange {
                first: 0,
                end: Some(334)
            }
        );
        assert_eq!(
            r[1],
            PageRange {
                first: 334,
                end: Some(668)
            }
        );
        assert_eq!(
            r[2],
            PageRange {
                first: 668,
                end: None
            }
        );
        // Fewer pages than ranges: one range per page at most.
        assert_eq!(split_pages(2, 8).len(), 2);
        // Degenerate inputs still give one open range.
        assert_eq!(
            split_pages(0, 4),
            vec![PageRange {
                first: 0,
                end: None
            }]
        );
        assert_eq!(
            split_pages(-5, 0),
            vec![PageRange {
                first: 0,
                end: None
            }]
        );
    }

    #[test]
    fn range_queries_quote_names_and_bound_ctids() {
        let q = range_query(
            "s\"x",
            "t",
            &["a", "B"],
            &PageRange {
                first: 10,
                end: Some(20),
            },
        );
        assert_eq!(
            q,
            "COPY (SELECT \"a\", \"B\" FROM ONLY \"s\"\"x\".\"t\" WHERE ctid >= '(10,0)'::tid AND ctid < '(20,0)'::tid) TO STDOUT"
        );
        let q = range_query(
            "s",
            "t",
            &["a"],
            &PageRange {
                first: 5,
                end: None,
            },
        );
        assert!(q.ends_with("WHERE ctid >= '(5,0)'::tid) TO STDOUT"), "{q}");
    }
}
