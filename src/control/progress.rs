//! Live progress of a connector's initial copy, per table and in total:
//! rows and bytes copied so far against the estimate read from the source
//! when the copy started, with rate and ETA (`synchdb_snapshot_progress`,
//! `synchdb_snapshot_progress_total`). A table's copy commits only when it is
//! done, so its progress cannot come from the catalog: the copy path writes
//! it here, into a shared-memory segment of its own with one block per
//! connector slot (indexed like `shmem`'s slots).
//!
//! The API is made for several copies at once (several tables, and ctid
//! ranges of one table, from threads of the worker or from other processes):
//! counters are atomics written without a lock; the rest of a block is
//! guarded by a spinlock held for a few plain stores (no allocation, no
//! PostgreSQL call under it). [`begin_snapshot`] and [`SnapshotProgress`]'s
//! `finish` / drop belong to the worker's main thread (they also stamp the
//! connector's statistics); [`Tables`], [`Tables::table_started`],
//! [`Copying::add`] and [`Tables::table_done`] may be used from any thread.
//!
//! A block keeps up to [`MAX_TABLES`] tables; a copy of more tables shows the
//! pending ones beyond that only in the total, and a table that starts
//! takes the place of the oldest finished one. Copying tables always have a
//! row unless more than [`MAX_TABLES`] copy at the same time.

use crate::control::shmem::WorkerSlot;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::UnsafeCell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Tables one connector's block shows at a time.
pub const MAX_TABLES: usize = 64;
const NAME_LEN: usize = 64;
/// How often a copy publishes its counts (at most).
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
const SEGMENT: &CStr = c"synchdb snapshot progress";

/// Where a table (or the whole copy) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CopyState {
    Free = 0,
    Pending = 1,
    Copying = 2,
    Done = 3,
    /// The copy stopped before this table was done (error, restart, stop);
    /// the next attempt copies it again from the start.
    Interrupted = 4,
}

impl CopyState {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyState::Free => "",
            CopyState::Pending => "pending",
            CopyState::Copying => "copying",
            CopyState::Done => "done",
            CopyState::Interrupted => "interrupted",
        }
    }
}

/// One table to copy and what the source said about its size when the copy
/// started (`reltuples` scaled to the current size; the table's size on
/// disk), 0 when unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableEstimate {
    pub schema: String,
    pub table: String,
    pub rows: u64,
    pub bytes: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct EntryMeta {
    /// Unique in the block (never reused): ties counters and handles to
    /// this use of the entry.
    tag: u64,
    state: CopyState,
    /// Copies (ranges) of this table running now.
    parts: u32,
    schema: [u8; NAME_LEN],
    table: [u8; NAME_LEN],
    rows_est: u64,
    bytes_est: u64,
    started_us: i64,
    finished_us: i64,
}

#[repr(C)]
struct Meta {
    /// The copy this block describes; 0 before the first one.
    run: u64,
    next_tag: u64,
    dboid: pg_sys::Oid,
    name: [u8; NAME_LEN],
    state: CopyState,
    tables_total: u64,
    tables_done: u64,
    rows_est: u64,
    bytes_est: u64,
    started_us: i64,
    finished_us: i64,
    entries: [EntryMeta; MAX_TABLES],
}

#[repr(C)]
struct Counter {
    tag: AtomicU64,
    rows: AtomicU64,
    bytes: AtomicU64,
}

#[repr(C)]
struct Block {
    lock: AtomicU32,
    /// `meta.run`, readable without the lock.
    run: AtomicU64,
    rows: AtomicU64,
    bytes: AtomicU64,
    /// Written only with `lock` held.
    meta: UnsafeCell<Meta>,
    counters: [Counter; MAX_TABLES],
}

static BLOCKS: AtomicPtr<Block> = AtomicPtr::new(std::ptr::null_mut());
static NBLOCKS: AtomicUsize = AtomicUsize::new(0);
static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

fn segment_size(n: usize) -> usize {
    n * std::mem::size_of::<Block>()
}

