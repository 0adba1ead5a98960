//! The destination side of a connector, on the worker's main thread: the
//! replication origin that records progress in the same transaction as the
//! data, the relation map (source relation -> destination table and column
//! types), cached prepared SPI plans per (relation, operation, column set),
//! applying decoded changes, and bulk-loading snapshot rows through
//! PostgreSQL's COPY machinery.

use crate::conninfo::TableRef;
use crate::decode::{Message, OldKind, Relation, TupleValue};
use crate::direct;
use crate::schema::{self, ColumnChange};
use crate::source::{SourceTable, UserType};
use crate::sqlgen::{self, KeyMatch};
use crate::usercontext;
use bytes::{Buf, Bytes};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};

/// Sets up this session's replication origin (created when missing) and
/// returns the position up to which remote transactions are applied.
pub fn setup_origin(origin: &str) -> Result<u64, String> {
    let cname = CString::new(origin).map_err(|_| "origin name has a NUL byte".to_string())?;
    crate::pgtxn::run(|| unsafe {
        // A session can hold one origin; later attempts of the same worker
        // (after a retry) reuse it.
        if pg_sys::replorigin_session_origin != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            return pg_sys::replorigin_session_get_progress(false);
        }
        let mut id = pg_sys::replorigin_by_name(cname.as_ptr(), true);
        if id == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            id = pg_sys::replorigin_create(cname.as_ptr());
        }
        #[cfg(feature = "pg15")]
        pg_sys::replorigin_session_setup(id);
        #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
        pg_sys::replorigin_session_setup(id, 0);
        pg_sys::replorigin_session_origin = id;
        pg_sys::replorigin_session_get_progress(false)
    })
}

/// Moves the origin to `lsn` (from `synchdb_set_offset`): the session lets go
/// of it, the position is set, and the next `setup_origin` takes it again.
pub fn reset_origin(origin: &str, lsn: u64) -> Result<(), String> {
    unsafe {
        if pg_sys::replorigin_session_origin != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            crate::pgtxn::catch(|| pg_sys::replorigin_session_reset())?;
            pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
        }
    }
    crate::pgtxn::run(|| {
        Spi::run_with_args(
            "SELECT pg_catalog.pg_replication_origin_advance($1, $2::pg_lsn)",
            &[origin.into(), crate::lsn::format_lsn(lsn).as_str().into()],
        )
    })?
    .map_err(|e| e.to_string())
}

/// What the applier asks the source while streaming (new tables, added
/// columns). Implemented by the engine over its source connection.
pub trait SourceCatalog {
    /// The shape of a source table and the user-defined types it uses.
    fn describe(&mut self, table: &TableRef) -> Result<(SourceTable, Vec<UserType>), String>;
    /// The enum types (with their labels) among source type OIDs.
    fn enum_types(&mut self, oids: &[u32]) -> Result<Vec<UserType>, String>;
    /// The current name of a source relation, if it still exists.
    fn relation_name(&mut self, relid: u32) -> Result<Option<TableRef>, String>;
    /// The default expression of a source column, if it has one.
    fn column_default(&mut self, relid: u32, column: &str) -> Result<Option<String>, String>;
    /// The partitioned tables above a source relation that is a
    /// partition, nearest first: OID and name.
    fn partition_ancestors(&mut self, relid: u32) -> Result<Vec<(u32, TableRef)>, String>;
    /// The OIDs of the leaf partitions under a partitioned source table.
    fn partition_leaves(&mut self, root: u32) -> Result<Vec<u32>, String>;
}

/// Type OIDs below this are assigned in PostgreSQL's bootstrap catalogs and
/// name the same built-in type on every server of every version. (Types
/// initdb creates later, such as information_schema's domains, lie between
/// this and 16384 and may differ between servers: they are compared by
/// name, like user-defined types.)
const FIRST_NORMAL_OID: u32 = 10000;

/// Where a captured source table lands, and its snapshot position.
#[derive(Debug, Clone)]
pub struct TableTarget {
    pub dst_schema: String,
    pub dst_table: String,
    /// Changes of transactions whose commit LSN is below this are already in
    /// the table's snapshot and are skipped.
    pub sync_lsn: u64,
    /// The source table's OID when known (0: not yet seen).
    pub src_relid: u32,
    /// The destination columns that mirror source columns (the others are
    /// the DBA's own and are never dropped or renamed); None when not
    /// recorded (every stored column then counts as the source's).
    pub src_columns: Option<Vec<String>>,
}

struct DestColumn {
    attnum: i16,
    type_oid: pg_sys::Oid,
    /// Whether the type has a default equality operator (else rows are
    /// matched on the column's text form).
    has_eq: bool,
    typmod: i32,
    input_fn: pg_sys::Oid,
    ioparam: pg_sys::Oid,
}

struct RelEntry {
    rel: Relation,
    /// Whether what the Relation message implies (renames, schema changes,
    /// a new table) is applied and the maps below are built. Done at the
    /// first change of a transaction newer than the table's copy: nothing
    /// older than a copy may reshape it.
    synced: bool,
    /// The destination table's OID once synced.
    dest_relid: Option<pg_sys::Oid>,
    /// The local transaction (`Applier::xact_seq`) in which the destination
    /// table was last locked: held until commit, so that no DDL can change
    /// it between reading its definition and writing into it.
    locked_in: u64,
    /// None once synced: the table is not replicated (skipped).
    target: Option<TableTarget>,
    /// Per source column: its destination column (None: not there).
    dest: Vec<Option<DestColumn>>,
    plans: HashMap<(u8, Vec<bool>), pg_sys::SPIPlanPtr>,
    /// Set when rows can be changed directly through the key's index.
    direct: Option<direct::Target>,
    /// The destination table's owner when changes must run as it (it is
    /// not the worker's role); read when synced, so a new owner is seen
    /// through the relcache invalidation that ALTER TABLE ... OWNER sends.
    run_as: Option<pg_sys::Oid>,
}

/// What the last applied change was, for `last_dbz_offset`.
#[derive(Debug, Clone, Default)]
pub struct Position {
    pub lsn_proc: u64,
    pub message_type: &'static str,
    pub lsn_commit: u64,
    pub lsn: u64,
    pub xid: u32,
    pub ts_usec: i64,
}

impl Position {
    pub fn to_json(&self) -> String {
        format!(
            "{{\"lsn_proc\":{},\"messageType\":\"{}\",\"lsn_commit\":{},\"lsn\":{},\"txId\":{},\"ts_usec\":{}}}",
            self.lsn_proc, self.message_type, self.lsn_commit, self.lsn, self.xid, self.ts_usec
        )
    }
}

/// Counters of what was applied.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub transactions: u64,
    pub ddl: u64,
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub truncates: u64,
    pub skipped: u64,
    pub missing_rows: u64,
}

/// Applies one remote transaction at a time inside one local transaction.
pub struct Applier<'c> {
    connector: String,
    catalog: &'c mut dyn SourceCatalog,
    /// The last name seen for each source relation OID (renames).
    names_by_relid: HashMap<u32, TableRef>,
    rels: HashMap<u32, RelEntry>,
    targets: HashMap<TableRef, TableTarget>,
    /// Partitions published under their own name: their captured root.
    partition_of: HashMap<u32, (u32, TableRef)>,
    /// Set while a partition's Relation message (made to describe its
    /// root) is followed: its key is the partition's own.
    via_partition: bool,
    /// What the connector captures (the schema, or the explicit list): a
    /// table outside it that the publication carries (an admin's
    /// publication may publish more) is never applied.
    pub captured: Option<(String, Option<Vec<TableRef>>)>,
    /// Tables created on the source while streaming are copied rather than
    /// built from the stream: the publication did not carry them from their
    /// creation (a source before 15, or an admin's publication).
    pub copy_late_tables: bool,
    /// Set, with an ERROR raised, when a table the stream brings must be
    /// copied (`copy_late_tables`): the engine records it and restarts.
    pub late_copy: Option<TableRef>,
    /// May tables be created from Relation messages when missing (not in `never`).
    create_missing: bool,
    dst_schema: String,
    in_xact: bool,
    /// Whether this transaction opened an SPI connection (only the prepared
    /// statement path needs one; it is opened on first use).
    spi: bool,
    final_lsn: u64,
    xid: u32,
    commit_ts: i64,
    change_idx: u64,
    /// Set while a row change or TRUNCATE is being applied: an ERROR then
    /// belongs to that change (the skip strategy skips exactly it).
    in_change: bool,
    /// Counts local transactions (for `RelEntry::locked_in`).
    xact_seq: u64,
    /// Changes to skip, (final_lsn, index in its transaction), set by the skip strategy.
    pub skip: Vec<(u64, u64)>,
    /// The source relation (OID) of the change being applied, for error
    /// context; its name is in `names_by_relid`.
    current_rel_id: Option<u32>,
    pub last: Position,
    pub counters: Counters,
    /// May a table be copied again when a change cannot be followed in
    /// place (modes that copy data: initial, always).
    pub can_resync: bool,
    /// Set, with an ERROR raised, when a table must be copied again: the
    /// engine drops it and restarts so that the snapshot path rebuilds it.
    pub resync: Option<(TableRef, TableTarget)>,
    change_cxt: pgrx::PgMemoryContexts,
}

