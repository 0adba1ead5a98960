//! Shared memory: one slot per connector (the number is
//! `synchdb.max_connectors`), guarded by one LWLock. Workers write their pid,
//! stage, state, last error and last position here; `synchdb_state_view`
//! copies the slots under a shared lock, as `pg_stat_subscription` does.
//! Each slot also holds the connector's statistics (`synchdb_stats_view`),
//! kept across worker restarts until `synchdb_reset_stats`, and saved
//! across server restarts by `control::stats`.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;
use std::ptr;

const NAME_LEN: usize = 64;
const ERR_LEN: usize = 1024;
const OFFSET_LEN: usize = 512;
const TRANCHE: &CStr = c"synchdb";
const SEGMENT: &CStr = c"synchdb connector slots";

/// Where a connector is in its life cycle (the `stage` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    None = 0,
    InitialSnapshot = 1,
    ChangeDataCapture = 2,
    SchemaSync = 3,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::None => "",
            Stage::InitialSnapshot => "initial snapshot",
            Stage::ChangeDataCapture => "change data capture",
            Stage::SchemaSync => "schema sync",
        }
    }
    fn from_u8(v: u8) -> Stage {
        match v {
            1 => Stage::InitialSnapshot,
            2 => Stage::ChangeDataCapture,
            3 => Stage::SchemaSync,
            _ => Stage::None,
        }
    }
}

/// What a connector is doing right now (the `state` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Stopped = 0,
    Initializing = 1,
    Polling = 2,
    Syncing = 3,
    Executing = 4,
    Paused = 5,
    Restarting = 6,
    UpdatingOffset = 7,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Initializing => "initializing",
            State::Polling => "polling",
            State::Syncing => "syncing",
            State::Executing => "executing",
            State::Paused => "paused",
            State::Restarting => "restarting",
            State::UpdatingOffset => "updating offset",
        }
    }
    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Initializing,
            2 => State::Polling,
            3 => State::Syncing,
            4 => State::Executing,
            5 => State::Paused,
            6 => State::Restarting,
            7 => State::UpdatingOffset,
            _ => State::Stopped,
        }
    }
}

/// Requests a backend leaves for a running worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Request {
    None = 0,
    Pause = 1,
    Resume = 2,
    SetOffset = 3,
}

/// Statistics of one connector (`synchdb_stats_view`). Timestamps are
/// microseconds since the Unix epoch, 0 when not set.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub ddls: u64,
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub truncates: u64,
    pub transactions: u64,
    /// Changes skipped by the skip strategy, and updates or deletes that
    /// found no row.
    pub bad_changes: u64,
    pub tables_copied: u64,
    pub rows_copied: u64,
    pub first_src_ts: i64,
    pub last_src_ts: i64,
    pub first_apply_ts: i64,
    pub last_apply_ts: i64,
    /// The source's WAL end as last reported by the stream.
    pub received_lsn: u64,
    /// The end of the last applied source transaction.
    pub applied_lsn: u64,
    /// Local commits that applied changes (SynchDB's "batches"; one local
    /// commit may hold several source transactions).
    pub batches: u64,
    /// When the batch being applied began (0 between batches), and when the
    /// last committed one began.
    pub batch_open_ts: i64,
    pub batch_begin_ts: i64,
    /// When the last initial copy began and ended (0: not ended yet).
    pub snapshot_begin_ts: i64,
    pub snapshot_end_ts: i64,
    /// Whether the copy persisted in `synchdb_stats` has been loaded into
    /// this slot since the server started (`control::stats`).
    pub loaded: bool,
}

#[repr(C)]
struct Slot {
    in_use: bool,
    dboid: pg_sys::Oid,
    name: [u8; NAME_LEN],
    /// -1: not running; 0: registered, not yet started.
    pid: i32,
    stage: u8,
    state: u8,
    request: u8,
    /// A position set by `synchdb_set_offset`, taken by the worker on resume.
    pending_offset: u64,
    /// Set by `synchdb_reload_objmap`, taken by the worker (object mappings).
    reload_objmap: bool,
    latch: *mut pg_sys::Latch,
    err: [u8; ERR_LEN],
    offset: [u8; OFFSET_LEN],
    stats: Stats,
}

#[repr(C)]
struct Header {
    lock: *mut pg_sys::LWLock,
    nslots: usize,
}

static mut HEADER: *mut Header = ptr::null_mut();
static mut SLOTS: *mut Slot = ptr::null_mut();
static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

