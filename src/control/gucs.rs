//! Configuration parameters (`synchdb.*` GUCs): their definitions, defaults and
//! accessors. Every other module reads settings through the functions here.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

/// How the apply side reacts to a change it cannot apply.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ErrorStrategy {
    /// Stop the connector and keep the error in the state view.
    Exit,
    /// Log the failing change with its LSN, count it, and go on.
    Skip,
    /// Back off and try the same change again until it succeeds.
    Retry,
}

/// Number of connector slots in shared memory (one per connector that can run
/// or has run since the server started).
static MAX_CONNECTORS: GucSetting<i32> = GucSetting::<i32>::new(30);

/// What to do with a change that fails to apply.
static ERROR_STRATEGY: GucSetting<ErrorStrategy> =
    GucSetting::<ErrorStrategy>::new(ErrorStrategy::Exit);

/// Database the launcher connects to in order to list databases at start-up.
static LAUNCHER_DATABASE: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(Some(c"postgres"));

/// Bytes of COPY data the snapshot reader holds ahead of the destination's
/// COPY (at least one chunk).
static SNAPSHOT_BATCH_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
/// Whether each table's rows are read by the snapshot reader (a second
/// source connection on a thread of its own).
static SNAPSHOT_READER: GucSetting<bool> = GucSetting::<bool>::new(true);

/// Upper bound of the retry backoff for source connection problems, in seconds.
static MAX_RETRY_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(30);
static MAX_TRANSACTIONS_PER_COMMIT: GucSetting<i32> = GucSetting::<i32>::new(100);
static SNAPSHOT_PARALLELISM: GucSetting<i32> = GucSetting::<i32>::new(1);
static SNAPSHOT_PARALLEL_MIN_KB: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);

pub fn init() {
    // Both names of the slot limit note whether they were set (see
    // `max_connectors`).
    unsafe {
        GucRegistry::define_int_guc_with_hooks(
            c"synchdb.max_connectors",
            c"Maximum number of synchdb connectors (shared memory slots).",
            c"Each connector that runs, or ran since the server started, takes one slot. SynchDB's synchdb.max_connector_workers is the same limit.",
            &MAX_CONNECTORS,
            1,
            1024,
            GucContext::Postmaster,
            GucFlags::default(),
            Some(note_max_connectors_set),
            None,
            None,
        );
    }
    init_compat();
    GucRegistry::define_enum_guc(
        c"synchdb.error_handling_strategy",
        c"What a connector does with a change it cannot apply: exit, skip or retry.",
        c"exit stops the connector and keeps the error in synchdb_state_view; skip logs and counts the change and goes on; retry backs off and retries it.",
        &ERROR_STRATEGY,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"synchdb.launcher_database",
        c"Database the synchdb launcher connects to in order to list databases at server start.",
        c"Active connectors of every database that has the extension are started again after a restart.",
        &LAUNCHER_DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"synchdb.snapshot_batch_bytes",
        c"Bytes of COPY data the snapshot reader holds ahead of the destination's COPY.",
        c"Bounds the memory a table copy uses (one 256 kB chunk, or one row when a row is larger, is always let through).",
        &SNAPSHOT_BATCH_BYTES,
        8 * 1024,
        256 * 1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"synchdb.max_retry_interval",
        c"Longest wait between two attempts to reach the source, in seconds.",
        c"Connection problems are retried with exponential backoff up to this interval.",
        &MAX_RETRY_INTERVAL_S,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"synchdb.max_transactions_per_commit",
        c"Most source transactions applied in one destination transaction while a backlog is applied.",
        c"Only when more changes are already waiting; 1 commits every source transaction on its own.",
        &MAX_TRANSACTIONS_PER_COMMIT,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"synchdb.snapshot_parallelism",
        c"Processes copying one large table at once during a snapshot (the connector's worker and copy workers).",
        c"Each copy worker uses a background worker slot and a source connection; 1 copies every table in the connector's worker alone.",
        &SNAPSHOT_PARALLELISM,
        1,
        64,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"synchdb.snapshot_parallel_min_size",
        c"Smallest table (on the source, in kB) copied in parallel ranges during a snapshot.",
        c"Smaller tables are copied by the connector's worker alone.",
        &SNAPSHOT_PARALLEL_MIN_KB,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
}

/// The smallest table, in bytes, copied in parallel ranges.
pub fn snapshot_parallel_min_bytes() -> i64 {
    i64::from(SNAPSHOT_PARALLEL_MIN_KB.get().max(0)) * 1024
}

/// How many processes copy one large table at once.
pub fn snapshot_parallelism() -> usize {
    usize::try_from(SNAPSHOT_PARALLELISM.get())
        .unwrap_or(1)
        .max(1)
}

/// How many source transactions one destination transaction may hold.
pub fn max_transactions_per_commit() -> u64 {
    u64::try_from(MAX_TRANSACTIONS_PER_COMMIT.get())
        .unwrap_or(1)
        .max(1)
}

/// The connector slot limit: `synchdb.max_connectors` or SynchDB's
/// `synchdb.max_connector_workers`, whichever was set (in
/// postgresql.conf, on the command line...); the larger when both were,
/// the default (30) when neither was. Decided once, in the postmaster when
/// it sizes shared memory, and inherited by every process it starts: a
/// later check of either setting (`ALTER SYSTEM` validates values through
/// the hooks that note "set") never changes the answer.
pub fn max_connectors() -> usize {
    static DECIDED: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *DECIDED.get_or_init(decide_max_connectors)
}

fn decide_max_connectors() -> usize {
    use std::sync::atomic::Ordering;
    let ours = MAX_CONNECTORS.get();
    let theirs = MAX_CONNECTOR_WORKERS.get();
    let n = match (
        MAX_CONNECTORS_SET.load(Ordering::Relaxed),
        MAX_CONNECTOR_WORKERS_SET.load(Ordering::Relaxed),
    ) {
        (true, false) => ours,
        (false, true) => theirs,
        _ => ours.max(theirs),
    };
    usize::try_from(n).unwrap_or(1).max(1)
}

pub fn error_strategy() -> ErrorStrategy {
    ERROR_STRATEGY.get()
}

pub fn launcher_database() -> String {
    LAUNCHER_DATABASE
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|| "postgres".to_string())
}