impl<'c> Applier<'c> {
    pub fn new(
        connector: &str,
        catalog: &'c mut dyn SourceCatalog,
        targets: HashMap<TableRef, TableTarget>,
        dst_schema: &str,
        create_missing: bool,
    ) -> Applier<'c> {
        let names_by_relid = targets
            .iter()
            .filter(|(_, t)| t.src_relid != 0)
            .map(|(k, t)| (t.src_relid, k.clone()))
            .collect();
        Applier {
            connector: connector.to_string(),
            catalog,
            names_by_relid,
            rels: HashMap::new(),
            targets,
            partition_of: HashMap::new(),
            via_partition: false,
            captured: None,
            copy_late_tables: false,
            late_copy: None,
            create_missing,
            dst_schema: dst_schema.to_string(),
            in_xact: false,
            spi: false,
            final_lsn: 0,
            xid: 0,
            commit_ts: 0,
            change_idx: 0,
            in_change: false,
            xact_seq: 0,
            skip: Vec::new(),
            current_rel_id: None,
            last: Position::default(),
            counters: Counters::default(),
            can_resync: false,
            resync: None,
            change_cxt: pgrx::PgMemoryContexts::new("synchdb change"),
        }
    }

    pub fn in_transaction(&self) -> bool {
        self.in_xact
    }

    pub fn begin(&mut self, final_lsn: u64, xid: u32, commit_ts: i64) {
        crate::pgtxn::start();
        self.in_change = false;
        self.xact_seq += 1;
        self.spi = false;
        self.in_xact = true;
        self.final_lsn = final_lsn;
        self.xid = xid;
        self.commit_ts = commit_ts;
        self.change_idx = 0;
    }

    /// Commits the local transaction, recording the remote commit position
    /// in the replication origin within it.
    /// Returns the end of the local commit record (for flush tracking).
    pub fn commit(&mut self, commit_lsn: u64, end_lsn: u64, commit_ts: i64) -> u64 {
        if self.spi {
            unsafe { pg_sys::SPI_finish() };
            self.spi = false;
        }
        unsafe {
            pg_sys::replorigin_session_origin_lsn = end_lsn;
            pg_sys::replorigin_session_origin_timestamp = commit_ts;
        }
        crate::pgtxn::commit();
        let local_end = unsafe { pg_sys::XactLastCommitEnd };
        unsafe {
            pg_sys::replorigin_session_origin_lsn = 0;
            pg_sys::replorigin_session_origin_timestamp = 0;
        }
        self.in_xact = false;
        self.counters.transactions += 1;
        self.last.lsn_commit = commit_lsn;
        self.last.lsn = end_lsn;
        self.last.xid = self.xid;
        self.last.ts_usec = crate::decode::pg_ts_to_unix_usec(commit_ts);
        if self.last.lsn_proc < commit_lsn && self.last.message_type.is_empty() {
            self.last.lsn_proc = commit_lsn;
        }
        local_end
    }

    /// Throws the current transaction away after an error (and forgets plans,
    /// which may be invalid now).
    pub fn abort(&mut self) {
        if self.in_xact || crate::pgtxn::in_transaction() {
            crate::pgtxn::abort();
        }
        self.in_xact = false;
        self.spi = false;
        for entry in self.rels.values_mut() {
            entry.plans.clear();
        }
        self.rels.clear();
    }

    /// Applies one decoded message of the current transaction. Raises an
    /// ERROR (caught by the caller) when the change cannot be applied.
    pub fn apply(&mut self, msg: Message, wal_start: u64) {
        match msg {
            Message::Relation(rel) => self.relation(rel),
            Message::Insert { rel_id, new } => {
                if self.take_change("INSERT", wal_start) {
                    self.change(rel_id, |a, e| a.insert(e, new));
                    self.counters.inserts += 1;
                }
            }
            Message::Update { rel_id, old, new } => {
                if self.take_change("UPDATE", wal_start) {
                    self.change(rel_id, |a, e| a.update(e, old.as_ref(), &new));
                    self.counters.updates += 1;
                }
            }
            Message::Delete { rel_id, old } => {
                if self.take_change("DELETE", wal_start) {
                    self.change(rel_id, |a, e| a.delete(e, &old));
                    self.counters.deletes += 1;
                }
            }
            Message::Truncate {
                restart_identity,
                rel_ids,
                ..
            } => {
                if self.take_change("TRUNCATE", wal_start) {
                    self.truncate(&rel_ids, restart_identity);
                    self.counters.truncates += 1;
                }
            }
            Message::Begin { .. }
            | Message::Commit { .. }
            | Message::Origin { .. }
            | Message::Type { .. }
            | Message::Message { .. } => {}
        }
        self.in_change = false;
        unsafe { pg_sys::MemoryContextReset(self.change_cxt.value()) };
    }

    /// Counts the change; false when the skip strategy drops this one.
    fn take_change(&mut self, kind: &'static str, wal_start: u64) -> bool {
        self.in_change = true;
        let idx = self.change_idx;
        self.change_idx += 1;
        self.last.lsn_proc = wal_start.max(self.last.lsn_proc);
        self.last.message_type = kind;
        if self.skip.contains(&(self.final_lsn, idx)) {
            self.counters.skipped += 1;
            pgrx::warning!(
                "synchdb: skipped {kind} #{idx} of remote transaction {} (commit LSN {}) after an apply error",
                self.xid,
                crate::lsn::format_lsn(self.final_lsn)
            );
            return false;
        }
        true
    }

    /// The source type OIDs of the columns of the relation of the last
    /// change (taken before an abort forgets the relation).
    pub fn current_type_oids(&self) -> Vec<u32> {
        self.current_rel_id
            .and_then(|id| self.rels.get(&id))
            .map(|e| e.rel.columns.iter().map(|c| c.type_oid).collect())
            .unwrap_or_default()
    }

    /// Adds to the destination's enum types the labels the source added
    /// since they were created (`ALTER TYPE ... ADD VALUE` is not in the
    /// stream), for the enum types among `type_oids` (source OIDs). Runs in
    /// its own transaction; returns how many labels were added.
    pub fn sync_enum_labels(&mut self, type_oids: &[u32]) -> Result<usize, String> {
        let oids: Vec<u32> = type_oids
            .iter()
            .copied()
            .filter(|o| *o >= FIRST_NORMAL_OID)
            .collect();
        if oids.is_empty() {
            return Ok(0);
        }
        let dst_schema = self
            .current_table()
            .and_then(|k| self.targets.get(&k))
            .map(|t| t.dst_schema.clone())
            .unwrap_or_else(|| self.dst_schema.clone());
        let types = self.catalog.enum_types(&oids)?;
        crate::pgtxn::run(|| schema::add_enum_labels(&types, &dst_schema))
    }

    /// The change whose apply raised the last ERROR (None when the ERROR
    /// came from elsewhere, e.g. the commit).
    pub fn failed_change(&self) -> Option<(u64, u64)> {
        self.in_change
            .then(|| (self.final_lsn, self.change_idx.saturating_sub(1)))
    }

    /// Where the apply stands, for error messages.
    pub fn context(&self) -> String {
        let mut s = format!(
            "remote transaction {} (commit LSN {})",
            self.xid,
            crate::lsn::format_lsn(self.final_lsn)
        );
        if let Some(t) = self.current_table() {
            s = format!("table {t}, {s}");
        }
        s
    }

    fn current_table(&self) -> Option<TableRef> {
        let id = self.current_rel_id?;
        match self.rels.get(&id) {
            Some(e) => Some(TableRef {
                schema: e.rel.namespace.clone(),
                table: e.rel.name.clone(),
            }),
            None => self.names_by_relid.get(&id).cloned(),
        }
    }

    /// Takes note of a Relation message. Nothing is done to the destination
    /// yet: the message may belong to a transaction older than the table's
    /// copy, whose shape the copy has already left behind.
    fn relation(&mut self, mut rel: Relation) {
        let msg_id = rel.id;
        if let Some(mut old) = self.rels.remove(&msg_id) {
            for (_, p) in old.plans.drain() {
                unsafe { pg_sys::SPI_freeplan(p) };
            }
        }
        // A Relation message follows any change to the relation (a detach
        // too): what it is a partition of is looked up again.
        self.partition_of.remove(&msg_id);
        self.as_partition_root(&mut rel);
        self.current_rel_id = Some(msg_id);
        self.rels.insert(
            msg_id,
            RelEntry {
                rel,
                synced: false,
                dest_relid: None,
                locked_in: 0,
                target: None,
                dest: Vec::new(),
                plans: HashMap::new(),
                direct: None,
                run_as: None,
            },
        );
    }

    /// Whether source table `t` is one the connector captures.
    fn is_captured(&self, t: &TableRef) -> bool {
        match &self.captured {
            None => true,
            Some((_, Some(list))) => list.contains(t),
            Some((schema, None)) => &t.schema == schema,
        }
    }

    /// A partition published under its own name (by a source before
    /// PostgreSQL 13, or a publication without publish_via_partition_root)
    /// is applied as its captured root table: the Relation message is made
    /// to describe the root (partitions have the root's columns). The
    /// message's own relation id still keys the entry.
    fn as_partition_root(&mut self, rel: &mut Relation) {
        let key = TableRef {
            schema: rel.namespace.clone(),
            table: rel.name.clone(),
        };
        if self.targets.values().any(|t| t.src_relid == rel.id) || self.targets.contains_key(&key) {
            return;
        }
        if let Some(root) = self.partition_of.get(&rel.id) {
            let (oid, name) = root.clone();
            rel.id = oid;
            rel.namespace = name.schema;
            rel.name = name.table;
            return;
        }
        let ancestors = match self.catalog.partition_ancestors(rel.id) {
            Ok(r) => r,
            Err(e) => pgrx::error!("finding the partitioned table of source relation {key}: {e}"),
        };
        // The nearest captured ancestor (a captured partitioned table may
        // itself be a partition of one that is not captured).
        let found = ancestors.into_iter().find(|(oid, name)| {
            self.targets.values().any(|t| t.src_relid == *oid) || self.targets.contains_key(name)
        });
        let Some((oid, name)) = found else { return };
        self.partition_of.insert(rel.id, (oid, name.clone()));
        rel.id = oid;
        rel.namespace = name.schema;
        rel.name = name.table;
    }

    /// The copy position that decides whether the current transaction may
    /// touch source relation `rel`: that of the table with its OID, else of
    /// the table with its name (an older incarnation of a re-created table).
    fn sync_lsn_for(&self, rel: &Relation) -> u64 {
        if let Some(t) = self.targets.values().find(|t| t.src_relid == rel.id) {
            return t.sync_lsn;
        }
        let key = TableRef {
            schema: rel.namespace.clone(),
            table: rel.name.clone(),
        };
        self.targets.get(&key).map(|t| t.sync_lsn).unwrap_or(0)
    }

    /// Makes relation `rel_id` ready for a change of the current transaction.
    /// False when the change must not touch the destination: the transaction
    /// is older than the table's copy, or the table is not replicated.
    fn ready(&mut self, rel_id: u32) -> bool {
        // Lock the destination table first: taking the lock processes the
        // invalidations of DDL committed before it, and holding it keeps
        // any other from committing until this transaction ends.
        let seq = self.xact_seq;
        if let Some(e) = self.rels.get_mut(&rel_id) {
            if let (Some(relid), true) = (e.dest_relid, e.locked_in != seq) {
                unsafe {
                    pg_sys::LockRelationOid(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE)
                };
                e.locked_in = seq;
            }
        }
        self.refresh_invalidated();
        let Some(entry) = self.rels.get(&rel_id) else {
            pgrx::error!("change for relation id {rel_id} arrived before its Relation message");
        };
        if !entry.synced {
            if self.final_lsn < self.sync_lsn_for(&entry.rel) {
                return false;
            }
            self.sync_entry(rel_id);
            if let Some(relid) = self.rels.get(&rel_id).and_then(|e| e.dest_relid) {
                // Invalidations from the DDL just run: the maps were read after it.
                crate::relcache::forget(relid);
            }
        }
        matches!(self.rels.get(&rel_id).and_then(|e| e.target.as_ref()), Some(t) if self.final_lsn >= t.sync_lsn)
    }

    /// Destination tables whose definition changed (a DBA's DDL, or ours)
    /// have their maps rebuilt before their next change.
    fn refresh_invalidated(&mut self) {
        let (all, list) = crate::relcache::take();
        if !all && list.is_empty() {
            return;
        }
        for e in self.rels.values_mut() {
            if !e.synced {
                continue;
            }
            if all || e.dest_relid.is_some_and(|r| list.contains(&r)) {
                for (_, p) in e.plans.drain() {
                    unsafe { pg_sys::SPI_freeplan(p) };
                }
                e.synced = false;
                e.direct = None;
            }
        }
    }

    /// Applies what the Relation message of `rel_id` implies: a rename, a
    /// table created or re-created on the source, column changes; then maps
    /// source columns onto the destination table.
    fn sync_entry(&mut self, rel_id: u32) {
        let rel = self.rels[&rel_id].rel.clone();
        self.via_partition = rel.id != rel_id;
        let key = TableRef {
            schema: rel.namespace.clone(),
            table: rel.name.clone(),
        };
        // The table is found by its OID first: a source table renamed keeps
        // it. The stream's name is followed when it is free; when another
        // table holds it (the stream replays an older name after a later
        // rename was already followed), the OID's table is used as it is.
        let by_oid = self
            .targets
            .iter()
            .find(|(_, t)| t.src_relid == rel.id)
            .map(|(k, _)| k.clone());
        let key = match by_oid {
            Some(k) if k != key && !self.targets.contains_key(&key) => {
                self.rename_table(&k, &key);
                key
            }
            Some(k) => k,
            None => key,
        };
        self.names_by_relid.insert(rel.id, key.clone());
        let mut known = self.targets.get(&key).cloned();
        if let Some(t) = known.clone() {
            if t.src_relid != 0 && t.src_relid != rel.id {
                // Another source table had this name. If it still exists
                // under another name it was renamed away (and keeps its
                // destination table, renamed with it): this one is new.
                if let Ok(Some(now)) = self.catalog.relation_name(t.src_relid) {
                    if now != key && !self.targets.contains_key(&now) {
                        self.rename_table(&key, &now);
                        known = None;
                    }
                }
            }
        }
        let mut target = known.clone().unwrap_or_else(|| TableTarget {
            // A table the stream brings that the snapshot did not know
            // (created later on the source): it lands in the destination
            // schema under its own name.
            dst_schema: self.dst_schema.clone(),
            dst_table: rel.name.clone(),
            sync_lsn: 0,
            src_relid: rel.id,
            src_columns: None,
        });
        if known.is_none() && !self.is_captured(&key) {
            // Published but not captured (an admin's publication may carry
            // more tables): never applied.
            if let Some(e) = self.rels.get_mut(&rel_id) {
                e.target = None;
                e.synced = true;
            }
            return;
        }
        if known.is_none() && self.copy_late_tables && self.create_missing {
            // Its rows written before it joined the publication are not in
            // the stream: it is copied under a fresh snapshot instead.
            self.late_copy = Some(key.clone());
            pgrx::error!("source table {key} is new; it is copied");
        }
        schema::require_table(&target.dst_schema, &target.dst_table);
        let existing = schema::relid(&target.dst_schema, &target.dst_table);
        if let Some(relid) = existing {
            unsafe { pg_sys::LockRelationOid(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) };
        }
        let replicated = if existing.is_some() {
            if known.is_none()
                && self.create_missing
                && !schema::owned_by(&self.connector, &target.dst_schema, &target.dst_table)
            {
                pgrx::error!(
                    "destination table {}.{} for new source table {key} already exists and was not created by connector \"{}\"; drop or rename it, or use mode never",
                    target.dst_schema,
                    target.dst_table,
                    self.connector
                );
            }
            if target.src_relid != 0 && target.src_relid != rel.id {
                self.recreated(&rel, &key, &mut target);
            } else if target.src_relid == 0 {
                target.src_relid = rel.id;
                schema::set_src_relid(&self.connector, &key, rel.id);
            }
            self.follow_schema(&rel, &key, &mut target);
            true
        } else {
            if !self.create_missing {
                pgrx::error!(
                    "destination table {}.{} for source table {key} does not exist; in mode never the captured tables must be created first",
                    target.dst_schema,
                    target.dst_table,
                );
            }
            if known.as_ref().is_some_and(|t| t.sync_lsn != 0) && self.can_resync {
                // A copied table vanished from the destination: copy it again.
                self.resync = Some((key.clone(), target.clone()));
                pgrx::error!(
                    "destination table {}.{} for source table {key} does not exist any more; it is copied again",
                    target.dst_schema,
                    target.dst_table
                );
            }
            self.create_late_table(&rel, &key, &mut target)
        };
        let entry_target = if replicated {
            self.targets.insert(key.clone(), target.clone());
            Some(target)
        } else {
            None
        };
        let (dest, stored, relid) = match &entry_target {
            Some(t) => {
                let (d, s) = dest_columns(&rel, t);
                (d, s, schema::relid(&t.dst_schema, &t.dst_table))
            }
            None => (Vec::new(), 0, None),
        };
        let run_as = relid.and_then(usercontext::run_as);
        if let (Some(relid), Some(owner)) = (relid, run_as) {
            usercontext::refuse_untrusted_owner(relid, owner);
            usercontext::refuse_row_security(relid, owner);
        }
        let direct = entry_target
            .as_ref()
            .and_then(|t| direct_target(&rel, t, &dest, stored));
        if let Some(direct) = &direct {
            pgrx::debug1!("synchdb: {key} is applied directly: {direct:?}");
        }
        let seq = self.xact_seq;
        if let Some(e) = self.rels.get_mut(&rel_id) {
            e.target = entry_target;
            e.dest = dest;
            e.direct = direct;
            e.run_as = run_as;
            e.dest_relid = relid;
            e.synced = true;
            e.locked_in = seq;
        }
    }

    /// Creates the destination table of a source table the snapshot did not
    /// know. Its shape comes from the source catalog when the catalog still
    /// has this very table (same OID: user-defined types, NOT NULL, primary
    /// key), else from the Relation message itself; a table that no longer
    /// exists and uses types the stream cannot name is skipped (logged and
    /// counted). Returns whether the table is replicated.
    fn create_late_table(&mut self, rel: &Relation, key: &TableRef, t: &mut TableTarget) -> bool {
        let described = self
            .catalog
            .describe(key)
            .ok()
            .filter(|(shape, _)| shape.oid == rel.id);
        match described {
            Some((shape, types)) => {
                schema::ensure_user_types(&types, &t.dst_schema);
                schema::create_table(&t.dst_schema, &t.dst_table, &shape, false);
            }
            None => {
                if let Some(c) = rel.columns.iter().find(|c| c.type_oid >= FIRST_NORMAL_OID) {
                    self.counters.skipped += 1;
                    pgrx::log!(
                        "synchdb: connector \"{}\": source table {key} (OID {}) no longer exists on the source and its column \"{}\" has a user-defined type; its changes are skipped",
                        self.connector,
                        rel.id,
                        c.name
                    );
                    return false;
                }
                schema::create_table_from_stream(&t.dst_schema, &t.dst_table, rel);
                pgrx::log!(
                    "synchdb: connector \"{}\": source table {key} (OID {}) is not in the source catalog any more; {}.{} is built from the stream's description",
                    self.connector,
                    rel.id,
                    t.dst_schema,
                    t.dst_table
                );
            }
        }
        let cols: Vec<String> = rel.columns.iter().map(|c| c.name.clone()).collect();
        t.src_relid = rel.id;
        t.sync_lsn = 0;
        schema::record_table(
            &self.connector,
            key,
            &t.dst_schema,
            &t.dst_table,
            rel.id,
            0,
            0,
            None,
        );
        self.counters.ddl += 1;
        pgrx::log!(
            "synchdb: connector \"{}\" created {}.{} for new source table {key}",
            self.connector,
            t.dst_schema,
            t.dst_table
        );
        // The catalog may be ahead of the stream: bring the new (empty)
        // table to the shape this Relation message announces.
        self.follow_schema(rel, key, t);
        if t.src_columns.is_none() {
            t.src_columns = Some(cols.clone());
            schema::set_src_columns(&self.connector, key, &cols);
        }
        true
    }

    /// The source table was dropped and created again under the same name
    /// (a new OID): none of the old rows may stay.
    fn recreated(&mut self, rel: &Relation, key: &TableRef, t: &mut TableTarget) {
        self.counters.ddl += 1;
        if self.can_resync {
            self.resync = Some((key.clone(), t.clone()));
            pgrx::error!(
                "source table {key} was dropped and created again (OID {} became {}); the table is copied again",
                t.src_relid,
                rel.id
            );
        }
        let truncate = format!(
            "TRUNCATE {}",
            sqlgen::qualified(&t.dst_schema, &t.dst_table)
        );
        usercontext::as_owner(schema::relid(&t.dst_schema, &t.dst_table), || {
            schema::run_ddl(&truncate)
        });
        pgrx::log!(
            "synchdb: connector \"{}\": source table {key} was dropped and created again (OID {} became {}); emptied {}.{}",
            self.connector,
            t.src_relid,
            rel.id,
            t.dst_schema,
            t.dst_table
        );
        t.src_relid = rel.id;
        schema::set_src_relid(&self.connector, key, rel.id);
    }

    fn rename_table(&mut self, old: &TableRef, new: &TableRef) {
        let Some(t) = self.targets.remove(old) else {
            return;
        };
        let renamed = TableTarget {
            dst_table: schema::follow_table_rename(
                &self.connector,
                old,
                new,
                &t.dst_schema,
                &t.dst_table,
            ),
            ..t.clone()
        };
        self.counters.ddl += 1;
        pgrx::log!(
            "synchdb: connector \"{}\": source table {old} was renamed to {new}; renamed {}.{} to {}",
            self.connector,
            t.dst_schema,
            t.dst_table,
            renamed.dst_table
        );
        self.targets.insert(new.clone(), renamed);
    }

    /// Brings the destination table to the shape a Relation message
    /// announces. Columns the destination has that never came from the
    /// source are the DBA's and are left alone. In modes that copy data, a
    /// change that existing rows cannot follow exactly from the stream alone
    /// (an added column, whose values for existing rows come from a default
    /// that may be volatile or changed since; a retyped column, possibly
    /// through a USING expression; a rename, indistinguishable from a drop
    /// and an add) makes the table be copied again under a fresh snapshot,
    /// unless the table is empty. Dropped columns are dropped in place.
    fn follow_schema(&mut self, rel: &Relation, key: &TableRef, t: &mut TableTarget) {
        let dest = schema::dest_columns(&t.dst_schema, &t.dst_table);
        let owned = |name: &str| match &t.src_columns {
            Some(list) => list.iter().any(|c| c == name),
            None => true,
        };
        let src: Vec<(String, Option<u32>, i32)> = rel
            .columns
            .iter()
            .map(|c| {
                let builtin = c.type_oid < FIRST_NORMAL_OID;
                (c.name.clone(), builtin.then_some(c.type_oid), c.type_mod)
            })
            .collect();
        let rel_names: Vec<String> = rel.columns.iter().map(|c| c.name.clone()).collect();
        let dst: Vec<(String, u32, i32)> = dest
            .iter()
            .filter(|d| !d.generated && owned(&d.name))
            .map(|d| (d.name.clone(), u32::from(d.type_oid), d.typmod))
            .collect();
        let mut changes = schema::diff_columns(&src, &dst);
        if !self.create_missing {
            // Mode never: the destination tables are the user's. Columns the
            // source lacks are kept (they may be the user's own); a column the
            // destination lacks is added so that no value is lost.
            changes = changes
                .into_iter()
                .filter_map(|c| match c {
                    ColumnChange::Drop { .. } => None,
                    ColumnChange::Rename { to, .. } => rel
                        .columns
                        .iter()
                        .position(|c| c.name == to)
                        .map(|i| ColumnChange::Add {
                            name: to,
                            source_index: i,
                        }),
                    other => Some(other),
                })
                .collect();
        }
        // A primary key changed on the source (default replica identity:
        // the key columns are flagged): the destination's key, and the rows
        // it would now reject or let in twice, follow through a fresh copy.
        if self.can_resync && rel.replica_identity == b'd' && !self.via_partition {
            let mut src_key: Vec<String> = rel
                .columns
                .iter()
                .filter(|c| c.is_key)
                .map(|c| c.name.clone())
                .collect();
            if !src_key.is_empty() {
                let mut dst_key = schema::primary_key_columns(&t.dst_schema, &t.dst_table);
                src_key.sort();
                dst_key.sort();
                if src_key != dst_key {
                    self.resync = Some((key.clone(), t.clone()));
                    self.counters.ddl += 1;
                    pgrx::error!(
                        "the primary key of source table {key} is ({}), the destination's is ({}); the table is copied again",
                        src_key.join(", "),
                        dst_key.join(", ")
                    );
                }
            }
        }
        if changes.is_empty() {
            if t.src_columns.as_ref() != Some(&rel_names) {
                t.src_columns = Some(rel_names.clone());
                schema::set_src_columns(&self.connector, key, &rel_names);
            }
            return;
        }
        let target = sqlgen::qualified(&t.dst_schema, &t.dst_table);
        let empty = schema::is_empty(&t.dst_schema, &t.dst_table);
        let only_drops = changes
            .iter()
            .all(|c| matches!(c, ColumnChange::Drop { .. }));
        if self.can_resync && !empty && !only_drops {
            self.resync = Some((key.clone(), t.clone()));
            self.counters.ddl += 1;
            let what: Vec<String> = changes.iter().map(describe_change).collect();
            pgrx::error!(
                "source table {key} changed shape ({}); the table is copied again",
                what.join(", ")
            );
        }
        let mut shape: Option<Option<SourceTable>> = None;
        for ch in changes {
            if let ColumnChange::Add { name, .. } = &ch {
                // A column of the DBA's that the source now has by the same
                // name becomes the source's (a table with rows was copied
                // again above, in modes that copy).
                if dest.iter().any(|d| &d.name == name) {
                    if !empty {
                        pgrx::warning!(
                            "synchdb: column \"{name}\" that the source added to {key} already existed in {target} (added there by hand); it mirrors the source column from now on and keeps its values in existing rows (this mode does not copy tables again)"
                        );
                    }
                    continue;
                }
            }
            let ddl = match &ch {
                ColumnChange::Rename { from, to } => format!(
                    "ALTER TABLE {target} RENAME COLUMN {} TO {}",
                    sqlgen::quote_ident(from),
                    sqlgen::quote_ident(to)
                ),
                ColumnChange::Drop { name } => {
                    format!(
                        "ALTER TABLE {target} DROP COLUMN {}",
                        sqlgen::quote_ident(name)
                    )
                }
                ColumnChange::Add { name, source_index }
                | ColumnChange::Retype { name, source_index } => {
                    // The catalog names user-defined types; it is read only
                    // when it still describes this very table.
                    if shape.is_none() {
                        shape = Some(match self.catalog.describe(key) {
                            Ok((s, types)) if s.oid == rel.id => {
                                schema::ensure_user_types(&types, &t.dst_schema);
                                Some(s)
                            }
                            _ => None,
                        });
                    }
                    let col = shape
                        .as_ref()
                        .and_then(|s| s.as_ref())
                        .and_then(|s| s.columns.iter().find(|c| &c.name == name).cloned());
                    let rc = &rel.columns[*source_index];
                    let ty = match &col {
                        Some(col)
                            if col.type_oid == rc.type_oid || rc.type_oid >= FIRST_NORMAL_OID =>
                        {
                            schema::type_sql(
                                &col.ty,
                                &t.dst_schema,
                                &format!("column \"{name}\" of {key}"),
                            )
                        }
                        _ if rc.type_oid < FIRST_NORMAL_OID => {
                            schema::format_type(rc.type_oid, rc.type_mod)
                        }
                        _ => {
                            pgrx::warning!(
                                "synchdb: column \"{name}\" of {key} is no longer in the source catalog and has a user-defined type; it is kept as text"
                            );
                            "text".to_string()
                        }
                    };
                    if matches!(ch, ColumnChange::Retype { .. }) {
                        if !empty {
                            pgrx::warning!(
                                "synchdb: column \"{name}\" of {key} changed type; existing destination values are converted through their text form (this mode does not copy tables again)"
                            );
                        }
                        format!(
                            "ALTER TABLE {target} ALTER COLUMN {c} TYPE {ty} USING {c}::text::{ty}",
                            c = sqlgen::quote_ident(name)
                        )
                    } else {
                        let mut d = format!(
                            "ALTER TABLE {target} ADD COLUMN {} {ty}",
                            sqlgen::quote_ident(name)
                        );
                        if !empty && col.is_some() {
                            // Modes that never copy: existing rows got the
                            // default on the source; a volatile one (a
                            // sequence's too) cannot be reproduced here and
                            // is left out (untrusted::default_expression).
                            let default = self.catalog.column_default(rel.id, name).unwrap_or(None);
                            let what = format!("default of column \"{name}\" of {key}");
                            if let Some((def, pasted)) = default.and_then(|def| {
                                crate::untrusted::default_expression(&def, &what).map(|p| (def, p))
                            }) {
                                pgrx::warning!(
                                    "synchdb: column \"{name}\" added to {key} with default {def}: existing destination rows get the default evaluated here (this mode does not copy tables again)"
                                );
                                d.push_str(&format!(" DEFAULT {pasted}"));
                            }
                        }
                        d
                    }
                }
            };
            // As the table's owner: a rewrite evaluates its CHECK
            // constraints, defaults and casts.
            usercontext::as_owner(schema::relid(&t.dst_schema, &t.dst_table), || {
                schema::run_ddl(&ddl)
            });
            self.counters.ddl += 1;
            pgrx::log!(
                "synchdb: connector \"{}\" followed a schema change of {key}: {ddl}",
                self.connector
            );
        }
        // Keep the DBA's columns apart from the source's from now on.
        let mut cols = rel_names;
        if !self.create_missing {
            for d in &dest {
                if owned(&d.name) && !d.generated && !cols.contains(&d.name) {
                    cols.push(d.name.clone());
                }
            }
        }
        t.src_columns = Some(cols.clone());
        schema::set_src_columns(&self.connector, key, &cols);
    }

    fn change(&mut self, rel_id: u32, f: impl FnOnce(&mut Self, u32)) {
        self.current_rel_id = Some(rel_id);
        if self.ready(rel_id) {
            f(self, rel_id)
        }
    }

    fn plan(
        &mut self,
        rel_id: u32,
        op: u8,
        mask: Vec<bool>,
        build: impl FnOnce(&RelEntry) -> (String, Vec<pg_sys::Oid>),
    ) -> pg_sys::SPIPlanPtr {
        // Every prepared-statement change goes through here first.
        if !self.spi {
            unsafe { pg_sys::SPI_connect() };
            self.spi = true;
        }
        let Some(entry) = self.rels.get_mut(&rel_id) else {
            pgrx::error!("unknown relation id {rel_id}");
        };
        if let Some(p) = entry.plans.get(&(op, mask.clone())) {
            return *p;
        }
        let (sql, mut types) = build(entry);
        let csql = CString::new(sql).unwrap_or_default();
        let plan = unsafe {
            let nargs = c_int::try_from(types.len()).unwrap_or(0);
            let p = pg_sys::SPI_prepare(csql.as_ptr(), nargs, types.as_mut_ptr());
            if p.is_null() {
                pgrx::error!(
                    "could not prepare statement for {}.{}",
                    entry.rel.namespace,
                    entry.rel.name
                );
            }
            pg_sys::SPI_keepplan(p);
            p
        };
        entry.plans.insert((op, mask), plan);
        plan
    }

    fn insert(&mut self, rel_id: u32, new: Vec<TupleValue>) {
        let entry = &self.rels[&rel_id];
        if let Some(t) = entry.direct {
            let mut text = text_buffer(&[&new]);
            let vals = attr_inputs(entry, (0..new.len()).map(|i| (i, &new[i])), &mut text);
            // The values are copied: let go of the message (a large value
            // is then held once by this change, not twice).
            drop(new);
            usercontext::as_role(entry.run_as, || {
                direct::insert(&t, self.change_cxt.value(), &mut text, &vals)
            });
            return;
        }
        let new = &new[..];
        let cols: Vec<usize> = (0..entry.rel.columns.len())
            .filter(|i| !matches!(new.get(*i), Some(TupleValue::Unchanged) | None))
            .collect();
        let mask: Vec<bool> = (0..entry.rel.columns.len())
            .map(|i| cols.contains(&i))
            .collect();
        let plan = self.plan(rel_id, b'I', mask, |e| {
            let t = target_of(e);
            let names: Vec<&str> = cols
                .iter()
                .map(|i| e.rel.columns[*i].name.as_str())
                .collect();
            (
                sqlgen::insert(&t.dst_schema, &t.dst_table, &names),
                types_of(e, &cols),
            )
        });
        let entry = &self.rels[&rel_id];
        let vals: Vec<(usize, &TupleValue)> = cols.iter().map(|i| (*i, &new[*i])).collect();
        let n = self.execute(entry, plan, &vals);
        let _ = n;
    }

    fn key_columns(entry: &RelEntry) -> Vec<usize> {
        (0..entry.rel.columns.len())
            .filter(|i| entry.rel.columns[*i].is_key)
            .collect()
    }

    fn update(
        &mut self,
        rel_id: u32,
        old: Option<&(OldKind, Vec<TupleValue>)>,
        new: &[TupleValue],
    ) {
        let entry = &self.rels[&rel_id];
        let ncols = entry.rel.columns.len();
        if let (Some(t), None | Some((OldKind::Key, _))) =
            (entry.direct.filter(|t| t.has_key()), old)
        {
            let key_src: &[TupleValue] = match old {
                Some((_, vals)) => vals,
                None => new,
            };
            let keys = Self::key_columns(entry);
            let mut text = text_buffer(&[key_src, new]);
            let key = attr_inputs(
                entry,
                keys.iter().filter_map(|i| key_src.get(*i).map(|v| (*i, v))),
                &mut text,
            );
            let vals = attr_inputs(entry, (0..new.len()).map(|i| (i, &new[i])), &mut text);
            let found = usercontext::as_role(entry.run_as, || {
                direct::update(&t, self.change_cxt.value(), &mut text, &key, &vals)
            });
            if !found {
                self.missing_row("UPDATE", rel_id);
            }
            return;
        }
        let set_cols: Vec<usize> = (0..ncols)
            .filter(|i| !matches!(new.get(*i), Some(TupleValue::Unchanged) | None))
            .collect();
        let (how, key_cols, key_src): (KeyMatch, Vec<usize>, &[TupleValue]) = match old {
            Some((OldKind::Full, vals)) => (
                KeyMatch::Full,
                (0..ncols)
                    .filter(|i| !matches!(vals.get(*i), Some(TupleValue::Unchanged) | None))
                    .collect(),
                vals,
            ),
            Some((OldKind::Key, vals)) => (KeyMatch::Key, Self::key_columns(entry), vals),
            None => (KeyMatch::Key, Self::key_columns(entry), new),
        };
        if key_cols.is_empty() {
            pgrx::error!(
                "cannot apply UPDATE to {}.{}: the source table has no replica identity (add a primary key or set REPLICA IDENTITY FULL on the source)",
                entry.rel.namespace,
                entry.rel.name
            );
        }
        let mut mask: Vec<bool> = (0..ncols).map(|i| set_cols.contains(&i)).collect();
        mask.extend((0..ncols).map(|i| key_cols.contains(&i)));
        mask.push(how == KeyMatch::Full);
        let plan = self.plan(rel_id, b'U', mask, |e| {
            let t = target_of(e);
            let sets: Vec<&str> = set_cols
                .iter()
                .map(|i| e.rel.columns[*i].name.as_str())
                .collect();
            let keys: Vec<&str> = key_cols
                .iter()
                .map(|i| e.rel.columns[*i].name.as_str())
                .collect();
            let mut types = types_of(e, &set_cols);
            types.extend(types_of(e, &key_cols));
            (
                sqlgen::update(
                    &t.dst_schema,
                    &t.dst_table,
                    &sets,
                    &keys,
                    &by_text(e, &key_cols),
                    how,
                ),
                types,
            )
        });
        let entry = &self.rels[&rel_id];
        let mut vals: Vec<(usize, &TupleValue)> = set_cols.iter().map(|i| (*i, &new[*i])).collect();
        for i in &key_cols {
            match key_src.get(*i) {
                Some(v) => vals.push((*i, v)),
                None => pgrx::error!("old tuple is shorter than the relation"),
            }
        }
        if self.execute(entry, plan, &vals) == 0 {
            self.missing_row("UPDATE", rel_id);
        }
    }

    fn delete(&mut self, rel_id: u32, old: &(OldKind, Vec<TupleValue>)) {
        let entry = &self.rels[&rel_id];
        if let (Some(t), OldKind::Key) = (entry.direct.filter(|t| t.has_key()), old.0) {
            let keys = Self::key_columns(entry);
            let mut text = text_buffer(&[&old.1]);
            let key = attr_inputs(
                entry,
                keys.iter().filter_map(|i| old.1.get(*i).map(|v| (*i, v))),
                &mut text,
            );
            let found = usercontext::as_role(entry.run_as, || {
                direct::delete(&t, self.change_cxt.value(), &mut text, &key)
            });
            if !found {
                self.missing_row("DELETE", rel_id);
            }
            return;
        }
        let ncols = entry.rel.columns.len();
        let (how, key_cols) = match old.0 {
            OldKind::Full => (
                KeyMatch::Full,
                (0..ncols)
                    .filter(|i| !matches!(old.1.get(*i), Some(TupleValue::Unchanged) | None))
                    .collect::<Vec<_>>(),
            ),
            OldKind::Key => (KeyMatch::Key, Self::key_columns(entry)),
        };
        if key_cols.is_empty() {
            pgrx::error!(
                "cannot apply DELETE to {}.{}: the source table has no replica identity",
                entry.rel.namespace,
                entry.rel.name
            );
        }
        let mut mask: Vec<bool> = (0..ncols).map(|i| key_cols.contains(&i)).collect();
        mask.push(how == KeyMatch::Full);
        let plan = self.plan(rel_id, b'D', mask, |e| {
            let t = target_of(e);
            let keys: Vec<&str> = key_cols
                .iter()
                .map(|i| e.rel.columns[*i].name.as_str())
                .collect();
            (
                sqlgen::delete(
                    &t.dst_schema,
                    &t.dst_table,
                    &keys,
                    &by_text(e, &key_cols),
                    how,
                ),
                types_of(e, &key_cols),
            )
        });
        let entry = &self.rels[&rel_id];
        let mut vals = Vec::with_capacity(key_cols.len());
        for i in &key_cols {
            match old.1.get(*i) {
                Some(v) => vals.push((*i, v)),
                None => pgrx::error!("old tuple is shorter than the relation"),
            }
        }
        if self.execute(entry, plan, &vals) == 0 {
            self.missing_row("DELETE", rel_id);
        }
    }

    fn missing_row(&mut self, op: &str, rel_id: u32) {
        self.counters.missing_rows += 1;
        if let Some(e) = self.rels.get(&rel_id) {
            pgrx::warning!(
                "synchdb: {op} on {}.{} found no row to change (remote transaction {}, commit LSN {}); the destination differs from the source",
                e.rel.namespace,
                e.rel.name,
                self.xid,
                crate::lsn::format_lsn(self.final_lsn)
            );
        }
    }

    fn truncate(&mut self, rel_ids: &[u32], restart_identity: bool) {
        let mut targets = Vec::new();
        let mut roots_checked: Vec<u32> = Vec::new();
        for id in rel_ids {
            if !self.rels.contains_key(id) || !self.ready(*id) {
                continue;
            }
            let root = self.rels.get(id).map(|e| e.rel.id).unwrap_or(*id);
            if root != *id && !roots_checked.contains(&root) {
                roots_checked.push(root);
                self.truncate_partitions(root, rel_ids);
            }
            if let Some(e) = self.rels.get(id) {
                if let Some(t) = &e.target {
                    targets.push((e.run_as, (t.dst_schema.clone(), t.dst_table.clone())));
                }
            }
        }
        // One statement per owner, run as that owner (its TRUNCATE
        // triggers run with its rights): one statement in all when the
        // tables share an owner, as the source's TRUNCATE did.
        while let Some((run_as, _)) = targets.first().cloned() {
            let (mine, rest): (Vec<_>, Vec<_>) =
                targets.into_iter().partition(|(r, _)| *r == run_as);
            targets = rest;
            let tables: Vec<(String, String)> = mine.into_iter().map(|(_, t)| t).collect();
            let sql = sqlgen::truncate(&tables, restart_identity);
            if let Err(e) = usercontext::as_role(run_as, || Spi::run(&sql)) {
                pgrx::error!("{e}");
            }
        }
    }

    /// A TRUNCATE that names partitions of a captured partitioned table
    /// one by one (a source publishing partitions under their own names)
    /// empties the whole destination table only when it names every
    /// partition; otherwise the rows of the other partitions must stay, so
    /// the table is copied again (modes that copy) or the connector stops
    /// with an error saying why.
    fn truncate_partitions(&mut self, root: u32, rel_ids: &[u32]) {
        let leaves = match self.catalog.partition_leaves(root) {
            Ok(l) => l,
            Err(e) => pgrx::error!("reading the partitions of source relation {root}: {e}"),
        };
        if leaves.iter().all(|l| rel_ids.contains(l)) {
            return;
        }
        let found = self
            .targets
            .iter()
            .find(|(_, t)| t.src_relid == root)
            .map(|(k, t)| (k.clone(), t.clone()));
        let Some((key, target)) = found else { return };
        self.counters.ddl += 1;
        if self.can_resync {
            self.resync = Some((key.clone(), target));
            pgrx::error!(
                "some partitions of source table {key} were truncated; the table is copied again"
            );
        }
        pgrx::error!(
            "some partitions of source table {key} were truncated; the destination table holds all partitions and cannot drop only theirs: restart the connector in mode always with snapshottable '{key}' to copy it again"
        );
    }

    /// Converts the values with the destination types' input functions and
    /// runs the plan, as the table's owner (a domain's CHECK runs in the
    /// input function); returns the number of rows processed.
    fn execute(
        &self,
        entry: &RelEntry,
        plan: pg_sys::SPIPlanPtr,
        vals: &[(usize, &TupleValue)],
    ) -> u64 {
        usercontext::as_role(entry.run_as, || self.execute_here(entry, plan, vals))
    }

    fn execute_here(
        &self,
        entry: &RelEntry,
        plan: pg_sys::SPIPlanPtr,
        vals: &[(usize, &TupleValue)],
    ) -> u64 {
        let mut datums: Vec<pg_sys::Datum> = Vec::with_capacity(vals.len());
        let mut nulls: Vec<c_char> = Vec::with_capacity(vals.len());
        let old_cxt = unsafe { pg_sys::MemoryContextSwitchTo(self.change_cxt.value()) };
        {
            for (i, v) in vals {
                let Some(Some(col)) = entry.dest.get(*i) else {
                    pgrx::error!(
                        "column \"{}\" of {}.{} has no destination column",
                        entry
                            .rel
                            .columns
                            .get(*i)
                            .map(|c| c.name.as_str())
                            .unwrap_or("?"),
                        entry.rel.namespace,
                        entry.rel.name
                    );
                };
                match v {
                    TupleValue::Null => {
                        datums.push(pg_sys::Datum::from(0));
                        nulls.push(b'n' as c_char);
                    }
                    TupleValue::Text(bytes) => {
                        let mut buf = Vec::with_capacity(bytes.len() + 1);
                        buf.extend_from_slice(bytes);
                        buf.push(0);
                        let d = unsafe {
                            pg_sys::OidInputFunctionCall(
                                col.input_fn,
                                buf.as_mut_ptr() as *mut c_char,
                                col.ioparam,
                                col.typmod,
                            )
                        };
                        datums.push(d);
                        nulls.push(b' ' as c_char);
                    }
                    TupleValue::Binary(_) => {
                        pgrx::error!("binary pgoutput values are not requested and not supported");
                    }
                    TupleValue::Unchanged => {
                        pgrx::error!("an unchanged TOAST value cannot be used as a key");
                    }
                }
            }
        }
        unsafe { pg_sys::MemoryContextSwitchTo(old_cxt) };
        let rc = unsafe {
            pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 0)
        };
        if rc < 0 {
            pgrx::error!("SPI_execute_plan failed with code {rc}");
        }
        unsafe { pg_sys::SPI_processed }
    }
}

