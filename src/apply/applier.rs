//! The destination side of a connector, on the worker's main thread: the
//! replication origin that records progress in the same transaction as the
//! data, the relation map (source relation -> destination table and column
//! types), cached prepared SPI plans per (relation, operation, column set),
//! applying decoded changes, and bulk-loading snapshot rows through
//! PostgreSQL's COPY machinery.

use crate::apply::direct;
use crate::apply::schema::{self, ColumnChange};
use crate::apply::sqlgen::{self, KeyMatch};
use crate::apply::usercontext;
use crate::control::conninfo::TableRef;
use crate::source::catalog::{SourceTable, UserType};
use crate::source::decode::{Message, OldKind, Relation, TupleValue};
use bytes::{Buf, Bytes};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};

mod follow;
mod rows;

/// Sets up this session's replication origin (created when missing) and
/// returns the position up to which remote transactions are applied.
pub fn setup_origin(origin: &str) -> Result<u64, String> {
    let cname = CString::new(origin).map_err(|_| "origin name has a NUL byte".to_string())?;
    crate::apply::pgtxn::run(|| unsafe {
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
            crate::apply::pgtxn::catch(|| pg_sys::replorigin_session_reset())?;
            pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
        }
    }
    crate::apply::pgtxn::run(|| {
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
    /// The Relation message as the destination sees it: columns renamed
    /// and retyped by the object mappings (`mapping`).
    rel: Relation,
    /// The Relation message as the source sent it (mappings reloaded are
    /// applied to it again).
    src_rel: Relation,
    /// Per source column: its object-mapping transform, if any (such a
    /// table's changes go through SPI statements, never `direct`).
    transforms: Vec<Option<String>>,
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

/// Source transactions whose local commit is deferred (see `defer_commit`).
struct Group {
    end_lsn: u64,
    commit_ts: i64,
    transactions: u64,
    since: std::time::Instant,
}

/// Applies remote transactions inside local transactions: one each, or
/// several in one when a backlog is applied (`defer_commit`).
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
    /// Source transactions applied in the open local transaction whose
    /// local commit was deferred (`defer_commit`): a backlog is applied
    /// several source transactions per local commit, never splitting one.
    group: Option<Group>,
    /// Between a source transaction's BEGIN and its COMMIT.
    in_source: bool,
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
    /// Operation kinds not applied (`synchdb.skipped_operations`), read at
    /// each remote BEGIN so a transaction is never split by a reload.
    skip_ops: u8,
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
            group: None,
            in_source: false,
            spi: false,
            final_lsn: 0,
            xid: 0,
            commit_ts: 0,
            change_idx: 0,
            in_change: false,
            xact_seq: 0,
            skip: Vec::new(),
            skip_ops: 0,
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
        self.in_change = false;
        self.in_source = true;
        if self.group.is_none() {
            crate::apply::pgtxn::start();
            self.xact_seq += 1;
            self.spi = false;
        }
        self.in_xact = true;
        self.final_lsn = final_lsn;
        self.xid = xid;
        self.commit_ts = commit_ts;
        self.change_idx = 0;
        self.skip_ops = crate::control::gucs::skipped_operations();
    }

    /// Commits the local transaction, recording the remote commit position
    /// in the replication origin within it.
    /// Returns the end of the local commit record (for flush tracking).
    pub fn commit(&mut self, commit_lsn: u64, end_lsn: u64, commit_ts: i64) -> u64 {
        self.defer_commit(commit_lsn, end_lsn, commit_ts);
        self.commit_group().map(|(_, local)| local).unwrap_or(0)
    }

    /// Ends the current source transaction without committing the local
    /// one: the next source transaction continues it, and `commit_group`
    /// commits them all at once, with the origin position of the last.
    /// Readers of the destination see whole source transactions only, and
    /// an error anywhere throws the whole group away (the stream is read
    /// again from the position before it), so nothing is applied twice.
    pub fn defer_commit(&mut self, commit_lsn: u64, end_lsn: u64, commit_ts: i64) {
        let g = self.group.get_or_insert(Group {
            end_lsn,
            commit_ts,
            transactions: 0,
            since: std::time::Instant::now(),
        });
        g.end_lsn = end_lsn;
        g.commit_ts = commit_ts;
        g.transactions += 1;
        self.in_source = false;
        self.last.lsn_commit = commit_lsn;
        self.last.lsn = end_lsn;
        self.last.xid = self.xid;
        self.last.ts_usec = crate::source::decode::pg_ts_to_unix_usec(commit_ts);
        if self.last.lsn_proc < commit_lsn && self.last.message_type.is_empty() {
            self.last.lsn_proc = commit_lsn;
        }
    }

    /// Source transactions waiting in the open local transaction, and how
    /// long the first of them has waited; counted also while the next
    /// source transaction is being applied.
    pub fn group_size(&self) -> Option<(u64, std::time::Duration)> {
        self.group
            .as_ref()
            .map(|g| (g.transactions, g.since.elapsed()))
    }

    /// Like `group_size`, but only between source transactions: the only
    /// time `commit_group` may run.
    pub fn group_pending(&self) -> Option<(u64, std::time::Duration)> {
        self.group_size().filter(|_| !self.in_source)
    }

    /// Commits the local transaction holding the deferred source
    /// transactions, recording the last one's end in the replication origin
    /// within it. Returns (remote end, end of the local commit record).
    pub fn commit_group(&mut self) -> Option<(u64, u64)> {
        if self.in_source {
            return None;
        }
        let Group {
            end_lsn,
            commit_ts,
            transactions,
            ..
        } = self.group.take()?;
        if self.spi {
            unsafe { pg_sys::SPI_finish() };
            self.spi = false;
        }
        unsafe {
            pg_sys::replorigin_session_origin_lsn = end_lsn;
            pg_sys::replorigin_session_origin_timestamp = commit_ts;
        }
        crate::apply::pgtxn::commit();
        let local_end = unsafe { pg_sys::XactLastCommitEnd };
        unsafe {
            pg_sys::replorigin_session_origin_lsn = 0;
            pg_sys::replorigin_session_origin_timestamp = 0;
        }
        self.in_xact = false;
        self.counters.transactions += transactions;
        Some((end_lsn, local_end))
    }

    /// Throws the current transaction away after an error (and forgets plans,
    /// which may be invalid now).
    pub fn abort(&mut self) {
        if self.in_xact || crate::apply::pgtxn::in_transaction() {
            crate::apply::pgtxn::abort();
        }
        self.in_xact = false;
        self.in_source = false;
        self.group = None;
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
        if self.skip_ops & crate::control::compat::skip_bit(kind) != 0 {
            // Configured away: counted, never applied (not even in part).
            self.counters.skipped += 1;
            return false;
        }
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
        crate::apply::pgtxn::run(|| schema::add_enum_labels(&types, &dst_schema))
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
        let (mapped, transforms) = crate::apply::mapping::current().map_relation(&rel);
        self.rels.insert(
            msg_id,
            RelEntry {
                rel: mapped,
                src_rel: rel,
                transforms,
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
                crate::apply::relcache::forget(relid);
            }
        }
        matches!(self.rels.get(&rel_id).and_then(|e| e.target.as_ref()), Some(t) if self.final_lsn >= t.sync_lsn)
    }

    /// Object mappings reloaded (`synchdb_reload_objmap`, between two
    /// transactions): every relation is mapped again and followed before
    /// its next change, as after a Relation message (a column mapped to
    /// another name or type is renamed or retyped like a source change).
    pub fn reload_mappings(&mut self) {
        let maps = crate::apply::mapping::current();
        for e in self.rels.values_mut() {
            let (mapped, transforms) = maps.map_relation(&e.src_rel);
            e.rel = mapped;
            e.transforms = transforms;
            for (_, p) in e.plans.drain() {
                unsafe { pg_sys::SPI_freeplan(p) };
            }
            e.synced = false;
            e.direct = None;
        }
    }

    /// Destination tables whose definition changed (a DBA's DDL, or ours)
    /// have their maps rebuilt before their next change.
    fn refresh_invalidated(&mut self) {
        let (all, list) = crate::apply::relcache::take();
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
        let mut target = known.clone().unwrap_or_else(|| {
            // A table the stream brings that the snapshot did not know
            // (created later on the source): it lands in the destination
            // schema under its own name, or where a table mapping says.
            let (dst_schema, dst_table) =
                crate::apply::mapping::current().destination(&key, &self.dst_schema, &rel.name);
            TableTarget {
                dst_schema,
                dst_table,
                sync_lsn: 0,
                src_relid: rel.id,
                src_columns: None,
            }
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
        let transformed = self.rels[&rel_id].transforms.iter().any(|t| t.is_some());
        let direct = entry_target
            .as_ref()
            .filter(|_| !transformed)
            .and_then(|t| direct_target(&rel, t, &dest, stored));
        if entry_target.is_some() {
            // What synchdb_att_view shows for this table.
            let src_rel = &self.rels[&rel_id].src_rel;
            crate::apply::mapping::record_columns(
                &self.connector,
                &crate::apply::mapping::current().srcdb,
                &key,
                &crate::apply::mapping::att_rows_of_relation(src_rel, &rel),
            );
        }
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

/// A statement with the object-mapping transforms applied to its
/// parameters: `params[k]` is the source column of parameter `k + 1`. The
/// value stays a parameter (typed as the destination column); the
/// transform's result is cast to the column's type.
fn with_transforms(e: &RelEntry, sql: String, params: &[usize]) -> String {
    if e.transforms.iter().all(|t| t.is_none()) {
        return sql;
    }
    let mut with = HashMap::new();
    for (k, col) in params.iter().enumerate() {
        if let (Some(Some(tpl)), Some(Some(d))) = (e.transforms.get(*col), e.dest.get(*col)) {
            let ty = schema::format_type(u32::from(d.type_oid), d.typmod);
            with.insert(
                k + 1,
                crate::apply::mapping::transformed(tpl, &format!("${}", k + 1), &ty),
            );
        }
    }
    crate::apply::mapping::replace_params(&sql, &with)
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

/// How `copy_into` reads its rows.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyOptions {
    /// `FREEZE`: the table was created or emptied in this transaction.
    pub freeze: bool,
    /// `FORMAT binary`: the rows come in COPY's binary format (every column
    /// of a built-in type, the same on both sides).
    pub binary: bool,
}

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
/// number of rows loaded. Runs inside the caller's transaction. `freeze`
/// (the table was created in this transaction) writes the rows frozen and
/// the pages all-visible, as `COPY ... FREEZE`: nobody can have seen the
/// table before, and no later VACUUM or first read has to rewrite them.
pub fn copy_into(
    schema: &str,
    table: &str,
    columns: &[String],
    freeze: CopyOptions,
    feed: Feed<'_>,
) -> u64 {
    let CopyOptions { freeze, binary } = freeze;
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
    let result = crate::apply::pgtxn::catch(|| unsafe {
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
        let mut options: *mut pg_sys::List = std::ptr::null_mut();
        if binary {
            let elem = pg_sys::makeDefElem(
                pg_sys::pstrdup(c"format".as_ptr()),
                pg_sys::makeString(pg_sys::pstrdup(c"binary".as_ptr())) as *mut pg_sys::Node,
                -1,
            );
            options = pg_sys::lappend(options, elem as *mut c_void);
        }
        if freeze {
            let elem = pg_sys::makeDefElem(
                pg_sys::pstrdup(c"freeze".as_ptr()),
                pg_sys::makeBoolean(true) as *mut pg_sys::Node,
                -1,
            );
            options = pg_sys::lappend(options, elem as *mut c_void);
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
                options,
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
