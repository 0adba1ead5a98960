//! Destination writes run as the owner of the table written, as
//! PostgreSQL's own apply worker does from 16 on (`run_as_owner = false`):
//! the worker is a superuser, and a table owned by another role may carry
//! that role's code (triggers, column defaults, CHECK and domain
//! constraints, index expressions). Run as the worker, that code would
//! have a superuser's rights; run as the owner, it has only the rights its
//! author already had. A role that cannot become the worker's role also
//! gets `SECURITY_RESTRICTED_OPERATION` (no SET ROLE, no temporary
//! objects, no deferred trigger, which would fire at commit as the worker:
//! PostgreSQL refuses to queue one) and a GUC nest level that rolls back
//! any setting it changed (the worker relies on its own `search_path` and
//! the like). Tables owned by the worker's role (those the connector
//! creates) are written without any switch.

use pgrx::pg_sys;
use std::ffi::c_int;

/// Called without pgrx's per-call guard: they cannot raise an ERROR, and
/// they are called while a panic unwinds (restoring after an ERROR).
mod raw {
    use pgrx::pg_sys::Oid;
    use std::ffi::c_int;

    unsafe extern "C-unwind" {
        pub fn GetUserIdAndSecContext(userid: *mut Oid, sec_context: *mut c_int);
        pub fn SetUserIdAndSecContext(userid: Oid, sec_context: c_int);
        pub fn GetUserId() -> Oid;
    }
}

/// The owner of destination table `relid`; None when it does not exist.
pub fn table_owner(relid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    unsafe {
        let tup = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as c_int,
            pg_sys::Datum::from(relid),
        );
        if tup.is_null() {
            return None;
        }
        let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tup);
        let owner = (*form).relowner;
        pg_sys::ReleaseSysCache(tup);
        Some(owner)
    }
}

/// The role writes into destination table `relid` must run as: its owner,
/// when that is not the current user. None: no switch (the connector's own
/// tables, or a table that does not exist).
pub fn run_as(relid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    let owner = table_owner(relid)?;
    (owner != unsafe { raw::GetUserId() }).then_some(owner)
}

thread_local! {
    /// Whether this connector may write into tables owned by roles that
    /// are not superusers (`data.apply_as_table_owner`); a worker serves
    /// one connector.
    static OTHER_OWNERS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Sets whether tables of roles that are not superusers may be written.
pub fn allow_other_owners(allowed: bool) {
    OTHER_OWNERS.with(|c| c.set(allowed));
}

/// Raises an ERROR when destination table `relid` belongs to `owner`, a
/// role that is not a superuser, and the connector was not told to write
/// into such tables: that role could have planted code there (triggers,
/// defaults, constraints) that every change would run. Told to, the
/// writes run as that role (see `as_role`).
pub fn refuse_untrusted_owner(relid: pg_sys::Oid, owner: pg_sys::Oid) {
    if OTHER_OWNERS.with(|c| c.get()) || unsafe { pg_sys::superuser_arg(owner) } {
        return;
    }
    let text = |p: *mut std::ffi::c_char, oid: pg_sys::Oid| {
        if p.is_null() {
            format!("{oid:?}")
        } else {
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    let table = text(unsafe { pg_sys::get_rel_name(relid) }, relid);
    let role = text(unsafe { pg_sys::GetUserNameFromId(owner, true) }, owner);
    pgrx::error!(
        "destination table \"{table}\" belongs to role \"{role}\", which is not a superuser: its triggers, defaults and constraints would run on every change; to write into it as \"{role}\", set apply_as_table_owner in the connector's data: UPDATE synchdb_conninfo SET data = jsonb_set(data, '{{apply_as_table_owner}}', 'true') WHERE name = '<connector>'"
    );
}

/// Raises an ERROR when row-level security applies to `role` on table
/// `relid` (FORCE ROW LEVEL SECURITY on a table it owns): the direct
/// executor path and COPY would bypass the policies that SQL statements
/// obey, so the table is refused, as native apply refuses it.
pub fn refuse_row_security(relid: pg_sys::Oid, role: pg_sys::Oid) {
    let rls = unsafe { pg_sys::check_enable_rls(relid, role, true) };
    if rls == pg_sys::CheckEnableRlsResult::RLS_ENABLED as c_int {
        let (table, owner) = unsafe {
            (
                c_name(pg_sys::get_rel_name(relid)),
                c_name(pg_sys::GetUserNameFromId(role, true)),
            )
        };
        pgrx::error!(
            "row-level security of destination table \"{}\" applies to its owner \"{}\"; synchdb does not write into it (ALTER TABLE ... NO FORCE ROW LEVEL SECURITY lets it)",
            table.unwrap_or_else(|| relid.to_u32().to_string()),
            owner.unwrap_or_else(|| role.to_u32().to_string())
        );
    }
}

/// A name PostgreSQL returned (None: NULL).
unsafe fn c_name(p: *const std::ffi::c_char) -> Option<String> {
    (!p.is_null()).then(|| {
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    })
}

/// Runs `f` as `role` (None: as the current user, without any switch).
/// The previous user and security context come back when `f` returns,
/// and also when it raises an ERROR (the transaction abort would restore
/// them too, but the worker reads the error before it aborts).
pub fn as_role<R>(role: Option<pg_sys::Oid>, f: impl FnOnce() -> R) -> R {
    let Some(role) = role else {
        return f();
    };
    let switched = Switched::to(role);
    let r = f();
    switched.restore();
    r
}

/// Runs `f` as the owner of destination table `relid` (see `as_role`).
pub fn as_owner<R>(relid: Option<pg_sys::Oid>, f: impl FnOnce() -> R) -> R {
    as_role(relid.and_then(run_as), f)
}

struct Switched {
    save_user: pg_sys::Oid,
    save_sec: c_int,
    /// The GUC nest level opened for an untrusted role.
    nest: Option<c_int>,
    restored: bool,
}

impl Switched {
    fn to(role: pg_sys::Oid) -> Switched {
        let mut save_user = pg_sys::InvalidOid;
        let mut save_sec: c_int = 0;
        unsafe { raw::GetUserIdAndSecContext(&mut save_user, &mut save_sec) };
        // A role that may become the worker's role anyway (a superuser, or
        // a member of it) gains nothing from restrictions.
        let trusted = unsafe { pg_sys::is_member_of_role(role, save_user) };
        let mut sec = save_sec | pg_sys::SECURITY_LOCAL_USERID_CHANGE as c_int;
        let nest = if trusted {
            None
        } else {
            sec |= pg_sys::SECURITY_RESTRICTED_OPERATION as c_int;
            Some(unsafe { pg_sys::NewGUCNestLevel() })
        };
        unsafe { raw::SetUserIdAndSecContext(role, sec) };
        Switched {
            save_user,
            save_sec,
            nest,
            restored: false,
        }
    }

    fn restore(mut self) {
        if let Some(level) = self.nest {
            // An ERROR here still restores the user (Drop).
            unsafe { pg_sys::AtEOXact_GUC(false, level) };
        }
        self.restored = true;
        unsafe { raw::SetUserIdAndSecContext(self.save_user, self.save_sec) };
    }
}

impl Drop for Switched {
    /// After an ERROR: only the user and security context are restored
    /// here; the GUC nest level is rolled back by the transaction abort
    /// that follows every ERROR in the worker (AtEOXact_GUC of the abort).
    fn drop(&mut self) {
        if !self.restored {
            unsafe { raw::SetUserIdAndSecContext(self.save_user, self.save_sec) };
        }
    }
}
