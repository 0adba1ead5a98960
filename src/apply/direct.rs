//! Row changes applied through the executor's replication helpers
//! (`ExecSimpleRelationInsert/Update/Delete`, `RelationFindReplTupleByIndex`),
//! as PostgreSQL's own apply worker does: no SQL text, no planning and no
//! portal per change. Inserts go this way for every plain table; updates
//! and deletes when the destination has a unique index on exactly the
//! source's key columns. Everything else (REPLICA IDENTITY FULL, USING
//! INDEX without a matching index) goes through prepared SPI statements in
//! `apply`.
//!
//! Built for PostgreSQL 15 only for now: the executor entry points used here
//! changed signatures in 16 (`ExecInitRangeTable` takes permission infos),
//! so other versions take the SPI path.

use pgrx::pg_sys;

/// A destination table ready for direct changes.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    relid: pg_sys::Oid,
    /// The unique index on the key columns (InvalidOid: inserts only).
    index: pg_sys::Oid,
    natts: usize,
}

impl Target {
    /// Whether updates and deletes can find rows through the key's index.
    pub fn has_key(&self) -> bool {
        self.index != pg_sys::InvalidOid
    }
}

/// A value for one destination attribute (0-based attribute index): the
/// offset of its NUL-terminated text in the change's text buffer (None:
/// NULL) and the input function that converts it.
pub struct AttrInput {
    pub att: usize,
    pub text: Option<usize>,
    pub input_fn: pg_sys::Oid,
    pub ioparam: pg_sys::Oid,
    pub typmod: i32,
}

