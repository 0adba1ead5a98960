//! Destination relation cache invalidations seen by a connector worker: a
//! relcache callback (registered once per worker process) records which
//! destination tables changed definition (a DBA adding a column, an index
//! or a trigger, or the worker's own DDL), so that the applier rebuilds what
//! it cached about them (column map, input functions, direct-apply target,
//! prepared plans) instead of trusting it across a DDL, as PostgreSQL's own
//! apply worker does with its relation map.

use pgrx::pg_sys;
use std::cell::{Cell, RefCell};

/// Marks an ERROR raised because a destination table changed under the
/// applier: the engine throws the transaction away and applies it again
/// with fresh definitions instead of treating it as an apply failure.
pub const APPLY_AGAIN: &str = "(the transaction is applied again)";

thread_local! {
    /// Tables invalidated since the applier last looked.
    static PENDING: RefCell<Vec<pg_sys::Oid>> = const { RefCell::new(Vec::new()) };
    /// Every relation was invalidated (cache reset).
    static ALL: Cell<bool> = const { Cell::new(false) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Called by PostgreSQL while it processes invalidation messages; must not
/// raise an ERROR or call into PostgreSQL.
unsafe extern "C-unwind" fn on_invalidate(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    if relid == pg_sys::InvalidOid {
        ALL.with(|a| a.set(true));
        return;
    }
    PENDING.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if p.len() >= MAX_PENDING {
                // Too many to track one by one: treat as a reset.
                p.clear();
                ALL.with(|a| a.set(true));
            } else if !p.contains(&relid) {
                p.push(relid);
            }
        } else {
            ALL.with(|a| a.set(true));
        }
    });
}

/// Tables tracked one by one before invalidations count as a reset.
const MAX_PENDING: usize = 64;

/// Registers the callback (once per process).
pub fn register() {
    if REGISTERED.with(|r| r.replace(true)) {
        return;
    }
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(on_invalidate), pg_sys::Datum::from(0)) };
}

/// What was invalidated since the last call: (everything, these tables).
pub fn take() -> (bool, Vec<pg_sys::Oid>) {
    let all = ALL.with(|a| a.replace(false));
    let list = PENDING.with(|p| p.try_borrow_mut().map(|mut p| std::mem::take(&mut *p)));
    match list {
        Ok(l) => (all, l),
        Err(_) => (true, Vec::new()),
    }
}

/// Forgets pending invalidations of `relid` (the caller has just read its
/// definition afresh).
pub fn forget(relid: pg_sys::Oid) {
    PENDING.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            p.retain(|r| *r != relid);
        }
    });
}

/// Whether `relid` was invalidated and not yet taken. (A reset of every
/// relation is not counted: the applier locks each table and re-reads it
/// after a reset before it writes into it.)
pub fn is_pending(relid: pg_sys::Oid) -> bool {
    PENDING.with(|p| p.try_borrow().map(|p| p.contains(&relid)).unwrap_or(true))
}