fn segment_size(n: usize) -> usize {
    std::mem::size_of::<Header>() + n * std::mem::size_of::<Slot>()
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
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 1);
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
        let header = base as *mut Header;
        let slots = (base as *mut u8).add(std::mem::size_of::<Header>()) as *mut Slot;
        if !found {
            ptr::write_bytes(base as *mut u8, 0, segment_size(n));
            (*header).lock = &mut (*pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr())).lock;
            (*header).nslots = n;
            for i in 0..n {
                (*slots.add(i)).pid = -1;
            }
        }
        HEADER = header;
        SLOTS = slots;
        pg_sys::LWLockRelease(init_lock);
    }
}

fn attached() -> bool {
    unsafe { !HEADER.is_null() }
}

/// Runs `f` over all slots under the lock, shared or exclusive.
fn with_slots<R>(exclusive: bool, f: impl FnOnce(&mut [Slot]) -> R) -> Option<R> {
    if !attached() {
        return None;
    }
    unsafe {
        let header = HEADER;
        let mode = if exclusive {
            pg_sys::LWLockMode::LW_EXCLUSIVE
        } else {
            pg_sys::LWLockMode::LW_SHARED
        };
        pg_sys::LWLockAcquire((*header).lock, mode);
        let slots = std::slice::from_raw_parts_mut(SLOTS, (*header).nslots);
        // The closures below do no allocation that can raise an ERROR while the
        // lock is held; a Rust panic still releases it through LWLockReleaseAll
        // at abort, as for any ERROR.
        let r = f(slots);
        pg_sys::LWLockRelease((*header).lock);
        Some(r)
    }
}

fn put_str(dst: &mut [u8], s: &str) {
    let mut n = s.len().min(dst.len() - 1);
    while n > 0 && !s.is_char_boundary(n) {
        n -= 1;
    }
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
    dst[n] = 0;
}

fn get_str(src: &[u8]) -> String {
    let end = src.iter().position(|b| *b == 0).unwrap_or(src.len());
    String::from_utf8_lossy(&src[..end]).into_owned()
}

fn matches(slot: &Slot, dboid: pg_sys::Oid, name: &str) -> bool {
    slot.in_use && slot.dboid == dboid && get_str(&slot.name) == name
}

/// A copy of one slot, for the state view and for decisions in backends.
#[derive(Debug, Clone)]
pub struct SlotView {
    pub name: String,
    pub pid: i32,
    pub stage: Stage,
    pub state: State,
    pub err: String,
    pub offset: String,
}

fn view(slot: &Slot) -> SlotView {
    SlotView {
        name: get_str(&slot.name),
        pid: slot.pid,
        stage: Stage::from_u8(slot.stage),
        state: State::from_u8(slot.state),
        err: get_str(&slot.err),
        offset: get_str(&slot.offset),
    }
}

/// All slots of one database.
pub fn snapshot(dboid: pg_sys::Oid) -> Vec<SlotView> {
    with_slots(false, |slots| {
        slots
            .iter()
            .filter(|s| s.in_use && s.dboid == dboid)
            .map(view)
            .collect()
    })
    .unwrap_or_default()
}

pub fn get(dboid: pg_sys::Oid, name: &str) -> Option<SlotView> {
    with_slots(false, |slots| {
        slots.iter().find(|s| matches(s, dboid, name)).map(view)
    })
    .flatten()
}

/// The statistics of every connector of one database, by name.
pub fn stats(dboid: pg_sys::Oid) -> Vec<(String, Stats)> {
    with_slots(false, |slots| {
        slots
            .iter()
            .filter(|s| s.in_use && s.dboid == dboid)
            .map(|s| (get_str(&s.name), s.stats))
            .collect()
    })
    .unwrap_or_default()
}

/// Zeroes a connector's statistics; false when it has no slot yet.
pub fn reset_stats(dboid: pg_sys::Oid, name: &str) -> bool {
    with_slots(true, |slots| {
        match slots.iter_mut().find(|s| matches(s, dboid, name)) {
            Some(s) => {
                // Still loaded: the persisted copy is reset in the same call.
                s.stats = Stats {
                    loaded: s.stats.loaded,
                    ..Stats::default()
                };
                true
            }
            None => false,
        }
    })
    .unwrap_or(false)
}