/// The direct target for a plain table whose key columns (destination
/// attnums) are `key_attnums`; with an index when it has a usable unique
/// index on exactly them.
#[cfg(feature = "pg15")]
pub fn prepare(relid: pg_sys::Oid, key_attnums: &[i16]) -> Option<Target> {
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let natts = usize::try_from((*(*rel).rd_att).natts).unwrap_or(0);
        let relkind = (*(*rel).rd_rel).relkind as u8;
        let mut index = pg_sys::RelationGetReplicaIndex(rel);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if relkind != pg_sys::RELKIND_RELATION {
            return None;
        }
        if index == pg_sys::InvalidOid || key_attnums.is_empty() {
            return Some(Target {
                relid,
                index: pg_sys::InvalidOid,
                natts,
            });
        }
        let idx = pg_sys::index_open(index, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let form = (*idx).rd_index;
        let nkeys = usize::try_from((*form).indnkeyatts).unwrap_or(0);
        let keys = (*form).indkey.values.as_slice(nkeys);
        let matches = (*form).indisunique
            && nkeys == key_attnums.len()
            && keys.iter().all(|a| *a > 0 && key_attnums.contains(a))
            && pg_sys::RelationGetIndexPredicate(idx).is_null()
            && pg_sys::RelationGetIndexExpressions(idx).is_null();
        pg_sys::index_close(idx, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if !matches {
            index = pg_sys::InvalidOid;
        }
        Some(Target {
            relid,
            index,
            natts,
        })
    }
}

#[cfg(not(feature = "pg15"))]
pub fn prepare(_relid: pg_sys::Oid, _key_attnums: &[i16]) -> Option<Target> {
    None
}

/// PostgreSQL functions called on the hot path without pgrx's per-call
/// guard: each direct change crosses into PostgreSQL once, through a single
/// `pg_guard_ffi_boundary`, which turns an ERROR raised anywhere inside into
/// a Rust panic exactly as the per-call guard would. The code inside that
/// boundary holds no value with a destructor, so nothing is skipped when an
/// ERROR jumps back to it. Signatures are those of pgrx's bindings.
#[cfg(feature = "pg15")]
mod raw {
    use pgrx::pg_sys::{
        CommandId, Datum, EPQState, EState, Index, List, LockTupleMode, Oid, Plan, Relation,
        ResultRelInfo, Size, Snapshot, TupleDesc, TupleTableSlot, TupleTableSlotOps, LOCKMODE,
    };
    use std::ffi::{c_char, c_int, c_void};

    unsafe extern "C-unwind" {
        pub fn table_open(relationId: Oid, lockmode: LOCKMODE) -> Relation;
        pub fn table_close(relation: Relation, lockmode: LOCKMODE);
        pub fn GetTransactionSnapshot() -> Snapshot;
        pub fn PushActiveSnapshot(snapshot: Snapshot);
        pub fn PopActiveSnapshot();
        pub fn CreateExecutorState() -> *mut EState;
        pub fn FreeExecutorState(estate: *mut EState);
        pub fn palloc0(size: Size) -> *mut c_void;
        pub fn lappend(list: *mut List, datum: *mut c_void) -> *mut List;
        pub fn ExecInitRangeTable(estate: *mut EState, rangeTable: *mut List);
        pub fn InitResultRelInfo(
            resultRelInfo: *mut ResultRelInfo,
            resultRelationDesc: Relation,
            resultRelationIndex: Index,
            partition_root_rri: *mut ResultRelInfo,
            instrument_options: c_int,
        );
        pub fn GetCurrentCommandId(used: bool) -> CommandId;
        pub fn AfterTriggerBeginQuery();
        pub fn AfterTriggerEndQuery(estate: *mut EState);
        pub fn ExecOpenIndices(resultRelInfo: *mut ResultRelInfo, speculative: bool);
        pub fn ExecCloseIndices(resultRelInfo: *mut ResultRelInfo);
        pub fn ExecInitExtraTupleSlot(
            estate: *mut EState,
            tupledesc: TupleDesc,
            tts_ops: *const TupleTableSlotOps,
        ) -> *mut TupleTableSlot;
        pub fn ExecStoreVirtualTuple(slot: *mut TupleTableSlot) -> *mut TupleTableSlot;
        pub fn table_slot_create(rel: Relation, reglist: *mut *mut List) -> *mut TupleTableSlot;
        pub fn RelationFindReplTupleByIndex(
            rel: Relation,
            idxoid: Oid,
            lockmode: LockTupleMode::Type,
            searchslot: *mut TupleTableSlot,
            outslot: *mut TupleTableSlot,
        ) -> bool;
        pub fn slot_getsomeattrs_int(slot: *mut TupleTableSlot, attnum: c_int);
        pub fn EvalPlanQualInit(
            epqstate: *mut EPQState,
            parentestate: *mut EState,
            subplan: *mut Plan,
            auxrowmarks: *mut List,
            epqParam: c_int,
        );
        pub fn EvalPlanQualEnd(epqstate: *mut EPQState);
        pub fn ExecSimpleRelationInsert(
            resultRelInfo: *mut ResultRelInfo,
            estate: *mut EState,
            slot: *mut TupleTableSlot,
        );
        pub fn ExecSimpleRelationUpdate(
            resultRelInfo: *mut ResultRelInfo,
            estate: *mut EState,
            epqstate: *mut EPQState,
            searchslot: *mut TupleTableSlot,
            slot: *mut TupleTableSlot,
        );
        pub fn ExecSimpleRelationDelete(
            resultRelInfo: *mut ResultRelInfo,
            estate: *mut EState,
            epqstate: *mut EPQState,
            searchslot: *mut TupleTableSlot,
        );
        pub fn ExecResetTupleTable(tupleTable: *mut List, shouldFree: bool);
        pub fn CommandCounterIncrement();
        pub fn OidInputFunctionCall(
            functionId: Oid,
            str_: *mut c_char,
            typioparam: Oid,
            typmod: i32,
        ) -> Datum;
    }
}

#[cfg(feature = "pg15")]
struct Exec {
    rel: pg_sys::Relation,
    estate: *mut pg_sys::EState,
    rri: *mut pg_sys::ResultRelInfo,
}

/// Runs `f` inside one guarded crossing into PostgreSQL, in memory context
/// `cxt`, with the table opened, an executor state and its result relation
/// set up as the apply worker does; then fires queued AFTER triggers and
/// releases everything. `f` must not create values with destructors.
#[cfg(feature = "pg15")]
fn with_exec<R>(t: &Target, cxt: pg_sys::MemoryContext, f: impl FnOnce(&Exec) -> R) -> R {
    let r = unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            let old_cxt = pg_sys::CurrentMemoryContext;
            pg_sys::CurrentMemoryContext = cxt;
            let rel = raw::table_open(t.relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            // Opening the table processed pending invalidations: if its
            // definition changed since the target was prepared (a DBA's DDL
            // committed meanwhile), nothing cached about it may be used.
            let natts = usize::try_from((*(*rel).rd_att).natts).unwrap_or(0);
            if natts != t.natts || crate::apply::relcache::is_pending(t.relid) {
                raw::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
                pg_sys::CurrentMemoryContext = old_cxt;
                return None;
            }
            raw::PushActiveSnapshot(raw::GetTransactionSnapshot());
            let estate = raw::CreateExecutorState();
            let rte = raw::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>())
                as *mut pg_sys::RangeTblEntry;
            (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
            (*rte).rtekind = pg_sys::RTEKind::RTE_RELATION;
            (*rte).relid = t.relid;
            (*rte).relkind = (*(*rel).rd_rel).relkind;
            (*rte).rellockmode = pg_sys::AccessShareLock as i32;
            let rtable = raw::lappend(std::ptr::null_mut(), rte.cast());
            raw::ExecInitRangeTable(estate, rtable);
            let rri = raw::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
                as *mut pg_sys::ResultRelInfo;
            (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
            raw::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
            (*estate).es_opened_result_relations =
                raw::lappend((*estate).es_opened_result_relations, rri.cast());
            (*estate).es_output_cid = raw::GetCurrentCommandId(true);
            raw::AfterTriggerBeginQuery();
            raw::ExecOpenIndices(rri, false);
            let ex = Exec { rel, estate, rri };
            let r = f(&ex);
            raw::ExecCloseIndices(rri);
            raw::AfterTriggerEndQuery(estate);
            raw::ExecResetTupleTable((*estate).es_tupleTable, false);
            raw::FreeExecutorState(estate);
            raw::PopActiveSnapshot();
            raw::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            raw::CommandCounterIncrement();
            pg_sys::CurrentMemoryContext = old_cxt;
            Some(r)
        })
    };
    match r {
        Some(r) => r,
        None => pgrx::error!(
            "destination table {} changed definition while a change was applied {}",
            t.relid.to_u32(),
            crate::apply::relcache::APPLY_AGAIN
        ),
    }
}

