//! Running destination work inside transactions from the worker's main
//! thread, with Postgres ERRORs caught and turned into Rust errors (the
//! transaction is aborted, the worker goes on and decides what to do).

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use std::panic::AssertUnwindSafe;

/// The text of a caught error, as `synchdb_state_view.err` shows it: the
/// message only. A DETAIL often holds row values (`Key (id)=(42) already
/// exists`, `Failing row contains (...)`), and `err` is readable by
/// everyone: the detail goes to the server log instead.
pub fn describe(e: &CaughtError) -> String {
    let report = match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
        CaughtError::RustPanic { ereport, .. } => ereport,
    };
    let message = report.message().to_string();
    if let Some(d) = report.detail() {
        pgrx::log!("synchdb: {message}; detail: {d}");
    }
    message
}

/// Runs `f` and catches any ERROR it raises (the caller aborts).
pub fn catch<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    let mut f = Some(f);
    PgTryBuilder::new(AssertUnwindSafe(|| match f.take() {
        Some(f) => Ok(f()),
        None => Err("internal error: closure already run".to_string()),
    }))
    .catch_others(|e| Err(describe(&e)))
    .execute()
}

/// Runs `f` in a subtransaction: an ERROR it raises rolls back what it did
/// (and only that) and is returned.
pub fn in_subtransaction<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
        let r = catch(f);
        match &r {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
        r
    }
}

pub fn start() {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
}

pub fn commit() {
    unsafe {
        if pg_sys::ActiveSnapshotSet() {
            pg_sys::PopActiveSnapshot();
        }
        pg_sys::CommitTransactionCommand();
    }
}

pub fn abort() {
    unsafe {
        pg_sys::AbortCurrentTransaction();
    }
}

pub fn in_transaction() -> bool {
    unsafe { pg_sys::IsTransactionState() }
}

/// One destination transaction around `f`: committed when `f` succeeds,
/// aborted (with the error returned) when it raises an ERROR.
pub fn run<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    start();
    match catch(f) {
        Ok(v) => match catch(commit) {
            Ok(()) => Ok(v),
            Err(e) => {
                abort();
                Err(e)
            }
        },
        Err(e) => {
            abort();
            Err(e)
        }
    }
}