/// Forgets how far a connector's stream got (`received_lsn`, `applied_lsn`):
/// after `synchdb_set_offset` the stream starts again from the new offset, and
/// a position from before it would claim more than is applied.
pub fn forget_positions(dboid: pg_sys::Oid, name: &str) {
    with_slots(true, |slots| {
        if let Some(s) = slots.iter_mut().find(|s| matches(s, dboid, name)) {
            s.stats.received_lsn = 0;
            s.stats.applied_lsn = 0;
        }
    });
}

/// Whether shared memory is attached (the library was preloaded).
pub fn available() -> bool {
    attached()
}

/// Outcome of claiming a slot for a start.
pub enum Claim {
    Claimed(usize),
    AlreadyRunning(i32),
    NoFreeSlot,
}

/// Marks the connector as starting (pid 0) unless it already runs; keeps the
/// old error and offset until the worker replaces them.
pub fn claim_for_start(dboid: pg_sys::Oid, name: &str) -> Claim {
    with_slots(true, |slots| {
        if let Some((i, s)) = slots
            .iter_mut()
            .enumerate()
            .find(|(_, s)| matches(s, dboid, name))
        {
            if s.pid >= 0 {
                return Claim::AlreadyRunning(s.pid);
            }
            s.pid = 0;
            s.state = State::Initializing as u8;
            s.request = Request::None as u8;
            s.reload_objmap = false;
            // An offset set while paused and never resumed belongs to the
            // stopped run: a new start resumes from the applied position.
            s.pending_offset = 0;
            return Claim::Claimed(i);
        }
        match slots.iter_mut().enumerate().find(|(_, s)| !s.in_use) {
            Some((i, s)) => {
                s.in_use = true;
                s.dboid = dboid;
                put_str(&mut s.name, name);
                s.pid = 0;
                s.stage = Stage::None as u8;
                s.state = State::Initializing as u8;
                s.request = Request::None as u8;
                s.reload_objmap = false;
                s.pending_offset = 0;
                s.latch = ptr::null_mut();
                put_str(&mut s.err, "no error");
                put_str(&mut s.offset, "offset file not flushed yet");
                s.stats = Stats::default();
                Claim::Claimed(i)
            }
            None => Claim::NoFreeSlot,
        }
    })
    .unwrap_or(Claim::NoFreeSlot)
}

/// Undoes a claim when the worker could not be registered.
pub fn release_claim(idx: usize) {
    with_slots(true, |slots| {
        if let Some(s) = slots.get_mut(idx) {
            if s.pid == 0 {
                s.pid = -1;
                s.state = State::Stopped as u8;
            }
        }
    });
}

/// Records the pid the postmaster reported for a freshly started worker.
pub fn set_pid_if_starting(idx: usize, pid: i32) {
    with_slots(true, |slots| {
        if let Some(s) = slots.get_mut(idx) {
            if s.pid == 0 {
                s.pid = pid;
            }
        }
    });
}

/// Forgets a connector entirely (after `synchdb_del_conninfo`).
pub fn free(dboid: pg_sys::Oid, name: &str) {
    with_slots(true, |slots| {
        for s in slots.iter_mut().filter(|s| matches(s, dboid, name)) {
            s.in_use = false;
            s.pid = -1;
        }
    });
}

/// Index of the slot of a connector, claiming a new one when missing (used by
/// a worker started by the launcher, which claims through the same path).
pub fn find(dboid: pg_sys::Oid, name: &str) -> Option<usize> {
    with_slots(false, |slots| {
        slots.iter().position(|s| matches(s, dboid, name))
    })
    .flatten()
}

/// The worker's handle on its own slot.
#[derive(Clone, Copy)]
pub struct WorkerSlot(usize);

impl WorkerSlot {
    /// Attaches the current process to slot `idx` as its worker.
    pub fn attach(idx: usize) -> Option<WorkerSlot> {
        with_slots(true, |slots| {
            let s = slots.get_mut(idx)?;
            if !s.in_use {
                return None;
            }
            unsafe {
                s.pid = pg_sys::MyProcPid;
                s.latch = pg_sys::MyLatch;
            }
            s.state = State::Initializing as u8;
            Some(WorkerSlot(idx))
        })
        .flatten()
    }

    fn update(self, f: impl FnOnce(&mut Slot)) {
        with_slots(true, |slots| {
            if let Some(s) = slots.get_mut(self.0) {
                f(s)
            }
        });
    }

    pub fn set_stage(self, stage: Stage) {
        self.update(|s| s.stage = stage as u8);
    }