/// Sets the slot attributes of `vals`, converting text values with their
/// input functions; `text` holds the NUL-terminated texts the inputs point
/// into.
#[cfg(feature = "pg15")]
unsafe fn set_attrs(
    slot: *mut pg_sys::TupleTableSlot,
    natts: usize,
    text: *mut u8,
    vals: &[AttrInput],
) {
    unsafe {
        for v in vals.iter().filter(|v| v.att < natts) {
            let (datum, is_null) = match v.text {
                Some(off) => (
                    raw::OidInputFunctionCall(
                        v.input_fn,
                        text.add(off) as *mut std::ffi::c_char,
                        v.ioparam,
                        v.typmod,
                    ),
                    false,
                ),
                None => (pg_sys::Datum::from(0), true),
            };
            *(*slot).tts_values.add(v.att) = datum;
            *(*slot).tts_isnull.add(v.att) = is_null;
        }
    }
}

/// A virtual slot of the table's row type with `vals` set (others NULL).
#[cfg(feature = "pg15")]
unsafe fn filled_slot(
    ex: &Exec,
    natts: usize,
    text: *mut u8,
    vals: &[AttrInput],
) -> *mut pg_sys::TupleTableSlot {
    unsafe {
        let slot = raw::ExecInitExtraTupleSlot(ex.estate, (*ex.rel).rd_att, &pg_sys::TTSOpsVirtual);
        for i in 0..natts {
            *(*slot).tts_values.add(i) = pg_sys::Datum::from(0);
            *(*slot).tts_isnull.add(i) = true;
        }
        set_attrs(slot, natts, text, vals);
        raw::ExecStoreVirtualTuple(slot);
        slot
    }
}