pub fn snapshot_batch_bytes() -> usize {
    usize::try_from(SNAPSHOT_BATCH_BYTES.get()).unwrap_or(1024 * 1024)
}

pub fn snapshot_reader() -> bool {
    SNAPSHOT_READER.get()
}

pub fn max_retry_interval() -> std::time::Duration {
    std::time::Duration::from_secs(u64::try_from(MAX_RETRY_INTERVAL_S.get()).unwrap_or(30))
}

// ---- SynchDB's names and smaller behaviours (README, "Settings") ----

/// SynchDB's name of the connector slot limit (see `max_connectors`).
static MAX_CONNECTOR_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(30);
static MAX_CONNECTORS_SET: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);
static MAX_CONNECTOR_WORKERS_SET: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether the launcher starts active connectors again at server start.
static AUTO_LAUNCHER: GucSetting<bool> = GucSetting::<bool>::new(true);

/// Operation kinds not applied (SynchDB letters), under both names; the
/// masks are kept by the assign hooks so that the per-change check is an
/// atomic load.
static SKIPPED_OPERATIONS: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(Some(c""));
static DBZ_SKIPPED_OEPRATIONS: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(Some(c""));
static SKIP_MASK: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
static SKIP_MASK_ALIAS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Wait before streaming begins after a start (and its snapshot), in ms.
static CDC_START_DELAY_MS: GucSetting<i32> = GucSetting::<i32>::new(0);