/// How a column change reads in a log line or an error.
fn describe_change(c: &ColumnChange) -> String {
    match c {
        ColumnChange::Rename { from, to } => {
            format!("column \"{from}\" renamed to \"{to}\" or dropped while \"{to}\" was added")
        }
        ColumnChange::Add { name, .. } => format!("column \"{name}\" added"),
        ColumnChange::Drop { name } => format!("column \"{name}\" dropped"),
        ColumnChange::Retype { name, .. } => format!("column \"{name}\" changed type"),
    }
}

/// Direct changes are used when every source column has a destination
/// column: inserts always, updates and deletes when the source sends
/// key-only old rows (primary key or replica identity index) and the
/// destination has a unique index on exactly the key columns.
fn direct_target(
    rel: &Relation,
    t: &TableTarget,
    dest: &[Option<DestColumn>],
    stored: usize,
) -> Option<direct::Target> {
    if dest.iter().any(|d| d.is_none()) {
        return None;
    }
    // A destination column the source does not send gets its default
    // through the prepared INSERT; the direct path would leave it NULL.
    if stored != dest.len() {
        return None;
    }
    // With REPLICA IDENTITY FULL every column is flagged as key: rows are
    // matched on all of them through SPI, only inserts go direct.
    let keys: Vec<i16> = if rel.replica_identity == b'f' {
        Vec::new()
    } else {
        rel.columns
            .iter()
            .zip(dest)
            .filter(|(c, _)| c.is_key)
            .filter_map(|(_, d)| d.as_ref().map(|d| d.attnum))
            .collect()
    };
    let relid = schema::relid(&t.dst_schema, &t.dst_table)?;
    direct::prepare(relid, &keys)
}

