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

/// A value for one destination attribute (0-based attribute index).
pub struct AttrValue {
    pub att: usize,
    pub datum: pg_sys::Datum,
    pub is_null: bool,
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

#[cfg(feature = "pg15")]
struct Exec {
    rel: pg_sys::Relation,
    estate: *mut pg_sys::EState,
    rri: *mut pg_sys::ResultRelInfo,
}

/// Runs `f` with the table opened, an executor state and its result
/// relation set up as the apply worker does, then fires queued AFTER
/// triggers and releases everything.
#[cfg(feature = "pg15")]
unsafe fn with_exec<R>(t: &Target, f: impl FnOnce(&Exec) -> R) -> R {
    unsafe {
        let rel = pg_sys::table_open(t.relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let estate = pg_sys::CreateExecutorState();
        let rte = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>())
            as *mut pg_sys::RangeTblEntry;
        (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
        (*rte).rtekind = pg_sys::RTEKind::RTE_RELATION;
        (*rte).relid = t.relid;
        (*rte).relkind = (*(*rel).rd_rel).relkind;
        (*rte).rellockmode = pg_sys::AccessShareLock as i32;
        let rtable = pg_sys::lappend(std::ptr::null_mut(), rte.cast());
        pg_sys::ExecInitRangeTable(estate, rtable);
        let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            as *mut pg_sys::ResultRelInfo;
        (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
        (*estate).es_opened_result_relations =
            pg_sys::lappend((*estate).es_opened_result_relations, rri.cast());
        (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
        pg_sys::AfterTriggerBeginQuery();
        pg_sys::ExecOpenIndices(rri, false);
        let ex = Exec { rel, estate, rri };
        let r = f(&ex);
        pg_sys::ExecCloseIndices(rri);
        pg_sys::AfterTriggerEndQuery(estate);
        pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
        pg_sys::FreeExecutorState(estate);
        pg_sys::PopActiveSnapshot();
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::CommandCounterIncrement();
        r
    }
}

/// A virtual slot of the table's row type with `vals` set (others NULL).
#[cfg(feature = "pg15")]
unsafe fn filled_slot(ex: &Exec, natts: usize, vals: &[AttrValue]) -> *mut pg_sys::TupleTableSlot {
    unsafe {
        let slot =
            pg_sys::ExecInitExtraTupleSlot(ex.estate, (*ex.rel).rd_att, &pg_sys::TTSOpsVirtual);
        for i in 0..natts {
            *(*slot).tts_values.add(i) = pg_sys::Datum::from(0);
            *(*slot).tts_isnull.add(i) = true;
        }
        for v in vals.iter().filter(|v| v.att < natts) {
            *(*slot).tts_values.add(v.att) = v.datum;
            *(*slot).tts_isnull.add(v.att) = v.is_null;
        }
        pg_sys::ExecStoreVirtualTuple(slot);
        slot
    }
}

/// Finds the row whose key equals `key` and locks it; None when missing.
#[cfg(feature = "pg15")]
unsafe fn find(t: &Target, ex: &Exec, key: &[AttrValue]) -> Option<*mut pg_sys::TupleTableSlot> {
    unsafe {
        let search = filled_slot(ex, t.natts, key);
        let local = pg_sys::table_slot_create(ex.rel, &mut (*ex.estate).es_tupleTable);
        let found = pg_sys::RelationFindReplTupleByIndex(
            ex.rel,
            t.index,
            pg_sys::LockTupleMode::LockTupleExclusive,
            search,
            local,
        );
        found.then_some(local)
    }
}

#[cfg(feature = "pg15")]
pub fn insert(t: &Target, vals: &[AttrValue]) {
    unsafe {
        with_exec(t, |ex| {
            let slot = filled_slot(ex, t.natts, vals);
            pg_sys::ExecSimpleRelationInsert(ex.rri, ex.estate, slot);
        })
    }
}

/// Updates the row with key `key`: attributes in `new` are replaced, the
/// others (unchanged TOAST values, generated columns) keep the local row's.
/// Returns false when no row has that key.
#[cfg(feature = "pg15")]
pub fn update(t: &Target, key: &[AttrValue], new: &[AttrValue]) -> bool {
    unsafe {
        with_exec(t, |ex| {
            let Some(local) = find(t, ex, key) else {
                return false;
            };
            let natts = t.natts;
            pg_sys::slot_getsomeattrs_int(local, i32::try_from(natts).unwrap_or(0));
            let slot =
                pg_sys::ExecInitExtraTupleSlot(ex.estate, (*ex.rel).rd_att, &pg_sys::TTSOpsVirtual);
            for i in 0..natts {
                *(*slot).tts_values.add(i) = *(*local).tts_values.add(i);
                *(*slot).tts_isnull.add(i) = *(*local).tts_isnull.add(i);
            }
            for v in new.iter().filter(|v| v.att < natts) {
                *(*slot).tts_values.add(v.att) = v.datum;
                *(*slot).tts_isnull.add(v.att) = v.is_null;
            }
            pg_sys::ExecStoreVirtualTuple(slot);
            let mut epq: pg_sys::EPQState = std::mem::zeroed();
            pg_sys::EvalPlanQualInit(
                &mut epq,
                ex.estate,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                -1,
            );
            pg_sys::ExecSimpleRelationUpdate(ex.rri, ex.estate, &mut epq, local, slot);
            pg_sys::EvalPlanQualEnd(&mut epq);
            true
        })
    }
}

/// Deletes the row with key `key`; false when there is none.
#[cfg(feature = "pg15")]
pub fn delete(t: &Target, key: &[AttrValue]) -> bool {
    unsafe {
        with_exec(t, |ex| {
            let Some(local) = find(t, ex, key) else {
                return false;
            };
            let mut epq: pg_sys::EPQState = std::mem::zeroed();
            pg_sys::EvalPlanQualInit(
                &mut epq,
                ex.estate,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                -1,
            );
            pg_sys::ExecSimpleRelationDelete(ex.rri, ex.estate, &mut epq, local);
            pg_sys::EvalPlanQualEnd(&mut epq);
            true
        })
    }
}

#[cfg(not(feature = "pg15"))]
pub fn insert(_t: &Target, _vals: &[AttrValue]) {
    unreachable!("direct targets exist only on PostgreSQL 15")
}

#[cfg(not(feature = "pg15"))]
pub fn update(_t: &Target, _key: &[AttrValue], _new: &[AttrValue]) -> bool {
    unreachable!("direct targets exist only on PostgreSQL 15")
}

#[cfg(not(feature = "pg15"))]
pub fn delete(_t: &Target, _key: &[AttrValue]) -> bool {
    unreachable!("direct targets exist only on PostgreSQL 15")
}
