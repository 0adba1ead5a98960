//! Following the source's schema in the destination: a table created on
//! the source while streaming, a table dropped and created again under the
//! same name, renamed tables, and the column changes a Relation message
//! announces (added, dropped, renamed, retyped columns).

use super::*;

impl Applier<'_> {
    /// Creates the destination table of a source table the snapshot did not
    /// know. Its shape comes from the source catalog when the catalog still
    /// has this very table (same OID: user-defined types, NOT NULL, primary
    /// key), else from the Relation message itself; a table that no longer
    /// exists and uses types the stream cannot name is skipped (logged and
    /// counted). Returns whether the table is replicated.
    pub(super) fn create_late_table(
        &mut self,
        rel: &Relation,
        key: &TableRef,
        t: &mut TableTarget,
    ) -> bool {
        let described = self
            .catalog
            .describe(key)
            .ok()
            .filter(|(shape, _)| shape.oid == rel.id);
        match described {
            Some((shape, types)) => {
                schema::ensure_user_types(&types, &t.dst_schema);
                // Columns named and typed as the object mappings say.
                let shape = crate::apply::mapping::current().map_shape(&shape);
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
    pub(super) fn recreated(&mut self, rel: &Relation, key: &TableRef, t: &mut TableTarget) {
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

    pub(super) fn rename_table(&mut self, old: &TableRef, new: &TableRef) {
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
    pub(super) fn follow_schema(&mut self, rel: &Relation, key: &TableRef, t: &mut TableTarget) {
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
                                // Named and typed as the object mappings say.
                                Some(crate::apply::mapping::current().map_shape(&s))
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
                            let src_name =
                                crate::apply::mapping::current().source_column(key, name);
                            let default = self
                                .catalog
                                .column_default(rel.id, &src_name)
                                .unwrap_or(None);
                            let what = format!("default of column \"{name}\" of {key}");
                            if let Some((def, pasted)) = default.and_then(|def| {
                                crate::apply::untrusted::default_expression(&def, &what)
                                    .map(|p| (def, p))
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
}

/// How a column change reads in a log line or an error.
pub(super) fn describe_change(c: &ColumnChange) -> String {
    match c {
        ColumnChange::Rename { from, to } => {
            format!("column \"{from}\" renamed to \"{to}\" or dropped while \"{to}\" was added")
        }
        ColumnChange::Add { name, .. } => format!("column \"{name}\" added"),
        ColumnChange::Drop { name } => format!("column \"{name}\" dropped"),
        ColumnChange::Retype { name, .. } => format!("column \"{name}\" changed type"),
    }
}