fn target_of(e: &RelEntry) -> TableTarget {
    e.target.clone().unwrap_or(TableTarget {
        dst_schema: String::new(),
        dst_table: String::new(),
        sync_lsn: 0,
        src_relid: 0,
        src_columns: None,
    })
}

/// A buffer for the NUL-terminated texts of a change's values, allocated
/// once at its final size (a large value is not copied through doublings).
fn text_buffer(rows: &[&[TupleValue]]) -> Vec<u8> {
    let n = rows
        .iter()
        .flat_map(|r| r.iter())
        .map(|v| match v {
            TupleValue::Text(b) => b.len() + 1,
            _ => 0,
        })
        .sum();
    Vec::with_capacity(n)
}

/// The destination attribute inputs of the given source columns, their
/// texts appended NUL-terminated to `text` (unchanged TOAST values left
/// out, so the row keeps what it has).
fn attr_inputs<'v>(
    entry: &RelEntry,
    vals: impl Iterator<Item = (usize, &'v TupleValue)>,
    text: &mut Vec<u8>,
) -> Vec<direct::AttrInput> {
    let mut out = Vec::new();
    for (i, v) in vals {
        let Some(Some(col)) = entry.dest.get(i) else {
            continue;
        };
        let off = match v {
            TupleValue::Unchanged => continue,
            TupleValue::Null => None,
            TupleValue::Text(bytes) => {
                let off = text.len();
                text.extend_from_slice(bytes);
                text.push(0);
                Some(off)
            }
            TupleValue::Binary(_) => {
                pgrx::error!("binary pgoutput values are not requested and not supported")
            }
        };
        out.push(direct::AttrInput {
            att: usize::try_from(col.attnum - 1).unwrap_or(usize::MAX),
            text: off,
            input_fn: col.input_fn,
            ioparam: col.ioparam,
            typmod: col.typmod,
        });
    }
    out
}