/// Finds the row whose key equals `key` and locks it; None when missing.
#[cfg(feature = "pg15")]
unsafe fn find(
    t: &Target,
    ex: &Exec,
    text: *mut u8,
    key: &[AttrInput],
) -> Option<*mut pg_sys::TupleTableSlot> {
    unsafe {
        let search = filled_slot(ex, t.natts, text, key);
        let local = raw::table_slot_create(ex.rel, &mut (*ex.estate).es_tupleTable);
        let found = raw::RelationFindReplTupleByIndex(
            ex.rel,
            t.index,
            pg_sys::LockTupleMode::LockTupleExclusive,
            search,
            local,
        );
        found.then_some(local)
    }
}

/// Runs `f` with an EvalPlanQual state (needed by the update and delete
/// helpers; the apply never rechecks, as in native apply).
#[cfg(feature = "pg15")]
unsafe fn with_epq(ex: &Exec, f: impl FnOnce(*mut pg_sys::EPQState)) {
    unsafe {
        let mut epq: pg_sys::EPQState = std::mem::zeroed();
        raw::EvalPlanQualInit(
            &mut epq,
            ex.estate,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            -1,
        );
        f(&mut epq);
        raw::EvalPlanQualEnd(&mut epq);
    }
}

#[cfg(feature = "pg15")]
pub fn insert(t: &Target, cxt: pg_sys::MemoryContext, text: &mut [u8], new: &[AttrInput]) {
    let text = text.as_mut_ptr();
    with_exec(t, cxt, |ex| unsafe {
        let slot = filled_slot(ex, t.natts, text, new);
        raw::ExecSimpleRelationInsert(ex.rri, ex.estate, slot);
    })
}

/// Updates the row with key `key`: attributes in `new` are replaced, the
/// others (unchanged TOAST values, generated columns) keep the local row's.
/// Returns false when no row has that key.
#[cfg(feature = "pg15")]
pub fn update(
    t: &Target,
    cxt: pg_sys::MemoryContext,
    text: &mut [u8],
    key: &[AttrInput],
    new: &[AttrInput],
) -> bool {
    let text = text.as_mut_ptr();
    with_exec(t, cxt, |ex| unsafe {
        let Some(local) = find(t, ex, text, key) else {
            return false;
        };
        let natts = t.natts;
        raw::slot_getsomeattrs_int(local, i32::try_from(natts).unwrap_or(0));
        let slot = raw::ExecInitExtraTupleSlot(ex.estate, (*ex.rel).rd_att, &pg_sys::TTSOpsVirtual);
        for i in 0..natts {
            *(*slot).tts_values.add(i) = *(*local).tts_values.add(i);
            *(*slot).tts_isnull.add(i) = *(*local).tts_isnull.add(i);
        }
        set_attrs(slot, natts, text, new);
        raw::ExecStoreVirtualTuple(slot);
        with_epq(ex, |epq| {
            raw::ExecSimpleRelationUpdate(ex.rri, ex.estate, epq, local, slot)
        });
        true
    })
}

/// Deletes the row with key `key`; false when there is none.
#[cfg(feature = "pg15")]
pub fn delete(t: &Target, cxt: pg_sys::MemoryContext, text: &mut [u8], key: &[AttrInput]) -> bool {
    let text = text.as_mut_ptr();
    with_exec(t, cxt, |ex| unsafe {
        let Some(local) = find(t, ex, text, key) else {
            return false;
        };
        with_epq(ex, |epq| {
            raw::ExecSimpleRelationDelete(ex.rri, ex.estate, epq, local)
        });
        true
    })
}

#[cfg(not(feature = "pg15"))]
pub fn insert(_t: &Target, _cxt: pg_sys::MemoryContext, _text: &mut [u8], _new: &[AttrInput]) {
    unreachable!("direct targets exist only on PostgreSQL 15")
}

#[cfg(not(feature = "pg15"))]
pub fn update(
    _t: &Target,
    _cxt: pg_sys::MemoryContext,
    _text: &mut [u8],
    _key: &[AttrInput],
    _new: &[AttrInput],
) -> bool {
    unreachable!("direct targets exist only on PostgreSQL 15")
}

#[cfg(not(feature = "pg15"))]
pub fn delete(
    _t: &Target,
    _cxt: pg_sys::MemoryContext,
    _text: &mut [u8],
    _key: &[AttrInput],
) -> bool {
    unreachable!("direct targets exist only on PostgreSQL 15")
}