    pub fn set_state(self, state: State) {
        self.update(|s| {
            s.state = state as u8;
            // A batch (local transaction) begins with its first change.
            if state == State::Executing && s.stats.batch_open_ts == 0 {
                s.stats.batch_open_ts = crate::control::stats::now_usec();
            }
        });
    }

    /// The slot's index (the same in `control::progress`).
    pub fn index(self) -> usize {
        self.0
    }

    pub fn set_err(self, err: &str) {
        self.update(|s| put_str(&mut s.err, err));
    }

    pub fn set_offset(self, offset: &str) {
        self.update(|s| put_str(&mut s.offset, offset));
    }

    /// After a commit: the new position, stage `change data capture`, state
    /// `polling` and the statistics, under one lock.
    pub fn committed(self, offset: &str, f: impl FnOnce(&mut Stats)) {
        self.update(|s| {
            put_str(&mut s.offset, offset);
            s.stage = Stage::ChangeDataCapture as u8;
            s.state = State::Polling as u8;
            f(&mut s.stats);
        });
    }

    /// Updates the statistics in place.
    pub fn stats(self, f: impl FnOnce(&mut Stats)) {
        self.update(|s| f(&mut s.stats));
    }

    /// Takes the pending request (pause / resume) and offset, if any.
    pub fn take_request(self) -> (Request, u64) {
        with_slots(true, |slots| match slots.get_mut(self.0) {
            Some(s) => {
                let r = match s.request {
                    1 => Request::Pause,
                    2 => Request::Resume,
                    3 => Request::SetOffset,
                    _ => Request::None,
                };
                s.request = Request::None as u8;
                let off = if r == Request::SetOffset || r == Request::Resume {
                    s.pending_offset
                } else {
                    0
                };
                if r == Request::Resume {
                    s.pending_offset = 0;
                }
                (r, off)
            }
            None => (Request::None, 0),
        })
        .unwrap_or((Request::None, 0))
    }

    /// Takes a pending `synchdb_reload_objmap` request (object mappings).
    pub fn take_reload(self) -> bool {
        with_slots(true, |slots| match slots.get_mut(self.0) {
            Some(s) => std::mem::replace(&mut s.reload_objmap, false),
            None => false,
        })
        .unwrap_or(false)
    }

    /// Marks the worker gone; the stage, error and offset stay for the view.
    pub fn detach(self) {
        self.update(|s| {
            s.pid = -1;
            s.state = State::Stopped as u8;
            s.latch = ptr::null_mut();
        });
    }
}

/// Asks a running worker to load its object mappings again and wakes it.
/// Returns false when it does not run.
pub fn request_reload(dboid: pg_sys::Oid, name: &str) -> bool {
    with_slots(true, |slots| {
        match slots.iter_mut().find(|s| matches(s, dboid, name)) {
            Some(s) if s.pid > 0 => {
                s.reload_objmap = true;
                if !s.latch.is_null() {
                    unsafe { pg_sys::SetLatch(s.latch) };
                }
                true
            }
            _ => false,
        }
    })
    .unwrap_or(false)
}

/// Whether the connector's worker runs.
pub fn is_running(dboid: pg_sys::Oid, name: &str) -> bool {
    with_slots(false, |slots| {
        slots.iter().any(|s| matches(s, dboid, name) && s.pid > 0)
    })
    .unwrap_or(false)
}

/// Whether a `synchdb_reload_objmap` request waits for the running worker.
pub fn reload_pending(dboid: pg_sys::Oid, name: &str) -> bool {
    with_slots(false, |slots| {
        slots
            .iter()
            .any(|s| matches(s, dboid, name) && s.pid > 0 && s.reload_objmap)
    })
    .unwrap_or(false)
}

/// Leaves a request for a running worker and wakes it. Returns false when it
/// does not run.
pub fn send_request(dboid: pg_sys::Oid, name: &str, req: Request, offset: Option<u64>) -> bool {
    with_slots(true, |slots| {
        match slots.iter_mut().find(|s| matches(s, dboid, name)) {
            Some(s) if s.pid > 0 => {
                s.request = req as u8;
                if let Some(o) = offset {
                    s.pending_offset = o;
                }
                if !s.latch.is_null() {
                    unsafe { pg_sys::SetLatch(s.latch) };
                }
                true
            }
            _ => false,
        }
    })
    .unwrap_or(false)
}