fn by_text(e: &RelEntry, cols: &[usize]) -> Vec<bool> {
    cols.iter()
        .map(|i| matches!(e.dest.get(*i), Some(Some(c)) if !c.has_eq))
        .collect()
}

fn types_of(e: &RelEntry, cols: &[usize]) -> Vec<pg_sys::Oid> {
    cols.iter()
        .map(|i| match e.dest.get(*i) {
            Some(Some(c)) => c.type_oid,
            _ => pg_sys::TEXTOID,
        })
        .collect()
}

/// The destination column (type, typmod, input function) of each source
/// column, by name, and how many stored (not generated) columns the
/// destination table has.
fn dest_columns(rel: &Relation, t: &TableTarget) -> (Vec<Option<DestColumn>>, usize) {
    let cols = schema::dest_columns(&t.dst_schema, &t.dst_table);
    let stored = cols.iter().filter(|d| !d.generated).count();
    let mapped = rel
        .columns
        .iter()
        .map(|c| {
            cols.iter()
                .find(|d| d.name == c.name && !d.generated)
                .map(|d| {
                    let mut input_fn = pg_sys::InvalidOid;
                    let mut ioparam = pg_sys::InvalidOid;
                    unsafe { pg_sys::getTypeInputInfo(d.type_oid, &mut input_fn, &mut ioparam) };
                    let has_eq = unsafe {
                        let tc = pg_sys::lookup_type_cache(
                            d.type_oid,
                            pg_sys::TYPECACHE_EQ_OPR as c_int,
                        );
                        !tc.is_null() && (*tc).eq_opr != pg_sys::InvalidOid
                    };
                    DestColumn {
                        attnum: d.attnum,
                        type_oid: d.type_oid,
                        has_eq,
                        typmod: d.typmod,
                        input_fn,
                        ioparam,
                    }
                })
        })
        .collect();
    (mapped, stored)
}

