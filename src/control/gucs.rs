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

/// Rows per batch handed from the snapshot reader to the destination COPY.
static SNAPSHOT_BATCH_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);

/// Upper bound of the retry backoff for source connection problems, in seconds.
static MAX_RETRY_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(30);

pub fn init() {
    GucRegistry::define_int_guc(
        c"synchdb.max_connectors",
        c"Maximum number of synchdb connectors (shared memory slots).",
        c"Each connector that runs, or ran since the server started, takes one slot.",
        &MAX_CONNECTORS,
        1,
        1024,
        GucContext::Postmaster,
        GucFlags::default(),
    );
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
        c"Bytes of COPY data buffered between the snapshot reader and the destination.",
        c"Bounds the memory a table copy uses.",
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
}

pub fn max_connectors() -> usize {
    usize::try_from(MAX_CONNECTORS.get()).unwrap_or(1).max(1)
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

pub fn max_retry_interval() -> std::time::Duration {
    std::time::Duration::from_secs(u64::try_from(MAX_RETRY_INTERVAL_S.get()).unwrap_or(30))
}