fn init_compat() {
    unsafe {
        GucRegistry::define_int_guc_with_hooks(
            c"synchdb.max_connector_workers",
            c"SynchDB's name of synchdb.max_connectors (connector slots).",
            c"When only one of the two is set it is used; when both are, the larger.",
            &MAX_CONNECTOR_WORKERS,
            1,
            1024,
            GucContext::Postmaster,
            GucFlags::default(),
            Some(note_max_connector_workers_set),
            None,
            None,
        );
    }
    GucRegistry::define_bool_guc(
        c"synchdb.snapshot_reader",
        c"Whether a second source connection reads the rows of a snapshot's tables, beside the load.",
        c"Off: each table is read on the snapshot connection itself (one source connection fewer, slower on a busy worker).",
        &SNAPSHOT_READER,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"synchdb.synchdb_auto_launcher",
        c"Whether connectors that were active are started again when the server starts.",
        c"Off: after a restart every connector stays stopped until synchdb_start_engine_bgw.",
        &AUTO_LAUNCHER,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"synchdb.skipped_operations",
            c"Kinds of source changes not applied: a comma-separated list of c (insert), u (update), d (delete), t (truncate).",
            c"Empty (the default) applies everything. Skipped changes are counted. synchdb.dbz_skipped_oeprations is SynchDB's name; both lists apply.",
            &SKIPPED_OPERATIONS,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_skipped_operations),
            Some(assign_skipped_operations),
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"synchdb.dbz_skipped_oeprations",
            c"SynchDB's (misspelled) name of synchdb.skipped_operations.",
            c"Both lists apply: a kind named in either is skipped.",
            &DBZ_SKIPPED_OEPRATIONS,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_skipped_operations),
            Some(assign_dbz_skipped_oeprations),
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"synchdb.cdc_start_delay_ms",
        c"Wait before change data capture begins after a connector starts (and after its initial snapshot).",
        c"0 (the default) streams at once.",
        &CDC_START_DELAY_MS,
        0,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn note_max_connectors_set(
    _newval: *mut std::ffi::c_int,
    _extra: *mut *mut std::ffi::c_void,
    source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    if source > pgrx::pg_sys::GucSource::PGC_S_DEFAULT {
        MAX_CONNECTORS_SET.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    true
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn note_max_connector_workers_set(
    _newval: *mut std::ffi::c_int,
    _extra: *mut *mut std::ffi::c_void,
    source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    if source > pgrx::pg_sys::GucSource::PGC_S_DEFAULT {
        MAX_CONNECTOR_WORKERS_SET.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    true
}

/// The text of a string GUC's new value (empty for NULL).
unsafe fn guc_text(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_skipped_operations(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    let text = if newval.is_null() {
        String::new()
    } else {
        unsafe { guc_text(*newval) }
    };
    match crate::control::compat::parse_skipped_operations(&text) {
        Ok(_) => true,
        Err(msg) => {
            let detail = std::ffi::CString::new(msg).unwrap_or_default();
            unsafe {
                pgrx::pg_sys::GUC_check_errdetail_string = pgrx::pg_sys::pstrdup(detail.as_ptr());
            }
            false
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn assign_skipped_operations(
    newval: *const std::ffi::c_char,
    _extra: *mut std::ffi::c_void,
) {
    let mask =
        crate::control::compat::parse_skipped_operations(&unsafe { guc_text(newval) }).unwrap_or(0);
    SKIP_MASK.store(mask, std::sync::atomic::Ordering::Relaxed);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn assign_dbz_skipped_oeprations(
    newval: *const std::ffi::c_char,
    _extra: *mut std::ffi::c_void,
) {
    let mask =
        crate::control::compat::parse_skipped_operations(&unsafe { guc_text(newval) }).unwrap_or(0);
    SKIP_MASK_ALIAS.store(mask, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the launcher restarts active connectors at server start.
pub fn auto_launcher() -> bool {
    AUTO_LAUNCHER.get()
}

/// The operation kinds not applied (`compat::SKIP_*` bits): the union of
/// both names' lists.
pub fn skipped_operations() -> u8 {
    SKIP_MASK.load(std::sync::atomic::Ordering::Relaxed)
        | SKIP_MASK_ALIAS.load(std::sync::atomic::Ordering::Relaxed)
}

/// How long to wait before streaming begins.
pub fn cdc_start_delay() -> std::time::Duration {
    std::time::Duration::from_millis(u64::try_from(CDC_START_DELAY_MS.get()).unwrap_or(0))
}