// ---------------------------------------------------------------------------
// Snapshot bulk load through COPY FROM with a data-source callback.

type Feed<'a> = &'a mut dyn FnMut() -> Result<Option<Bytes>, String>;

struct CopyFeed {
    feed: *mut dyn FnMut() -> Result<Option<Bytes>, String>,
    buf: Bytes,
    eof: bool,
}

thread_local! {
    static COPY_FEED: RefCell<Option<CopyFeed>> = const { RefCell::new(None) };
}

#[pg_guard]
unsafe extern "C-unwind" fn copy_read_cb(
    outbuf: *mut c_void,
    minread: c_int,
    maxread: c_int,
) -> c_int {
    let minread = usize::try_from(minread).unwrap_or(1).max(1);
    let maxread = usize::try_from(maxread).unwrap_or(0);
    let mut written = 0usize;
    let mut failure: Option<String> = None;
    COPY_FEED.with(|cell| {
        let mut guard = cell.borrow_mut();
        let Some(st) = guard.as_mut() else {
            failure = Some("COPY data source is not set".into());
            return;
        };
        while written < maxread {
            if st.buf.is_empty() {
                if st.eof || written >= minread {
                    break;
                }
                let next = unsafe { (*st.feed)() };
                match next {
                    Ok(Some(b)) => st.buf = b,
                    Ok(None) => {
                        st.eof = true;
                        break;
                    }
                    Err(e) => {
                        failure = Some(e);
                        return;
                    }
                }
                continue;
            }
            let n = st.buf.len().min(maxread - written);
            unsafe {
                std::ptr::copy_nonoverlapping(st.buf.as_ptr(), (outbuf as *mut u8).add(written), n);
            }
            st.buf.advance(n);
            written += n;
        }
    });
    if let Some(e) = failure {
        pgrx::error!("snapshot copy failed: {e}");
    }
    c_int::try_from(written).unwrap_or(0)
}