/// Installs the shared-memory hooks; called from `_PG_init` while preloading.
pub fn init() {
    unsafe {
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    unsafe {
        if let Some(prev) = PREV_REQUEST_HOOK {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(segment_size(crate::control::gucs::max_connectors()));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    unsafe {
        if let Some(prev) = PREV_STARTUP_HOOK {
            prev();
        }
        let n = crate::control::gucs::max_connectors();
        // AddinShmemInitLock is a macro in C: slot 21 of the main LWLock array.
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let base = pg_sys::ShmemInitStruct(SEGMENT.as_ptr(), segment_size(n), &mut found);
        if !found {
            // All zero is a valid block: unlocked, no copy yet, free entries.
            std::ptr::write_bytes(base as *mut u8, 0, segment_size(n));
        }
        BLOCKS.store(base as *mut Block, Ordering::Release);
        NBLOCKS.store(n, Ordering::Release);
        pg_sys::LWLockRelease(init_lock);
    }
}

fn block(idx: usize) -> Option<&'static Block> {
    let base = BLOCKS.load(Ordering::Acquire);
    if base.is_null() || idx >= NBLOCKS.load(Ordering::Acquire) {
        return None;
    }
    // SAFETY: the segment lives as long as the server and holds NBLOCKS
    // blocks; everything in a block is atomic or behind its lock.
    Some(unsafe { &*base.add(idx) })
}

impl Block {
    /// Runs `f` with the block's lock held. `f` must not allocate or call
    /// into PostgreSQL (it may run in any thread, and nothing may fail with
    /// the lock held).
    fn locked<R>(&self, f: impl FnOnce(&mut Meta) -> R) -> R {
        let mut spins = 0u32;
        while self
            .lock
            .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: the lock gives exclusive access to `meta`.
        let r = f(unsafe { &mut *self.meta.get() });
        self.lock.store(0, Ordering::Release);
        r
    }
}

fn put_name(dst: &mut [u8; NAME_LEN], s: &str) {
    let mut n = s.len().min(NAME_LEN - 1);
    while n > 0 && !s.is_char_boundary(n) {
        n -= 1;
    }
    dst.fill(0);
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn get_name(stored: &[u8; NAME_LEN]) -> String {
    let end = stored.iter().position(|b| *b == 0).unwrap_or(NAME_LEN);
    String::from_utf8_lossy(&stored[..end]).into_owned()
}

fn now_usec() -> i64 {
    crate::control::stats::now_usec()
}

/// Names fixed-size for use under the lock (no allocation there).
#[derive(Clone, Copy)]
struct Key {
    schema: [u8; NAME_LEN],
    table: [u8; NAME_LEN],
}

impl Key {
    fn new(schema: &str, table: &str) -> Key {
        let mut k = Key {
            schema: [0; NAME_LEN],
            table: [0; NAME_LEN],
        };
        put_name(&mut k.schema, schema);
        put_name(&mut k.table, table);
        k
    }
    fn is(&self, e: &EntryMeta) -> bool {
        e.state != CopyState::Free && e.schema == self.schema && e.table == self.table
    }
}

/// A copy in progress, from [`begin_snapshot`] to `finish` (or drop, which
/// marks what was not done as interrupted).
pub struct SnapshotProgress {
    tables: Tables,
    slot: Option<WorkerSlot>,
    finished: bool,
}

/// The per-table side of a copy in progress: `Copy` and `Send`, for the
/// threads or tasks that copy.
#[derive(Debug, Clone, Copy)]
pub struct Tables {
    idx: usize,
    run: u64,
}

/// Starts the progress of a copy of `tables` for the worker of `slot`
/// (connector `name`): every table pending, the totals of the estimates,
/// and `snapshot_begin_ts` in the connector's statistics. Main thread only.
pub fn begin_snapshot(slot: WorkerSlot, name: &str, tables: &[TableEstimate]) -> SnapshotProgress {
    let now = now_usec();
    slot.stats(|s| {
        s.snapshot_begin_ts = now;
        s.snapshot_end_ts = 0;
    });
    let idx = slot.index();
    let keys: Vec<(Key, u64, u64)> = tables
        .iter()
        .take(MAX_TABLES)
        .map(|t| (Key::new(&t.schema, &t.table), t.rows, t.bytes))
        .collect();
    let rows_est = tables
        .iter()
        .map(|t| t.rows)
        .fold(0u64, u64::saturating_add);
    let bytes_est = tables
        .iter()
        .map(|t| t.bytes)
        .fold(0u64, u64::saturating_add);
    let mut conn_name = [0u8; NAME_LEN];
    put_name(&mut conn_name, name);
    let dboid = unsafe { pg_sys::MyDatabaseId };
    let run = match block(idx) {
        None => 0,
        Some(b) => b.locked(|m| {
            m.run += 1;
            m.dboid = dboid;
            m.name = conn_name;
            m.state = CopyState::Copying;
            m.tables_total = tables.len() as u64;
            m.tables_done = 0;
            m.rows_est = rows_est;
            m.bytes_est = bytes_est;
            m.started_us = now;
            m.finished_us = 0;
            b.rows.store(0, Ordering::Relaxed);
            b.bytes.store(0, Ordering::Relaxed);
            for (i, e) in m.entries.iter_mut().enumerate() {
                let c = &b.counters[i];
                c.rows.store(0, Ordering::Relaxed);
                c.bytes.store(0, Ordering::Relaxed);
                match keys.get(i) {
                    Some((k, rows, bytes)) => {
                        m.next_tag += 1;
                        *e = EntryMeta {
                            tag: m.next_tag,
                            state: CopyState::Pending,
                            parts: 0,
                            schema: k.schema,
                            table: k.table,
                            rows_est: *rows,
                            bytes_est: *bytes,
                            started_us: 0,
                            finished_us: 0,
                        };
                        c.tag.store(m.next_tag, Ordering::Relaxed);
                    }
                    None => {
                        e.state = CopyState::Free;
                        e.tag = 0;
                        c.tag.store(0, Ordering::Relaxed);
                    }
                }
            }
            b.run.store(m.run, Ordering::Release);
            m.run
        }),
    };
    SnapshotProgress {
        tables: Tables { idx, run },
        slot: Some(slot),
        finished: false,
    }
}

impl SnapshotProgress {
    /// The per-table handle (for other threads too).
    pub fn tables(&self) -> Tables {
        self.tables
    }

    pub fn table_started(&self, t: &TableEstimate) -> Copying {
        self.tables.table_started(t)
    }

    pub fn table_done(&self, schema: &str, table: &str, rows: u64) {
        self.tables.table_done(schema, table, rows)
    }

    /// Ends the copy: done when `ok` (and `snapshot_end_ts` stamped), else
    /// every table not done is interrupted. Main thread only.
    pub fn finish(mut self, ok: bool) {
        self.end(ok);
    }

    fn end(&mut self, ok: bool) {
        if self.finished {
            return;
        }
        self.finished = true;
        let now = now_usec();
        let run = self.tables.run;
        if let Some(b) = block(self.tables.idx) {
            b.locked(|m| {
                if m.run != run {
                    return;
                }
                m.finished_us = now;
                m.state = if ok {
                    CopyState::Done
                } else {
                    CopyState::Interrupted
                };
                for e in m.entries.iter_mut() {
                    if matches!(e.state, CopyState::Pending | CopyState::Copying) {
                        e.state = CopyState::Interrupted;
                        e.parts = 0;
                        if e.started_us != 0 {
                            e.finished_us = now;
                        }
                    }
                }
            });
        }
        if ok {
            if let Some(slot) = self.slot {
                slot.stats(|s| s.snapshot_end_ts = now);
            }
        }
    }
}

impl Drop for SnapshotProgress {
    fn drop(&mut self) {
        self.end(false);
    }
}

impl Tables {
    /// A copy of table `t` (or of one range of it: call once per range)
    /// starts. Returns the handle its rows are counted through.
    pub fn table_started(&self, t: &TableEstimate) -> Copying {
        let key = Key::new(&t.schema, &t.table);
        let now = now_usec();
        let run = self.run;
        let (rows_est, bytes_est) = (t.rows, t.bytes);
        let found = block(self.idx).and_then(|b| {
            b.locked(|m| {
                if m.run != run {
                    return None;
                }
                let i = match m.entries.iter().position(|e| key.is(e)) {
                    Some(i) => i,
                    None => {
                        // A table not listed at the start (or beyond the
                        // block's capacity): a free entry, else the oldest
                        // finished one.
                        let i = m
                            .entries
                            .iter()
                            .position(|e| e.state == CopyState::Free)
                            .or_else(|| {
                                m.entries
                                    .iter()
                                    .enumerate()
                                    .filter(|(_, e)| e.state == CopyState::Done)
                                    .min_by_key(|(_, e)| e.tag)
                                    .map(|(i, _)| i)
                            })?;
                        m.next_tag += 1;
                        m.entries[i] = EntryMeta {
                            tag: m.next_tag,
                            state: CopyState::Pending,
                            parts: 0,
                            schema: key.schema,
                            table: key.table,
                            rows_est,
                            bytes_est,
                            started_us: 0,
                            finished_us: 0,
                        };
                        let c = &b.counters[i];
                        c.rows.store(0, Ordering::Relaxed);
                        c.bytes.store(0, Ordering::Relaxed);
                        c.tag.store(m.next_tag, Ordering::Release);
                        i
                    }
                };
                let e = &mut m.entries[i];
                if e.state != CopyState::Copying {
                    e.state = CopyState::Copying;
                    e.started_us = now;
                    e.finished_us = 0;
                }
                e.parts += 1;
                Some((i, e.tag))
            })
        });
        Copying {
            idx: self.idx,
            run,
            entry: found,
            rows: 0,
            bytes: 0,
            last_flush: Instant::now(),
        }
    }

    /// Every copy of `schema.table` is done (committed) with `rows` rows in
    /// all: its count becomes exactly that, its state `done`.
    pub fn table_done(&self, schema: &str, table: &str, rows: u64) {
        let key = Key::new(schema, table);
        let now = now_usec();
        let run = self.run;
        let Some(b) = block(self.idx) else { return };
        b.locked(|m| {
            if m.run != run {
                return;
            }
            m.tables_done += 1;
            if let Some(i) = m.entries.iter().position(|e| key.is(e)) {
                let e = &mut m.entries[i];
                let c = &b.counters[i];
                let before = c.rows.swap(rows, Ordering::AcqRel);
                // The total follows the exact count (wrapping: it may go down).
                if rows >= before {
                    b.rows.fetch_add(rows - before, Ordering::AcqRel);
                } else {
                    b.rows.fetch_sub(before - rows, Ordering::AcqRel);
                }
                e.state = CopyState::Done;
                e.parts = 0;
                e.finished_us = now;
                if e.started_us == 0 {
                    e.started_us = now;
                }
            }
        });
    }
}

/// One running copy of a table (or of one range of it): counts rows and
/// bytes locally and publishes them at most every [`FLUSH_INTERVAL`], and
/// when flushed or dropped. `Send`: it may move to the thread that copies.
#[derive(Debug)]
pub struct Copying {
    idx: usize,
    run: u64,
    /// (entry index, its tag); `None`: counted in the total only.
    entry: Option<(usize, u64)>,
    rows: u64,
    bytes: u64,
    last_flush: Instant,
}

impl Copying {
    /// `rows` rows of `bytes` bytes were copied.
    pub fn add(&mut self, rows: u64, bytes: u64) {
        self.rows += rows;
        self.bytes += bytes;
        if self.last_flush.elapsed() >= FLUSH_INTERVAL {
            self.flush();
        }
    }

    /// Publishes what was counted since the last flush.
    pub fn flush(&mut self) {
        self.last_flush = Instant::now();
        if self.rows == 0 && self.bytes == 0 {
            return;
        }
        let (rows, bytes) = (self.rows, self.bytes);
        self.rows = 0;
        self.bytes = 0;
        let Some(b) = block(self.idx) else { return };
        if b.run.load(Ordering::Acquire) != self.run {
            return;
        }
        b.rows.fetch_add(rows, Ordering::AcqRel);
        b.bytes.fetch_add(bytes, Ordering::AcqRel);
        if let Some((i, tag)) = self.entry {
            let c = &b.counters[i];
            if c.tag.load(Ordering::Acquire) == tag {
                c.rows.fetch_add(rows, Ordering::AcqRel);
                c.bytes.fetch_add(bytes, Ordering::AcqRel);
            }
        }
    }
}

impl Drop for Copying {
    fn drop(&mut self) {
        self.flush();
        let Some((i, tag)) = self.entry else { return };
        let run = self.run;
        if let Some(b) = block(self.idx) {
            b.locked(|m| {
                if m.run != run {
                    return;
                }
                let e = &mut m.entries[i];
                if e.tag == tag && e.parts > 0 {
                    e.parts -= 1;
                }
            });
        }
    }
}

/// Rows (or bytes) per second over `elapsed_us`.
pub fn rate(amount: u64, elapsed_us: i64) -> f64 {
    if elapsed_us <= 0 {
        return 0.0;
    }
    amount as f64 * 1e6 / elapsed_us as f64
}

/// Seconds left at `rate` to reach `estimated` from `copied`; `None` when it
/// cannot be told (no rate yet, or the estimate is already passed).
pub fn eta_secs(copied: u64, estimated: u64, rate: f64) -> Option<f64> {
    if rate <= 0.0 || !rate.is_finite() || estimated <= copied {
        return None;
    }
    Some((estimated - copied) as f64 / rate)
}

/// Rate and ETA of something in `state`, started at `started_us`, finished
/// at `finished_us` (0: not yet), seen at `now_us`.
fn rate_and_eta(
    state: CopyState,
    copied: u64,
    estimated: u64,
    started_us: i64,
    finished_us: i64,
    now_us: i64,
) -> (f64, Option<f64>) {
    if started_us == 0 {
        return (0.0, None);
    }
    let end = if finished_us != 0 {
        finished_us
    } else {
        now_us
    };
    let r = rate(copied, end - started_us);
    let eta = match state {
        CopyState::Done => Some(0.0),
        CopyState::Copying => eta_secs(copied, estimated, r),
        _ => None,
    };
    (r, eta)
}

/// One table's row of `synchdb_snapshot_progress`.
#[derive(Debug, Clone)]
pub struct TableRow {
    pub name: String,
    pub schema: String,
    pub table: String,
    pub state: CopyState,
    pub rows: u64,
    pub bytes: u64,
    pub rows_est: u64,
    pub bytes_est: u64,
    pub started_us: i64,
    pub finished_us: i64,
    pub rows_per_sec: f64,
    pub bytes_per_sec: f64,
    pub eta_secs: Option<f64>,
}

/// One connector's row of `synchdb_snapshot_progress_total`.
#[derive(Debug, Clone)]
pub struct TotalRow {
    pub name: String,
    pub state: CopyState,
    pub tables_total: u64,
    pub tables_pending: u64,
    pub tables_copying: u64,
    pub tables_done: u64,
    pub rows: u64,
    pub bytes: u64,
    pub rows_est: u64,
    pub bytes_est: u64,
    pub started_us: i64,
    pub finished_us: i64,
    pub rows_per_sec: f64,
    pub bytes_per_sec: f64,
    pub eta_secs: Option<f64>,
}

/// The progress of every connector of database `dboid` that copied since
/// the server started.
pub fn read(dboid: pg_sys::Oid) -> (Vec<TotalRow>, Vec<TableRow>) {
    let mut totals = Vec::new();
    let mut tables = Vec::new();
    let now = now_usec();
    for idx in 0..NBLOCKS.load(Ordering::Acquire) {
        let Some(b) = block(idx) else { break };
        if b.run.load(Ordering::Acquire) == 0 {
            continue;
        }
        // Copied under the lock (plain bytes), turned into rows after.
        let mut entries = [(
            EntryMeta {
                tag: 0,
                state: CopyState::Free,
                parts: 0,
                schema: [0; NAME_LEN],
                table: [0; NAME_LEN],
                rows_est: 0,
                bytes_est: 0,
                started_us: 0,
                finished_us: 0,
            },
            0u64,
            0u64,
        ); MAX_TABLES];
        let head = b.locked(|m| {
            if m.dboid != dboid {
                return None;
            }
            for (i, e) in m.entries.iter().enumerate() {
                let c = &b.counters[i];
                entries[i] = (
                    *e,
                    c.rows.load(Ordering::Acquire),
                    c.bytes.load(Ordering::Acquire),
                );
            }
            Some((
                m.name,
                m.state,
                m.tables_total,
                m.tables_done,
                m.rows_est,
                m.bytes_est,
                m.started_us,
                m.finished_us,
                b.rows.load(Ordering::Acquire),
                b.bytes.load(Ordering::Acquire),
            ))
        });
        let Some((name, state, total, done, rows_est, bytes_est, started, finished, rows, bytes)) =
            head
        else {
            continue;
        };
        let name = get_name(&name);
        // The connector of this block is still the one of the slot (not
        // deleted, its slot not taken by another since).
        if crate::control::shmem::find(dboid, &name) != Some(idx) {
            continue;
        }
        let mut live: Vec<_> = entries
            .iter()
            .filter(|(e, _, _)| e.state != CopyState::Free)
            .collect();
        live.sort_by_key(|(e, _, _)| e.tag);
        let copying = live
            .iter()
            .filter(|(e, _, _)| e.state == CopyState::Copying)
            .count() as u64;
        for (e, r, by) in live {
            let (rows_per_sec, eta) =
                rate_and_eta(e.state, *r, e.rows_est, e.started_us, e.finished_us, now);
            let (bytes_per_sec, _) =
                rate_and_eta(e.state, *by, e.bytes_est, e.started_us, e.finished_us, now);
            tables.push(TableRow {
                name: name.clone(),
                schema: get_name(&e.schema),
                table: get_name(&e.table),
                state: e.state,
                rows: *r,
                bytes: *by,
                rows_est: e.rows_est,
                bytes_est: e.bytes_est,
                started_us: e.started_us,
                finished_us: e.finished_us,
                rows_per_sec,
                bytes_per_sec,
                eta_secs: eta,
            });
        }
        let (rows_per_sec, eta) = rate_and_eta(state, rows, rows_est, started, finished, now);
        let (bytes_per_sec, _) = rate_and_eta(state, bytes, bytes_est, started, finished, now);
        let (copying, pending) = if state == CopyState::Copying {
            (copying, total.saturating_sub(done).saturating_sub(copying))
        } else {
            (0, 0)
        };
        totals.push(TotalRow {
            name,
            state,
            tables_total: total,
            tables_pending: pending,
            tables_copying: copying,
            tables_done: done,
            rows,
            bytes,
            rows_est,
            bytes_est,
            started_us: started,
            finished_us: finished,
            rows_per_sec,
            bytes_per_sec,
            eta_secs: eta,
        });
    }
    (totals, tables)
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn ts_of(us: i64) -> Option<i64> {
    (us != 0).then_some(us)
}

/// The rows of `synchdb_snapshot_progress` (timestamps in microseconds
/// since the Unix epoch; the view turns them into timestamptz).
#[pg_extern]
#[allow(clippy::type_complexity)]
pub fn synchdb_snapshot_progress_rows() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(src_schema, String),
        name!(src_table, String),
        name!(state, String),
        name!(rows_copied, i64),
        name!(rows_estimated, i64),
        name!(bytes_copied, i64),
        name!(bytes_estimated, i64),
        name!(rows_per_sec, f64),
        name!(bytes_per_sec, f64),
        name!(eta_secs, Option<f64>),
        name!(started_us, Option<i64>),
        name!(finished_us, Option<i64>),
    ),
> {
    let (_, tables) = read(unsafe { pg_sys::MyDatabaseId });
    TableIterator::new(
        tables
            .into_iter()
            .map(|t| {
                (
                    t.name,
                    t.schema,
                    t.table,
                    t.state.as_str().to_string(),
                    i64_of(t.rows),
                    i64_of(t.rows_est),
                    i64_of(t.bytes),
                    i64_of(t.bytes_est),
                    t.rows_per_sec,
                    t.bytes_per_sec,
                    t.eta_secs,
                    ts_of(t.started_us),
                    ts_of(t.finished_us),
                )
            })
            .collect::<Vec<_>>(),
    )
}

/// The rows of `synchdb_snapshot_progress_total`.
#[pg_extern]
#[allow(clippy::type_complexity)]
pub fn synchdb_snapshot_progress_total_rows() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(state, String),
        name!(tables_total, i64),
        name!(tables_pending, i64),
        name!(tables_copying, i64),
        name!(tables_done, i64),
        name!(rows_copied, i64),
        name!(rows_estimated, i64),
        name!(bytes_copied, i64),
        name!(bytes_estimated, i64),
        name!(rows_per_sec, f64),
        name!(bytes_per_sec, f64),
        name!(eta_secs, Option<f64>),
        name!(started_us, Option<i64>),
        name!(finished_us, Option<i64>),
    ),
> {
    let (totals, _) = read(unsafe { pg_sys::MyDatabaseId });
    TableIterator::new(
        totals
            .into_iter()
            .map(|t| {
                (
                    t.name,
                    t.state.as_str().to_string(),
                    i64_of(t.tables_total),
                    i64_of(t.tables_pending),
                    i64_of(t.tables_copying),
                    i64_of(t.tables_done),
                    i64_of(t.rows),
                    i64_of(t.rows_est),
                    i64_of(t.bytes),
                    i64_of(t.bytes_est),
                    t.rows_per_sec,
                    t.bytes_per_sec,
                    t.eta_secs,
                    ts_of(t.started_us),
                    ts_of(t.finished_us),
                )
            })
            .collect::<Vec<_>>(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(rate(1000, 2_000_000), 500.0);
        assert_eq!(rate(1000, 0), 0.0);
        assert_eq!(rate(1000, -5), 0.0);
    }

    #[test]
    fn etas() {
        assert_eq!(eta_secs(100, 1100, 100.0), Some(10.0));
        // The estimate is passed: nothing to tell.
        assert_eq!(eta_secs(1200, 1100, 100.0), None);
        assert_eq!(eta_secs(0, 1100, 0.0), None);
        assert_eq!(eta_secs(0, 1100, f64::NAN), None);
        assert_eq!(eta_secs(0, 0, 10.0), None);
    }

    #[test]
    fn rate_and_eta_by_state() {
        let s = 1_000_000;
        assert_eq!(
            rate_and_eta(CopyState::Copying, 50, 100, s, 0, s + 1_000_000),
            (50.0, Some(1.0))
        );
        // A finished table's rate is over its own duration, its ETA 0.
        assert_eq!(
            rate_and_eta(CopyState::Done, 100, 90, s, s + 2_000_000, s + 9_000_000),
            (50.0, Some(0.0))
        );
        assert_eq!(
            rate_and_eta(CopyState::Pending, 0, 100, 0, 0, s),
            (0.0, None)
        );
        assert_eq!(
            rate_and_eta(CopyState::Interrupted, 10, 100, s, s + 1_000_000, s),
            (10.0, None)
        );
    }

    #[test]
    fn names() {
        let mut n = [0u8; NAME_LEN];
        put_name(&mut n, "orders");
        assert_eq!(get_name(&n), "orders");
        // Too long: cut at a character boundary, never past the buffer.
        let long = "é".repeat(40);
        put_name(&mut n, &long);
        assert_eq!(get_name(&n).len(), 62);
        put_name(&mut n, "");
        assert_eq!(get_name(&n), "");
    }

    #[test]
    fn keys_match_only_used_entries() {
        let k = Key::new("public", "t");
        let mut e = EntryMeta {
            tag: 1,
            state: CopyState::Free,
            parts: 0,
            schema: k.schema,
            table: k.table,
            rows_est: 0,
            bytes_est: 0,
            started_us: 0,
            finished_us: 0,
        };
        assert!(!k.is(&e));
        e.state = CopyState::Pending;
        assert!(k.is(&e));
        assert!(!Key::new("public", "u").is(&e));
    }

    /// A block in process memory standing in for the shared segment.
    fn fake_segment() -> &'static Block {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let layout = std::alloc::Layout::new::<Block>();
            // SAFETY: all zero is a valid Block (atomics, plain data, a
            // Free state); it is never freed.
            let p = unsafe { std::alloc::alloc_zeroed(layout) } as *mut Block;
            assert!(!p.is_null());
            BLOCKS.store(p, Ordering::Release);
            NBLOCKS.store(1, Ordering::Release);
        });
        block(0).expect("the fake block")
    }

    #[test]
    fn parallel_tables_and_ranges() {
        let b = fake_segment();
        let run = b.locked(|m| {
            m.run += 1;
            m.tables_total = 3;
            m.state = CopyState::Copying;
            m.run
        });
        b.run.store(run, Ordering::Release);
        let tables = Tables { idx: 0, run };
        let est = |t: &str| TableEstimate {
            schema: "public".into(),
            table: t.into(),
            rows: 1000,
            bytes: 10_000,
        };
        // Two ranges of "a", one copy each of "b" and "c", at once.
        let threads: Vec<_> = ["a", "a", "b", "c"]
            .into_iter()
            .map(|t| {
                let mut c = tables.table_started(&est(t));
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        c.add(1, 10);
                    }
                })
            })
            .collect();
        let parts = b.locked(|m| {
            let key = Key::new("public", "a");
            m.entries
                .iter()
                .find(|e| key.is(e))
                .map(|e| (e.state, e.parts))
        });
        assert!(matches!(parts, Some((CopyState::Copying, _))));
        for t in threads {
            t.join().expect("copy thread");
        }
        let counts = |t: &str| {
            let key = Key::new("public", t);
            b.locked(|m| m.entries.iter().position(|e| key.is(e)))
                .map(|i| {
                    (
                        b.counters[i].rows.load(Ordering::Acquire),
                        b.counters[i].bytes.load(Ordering::Acquire),
                        b.locked(|m| (m.entries[i].state, m.entries[i].parts)),
                    )
                })
        };
        assert_eq!(
            counts("a"),
            Some((20_000, 200_000, (CopyState::Copying, 0)))
        );
        assert_eq!(
            counts("b"),
            Some((10_000, 100_000, (CopyState::Copying, 0)))
        );
        assert_eq!(b.rows.load(Ordering::Acquire), 40_000);
        assert_eq!(b.bytes.load(Ordering::Acquire), 400_000);
        // Done with the committed count: the total follows it.
        tables.table_done("public", "a", 19_990);
        assert_eq!(
            counts("a").map(|c| (c.0, c.2 .0)),
            Some((19_990, CopyState::Done))
        );
        assert_eq!(b.rows.load(Ordering::Acquire), 39_990);
        assert_eq!(b.locked(|m| m.tables_done), 1);
        // A handle of an older copy counts nowhere.
        let mut stale = tables.table_started(&est("b"));
        b.locked(|m| m.run += 1);
        b.run.fetch_add(1, Ordering::AcqRel);
        stale.add(5, 5);
        stale.flush();
        assert_eq!(b.rows.load(Ordering::Acquire), 39_990);
        assert_eq!(counts("b").map(|c| c.0), Some(10_000));
    }
}