/// Loads COPY text rows from `feed` into the destination table; the columns
/// are named (generated columns are left to the destination). Returns the
/// number of rows loaded. Runs inside the caller's transaction.
pub fn copy_into(schema: &str, table: &str, columns: &[String], feed: Feed<'_>) -> u64 {
    let qualified = sqlgen::qualified(schema, table);
    let relid = match Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT $1::regclass::oid",
        &[qualified.as_str().into()],
    ) {
        Ok(Some(o)) => o,
        _ => pgrx::error!("destination table {qualified} does not exist"),
    };
    // SAFETY: the feed pointer lives for the duration of this function only;
    // the thread-local is cleared before returning (also on error, below).
    let feed_ptr: *mut (dyn FnMut() -> Result<Option<Bytes>, String> + '_) = feed;
    let feed_ptr: *mut dyn FnMut() -> Result<Option<Bytes>, String> =
        unsafe { std::mem::transmute(feed_ptr) };
    COPY_FEED.with(|c| {
        *c.borrow_mut() = Some(CopyFeed {
            feed: feed_ptr,
            buf: Bytes::new(),
            eof: false,
        })
    });
    let result = crate::pgtxn::catch(|| unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        pg_sys::addRangeTableEntryForRelation(
            pstate,
            rel,
            pg_sys::RowExclusiveLock as c_int,
            std::ptr::null_mut(),
            false,
            false,
        );
        let mut attnames: *mut pg_sys::List = std::ptr::null_mut();
        for c in columns {
            let cs = CString::new(c.as_str()).unwrap_or_default();
            let s = pg_sys::pstrdup(cs.as_ptr());
            attnames = pg_sys::lappend(attnames, pg_sys::makeString(s) as *mut c_void);
        }
        // As the table's owner: its triggers, defaults and constraints
        // run with the owner's rights.
        let run_as = usercontext::run_as(relid);
        if let Some(owner) = run_as {
            usercontext::refuse_untrusted_owner(relid, owner);
            usercontext::refuse_row_security(relid, owner);
        }
        let n = usercontext::as_role(run_as, || {
            let cstate = pg_sys::BeginCopyFrom(
                pstate,
                rel,
                std::ptr::null_mut(),
                std::ptr::null(),
                false,
                Some(copy_read_cb),
                attnames,
                std::ptr::null_mut(),
            );
            let n = pg_sys::CopyFrom(cstate);
            pg_sys::EndCopyFrom(cstate);
            n
        });
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        n
    });
    COPY_FEED.with(|c| *c.borrow_mut() = None);
    match result {
        Ok(n) => n,
        Err(e) => pgrx::error!("{e}"),
    }
}
