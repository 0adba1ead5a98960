//! Destination DDL on the worker's main thread: naming source types in the
//! destination (built-in, user-defined re-created in the destination schema,
//! extension types found where their extension lives), creating user-defined
//! types and tables, and following source schema changes announced by
//! pgoutput Relation messages (added, dropped, renamed and retyped columns).

use crate::conninfo::TableRef;
use crate::source::{ColumnType, SourceTable, UserType};
use crate::sqlgen;
use pgrx::prelude::*;

/// Runs DDL, raising its ERROR.
pub fn run_ddl(sql: &str) {
    run(sql)
}

/// Follows a source table rename: a destination table named after the
/// source table is renamed with it (unless that name is taken), and the
/// state row points at the new names. Returns the destination table name.
pub fn follow_table_rename(
    connector: &str,
    old: &TableRef,
    new: &TableRef,
    dst_schema: &str,
    dst_table: &str,
) -> String {
    let renamed = if dst_table == old.table && !exists_table(dst_schema, &new.table) {
        run(&format!(
            "ALTER TABLE {} RENAME TO {}",
            sqlgen::qualified(dst_schema, dst_table),
            sqlgen::quote_ident(&new.table)
        ));
        new.table.clone()
    } else {
        dst_table.to_string()
    };
    rename_table_state(connector, old, new, &renamed);
    renamed
}

/// Points a renamed source table's state row at its new names.
pub fn rename_table_state(connector: &str, old: &TableRef, new: &TableRef, dst_table: &str) {
    if let Err(e) = Spi::run_with_args(
        "UPDATE public.synchdb_table_state SET src_schema = $3, src_table = $4, dst_table = $5
          WHERE name = $1 AND src_schema = $2 AND src_table = $6",
        &[
            connector.into(),
            old.schema.as_str().into(),
            new.schema.as_str().into(),
            new.table.as_str().into(),
            dst_table.into(),
            old.table.as_str().into(),
        ],
    ) {
        pgrx::error!("{e}");
    }
}

fn run(sql: &str) {
    if let Err(e) = Spi::run(sql) {
        pgrx::error!("{e}");
    }
}

pub fn exists_table(schema: &str, table: &str) -> bool {
    relid(schema, table).is_some()
}

fn exists_type(schema: &str, name: &str) -> bool {
    matches!(
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
                             WHERE n.nspname = $1 AND t.typname = $2)",
            &[schema.into(), name.into()],
        ),
        Ok(Some(true))
    )
}

/// The destination's name for a source column type. Raises a clear ERROR
/// when an extension type's extension is not installed here.
pub fn type_sql(ty: &ColumnType, dst_schema: &str, what: &str) -> String {
    match ty {
        ColumnType::Builtin(s) => s.clone(),
        ColumnType::User { name, dims } => {
            sqlgen::with_dims(&sqlgen::qualified(dst_schema, name), *dims)
        }
        ColumnType::Extension {
            name,
            extension,
            dims,
        } => {
            let found = Spi::get_one_with_args::<String>(
                "SELECT format('%I.%I', n.nspname, t.typname)
                   FROM pg_catalog.pg_type t
                   JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
                   JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_type'::regclass
                        AND d.objid = t.oid AND d.deptype = 'e'
                   JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
                  WHERE t.typname = $1 AND e.extname = $2
                  LIMIT 1",
                &[name.as_str().into(), extension.as_str().into()],
            );
            match found {
                Ok(Some(q)) => sqlgen::with_dims(&q, *dims),
                _ => pgrx::error!(
                    "{what} has type \"{name}\" from extension \"{extension}\", which is not installed in the destination (CREATE EXTENSION {extension})"
                ),
            }
        }
    }
}

/// Creates the user-defined types (dependencies first) that do not exist yet
/// in the destination schema.
pub fn ensure_user_types(types: &[UserType], dst_schema: &str) {
    run(&format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        sqlgen::quote_ident(dst_schema)
    ));
    for t in types {
        if exists_type(dst_schema, t.name()) {
            continue;
        }
        let what = format!("type {}", t.name());
        let ddl = match t {
            UserType::Enum { name, labels } => sqlgen::create_enum(dst_schema, name, labels),
            UserType::Composite { name, attrs } => {
                let a: Vec<(String, String)> = attrs
                    .iter()
                    .map(|(n, ty)| (n.clone(), type_sql(ty, dst_schema, &what)))
                    .collect();
                sqlgen::create_composite(dst_schema, name, &a)
            }
            UserType::Domain {
                name,
                base,
                not_null,
                checks,
            } => sqlgen::create_domain(
                dst_schema,
                name,
                &type_sql(base, dst_schema, &what),
                *not_null,
                checks,
            ),
            UserType::Range {
                name,
                subtype,
                multirange,
            } => sqlgen::create_range(
                dst_schema,
                name,
                &type_sql(subtype, dst_schema, &what),
                multirange.as_deref(),
            ),
        };
        run(&ddl);
        pgrx::log!("synchdb: created type {dst_schema}.{}", t.name());
    }
}

/// Adds the labels of source enums missing from their destination copies,
/// each at its place in the sort order. Returns how many were added.
pub fn add_enum_labels(types: &[UserType], dst_schema: &str) -> usize {
    let mut added = 0;
    for t in types {
        let UserType::Enum { name, labels } = t else {
            continue;
        };
        if !exists_type(dst_schema, name) {
            continue;
        }
        let have: Vec<String> = Spi::connect(|c| {
            let rows = c.select(
                "SELECT e.enumlabel::text FROM pg_catalog.pg_enum e
                   JOIN pg_catalog.pg_type t ON t.oid = e.enumtypid
                   JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
                  WHERE n.nspname = $1 AND t.typname = $2",
                None,
                &[dst_schema.into(), name.as_str().into()],
            )?;
            let mut out = Vec::new();
            for r in rows {
                if let Some(l) = r.get::<String>(1)? {
                    out.push(l);
                }
            }
            Ok::<_, pgrx::spi::Error>(out)
        })
        .unwrap_or_default();
        for (i, label) in labels.iter().enumerate() {
            if have.contains(label) {
                continue;
            }
            let place = match i.checked_sub(1).and_then(|p| labels.get(p)) {
                Some(prev) => format!(" AFTER {}", sqlgen::quote_literal(prev)),
                None => match labels.get(1) {
                    Some(next) => format!(" BEFORE {}", sqlgen::quote_literal(next)),
                    None => String::new(),
                },
            };
            run(&format!(
                "ALTER TYPE {} ADD VALUE IF NOT EXISTS {}{place}",
                sqlgen::qualified(dst_schema, name),
                sqlgen::quote_literal(label)
            ));
            pgrx::log!("synchdb: added label {label:?} to enum {dst_schema}.{name}");
            added += 1;
        }
    }
    added
}

/// Creates a destination table from a source table's shape; with `rebuild`
/// an existing one is dropped first. Returns whether it was created now
/// (then it is empty and, with `defer_pk`, still without its primary key,
/// which is faster to build after a bulk load).
pub fn create_table(
    dst_schema: &str,
    dst_table: &str,
    shape: &SourceTable,
    rebuild: bool,
    defer_pk: bool,
) -> bool {
    run(&format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        sqlgen::quote_ident(dst_schema)
    ));
    if exists_table(dst_schema, dst_table) {
        if !rebuild {
            return false;
        }
        run(&format!(
            "DROP TABLE {}",
            sqlgen::qualified(dst_schema, dst_table)
        ));
    }
    let cols: Vec<sqlgen::ColumnDef> = shape
        .columns
        .iter()
        .map(|c| sqlgen::ColumnDef {
            name: c.name.clone(),
            type_sql: type_sql(
                &c.ty,
                dst_schema,
                &format!("column \"{}\" of {}", c.name, shape.table),
            ),
            not_null: c.not_null,
            generated: c.generated.clone(),
        })
        .collect();
    let pk: &[String] = if defer_pk { &[] } else { &shape.primary_key };
    run(&sqlgen::create_table(dst_schema, dst_table, &cols, pk));
    true
}

pub fn add_primary_key(dst_schema: &str, dst_table: &str, pk: &[String]) {
    if !pk.is_empty() {
        run(&sqlgen::add_primary_key(dst_schema, dst_table, pk));
    }
}

/// Marks a source table ready in `synchdb_table_state` (snapshot complete as
/// of `sync_lsn`, or created empty with 0).
pub fn record_table(
    name: &str,
    t: &TableRef,
    dst_schema: &str,
    dst_table: &str,
    src_relid: u32,
    sync_lsn: u64,
    rows: u64,
) {
    let r = Spi::run_with_args(
        "INSERT INTO public.synchdb_table_state
              (name, src_schema, src_table, src_relid, dst_schema, dst_table, state, sync_lsn, rows_copied, synced_at)
         VALUES ($1, $2, $3, NULLIF($8, 0)::oid, $4, $5, 'ready', $6::pg_lsn, $7, now())
         ON CONFLICT (name, src_schema, src_table) DO UPDATE
            SET dst_schema = EXCLUDED.dst_schema, dst_table = EXCLUDED.dst_table, state = 'ready',
                src_relid = EXCLUDED.src_relid,
                sync_lsn = EXCLUDED.sync_lsn, rows_copied = EXCLUDED.rows_copied, synced_at = now()",
        &[
            name.into(),
            t.schema.as_str().into(),
            t.table.as_str().into(),
            dst_schema.into(),
            dst_table.into(),
            crate::lsn::format_lsn(sync_lsn).as_str().into(),
            i64::try_from(rows).unwrap_or(i64::MAX).into(),
            i64::from(src_relid).into(),
        ],
    );
    if let Err(e) = r {
        pgrx::error!("{e}");
    }
}

/// A destination column as the catalog has it.
#[derive(Debug, Clone)]
pub struct DestCol {
    pub name: String,
    pub attnum: i16,
    pub type_oid: pg_sys::Oid,
    pub typmod: i32,
    pub generated: bool,
}

/// The OID of a destination table, if it exists.
pub fn relid(schema: &str, table: &str) -> Option<pg_sys::Oid> {
    Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relname = $2",
        &[schema.into(), table.into()],
    )
    .ok()
    .flatten()
}

/// The destination table's columns in attnum order.
pub fn dest_columns(schema: &str, table: &str) -> Vec<DestCol> {
    let qualified = sqlgen::qualified(schema, table);
    let r: Result<Vec<DestCol>, pgrx::spi::Error> = Spi::connect(|client| {
        let rows = client.select(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, a.attgenerated <> '', a.attnum
               FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            None,
            &[qualified.as_str().into()],
        )?;
        let mut out = Vec::new();
        for row in rows {
            if let (Some(n), Some(t), Some(m), Some(g), Some(a)) = (
                row.get::<String>(1)?,
                row.get::<pg_sys::Oid>(2)?,
                row.get::<i32>(3)?,
                row.get::<bool>(4)?,
                row.get::<i16>(5)?,
            ) {
                out.push(DestCol {
                    name: n,
                    attnum: a,
                    type_oid: t,
                    typmod: m,
                    generated: g,
                });
            }
        }
        Ok(out)
    });
    match r {
        Ok(v) => v,
        Err(e) => pgrx::error!("cannot read the columns of {qualified}: {e}"),
    }
}

/// One step that brings a destination table in line with its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnChange {
    Rename { from: String, to: String },
    Add { name: String, source_index: usize },
    Drop { name: String },
    Retype { name: String, source_index: usize },
}

/// Compares the columns a Relation message announces (name, built-in type
/// OID or None for a user-defined type, typmod) with the destination's
/// (generated destination columns are not sent by pgoutput and are left
/// alone). A column missing on one side and a surplus column at the same
/// position on the other is a rename; the rest are adds and drops.
pub fn diff_columns(
    source: &[(String, Option<u32>, i32)],
    dest: &[(String, u32, i32)],
) -> Vec<ColumnChange> {
    let src_names: Vec<&str> = source.iter().map(|c| c.0.as_str()).collect();
    let dst_names: Vec<&str> = dest.iter().map(|c| c.0.as_str()).collect();
    let mut changes = Vec::new();
    let missing: Vec<usize> = (0..source.len())
        .filter(|i| !dst_names.contains(&source[*i].0.as_str()))
        .collect();
    let mut surplus: Vec<usize> = (0..dest.len())
        .filter(|i| !src_names.contains(&dest[*i].0.as_str()))
        .collect();
    for i in missing {
        // Same position among the columns both sides keep in order.
        if let Some(pos) = surplus.iter().position(|d| *d == i) {
            let d = surplus.remove(pos);
            changes.push(ColumnChange::Rename {
                from: dest[d].0.clone(),
                to: source[i].0.clone(),
            });
        } else {
            changes.push(ColumnChange::Add {
                name: source[i].0.clone(),
                source_index: i,
            });
        }
    }
    for d in surplus {
        changes.push(ColumnChange::Drop {
            name: dest[d].0.clone(),
        });
    }
    for (i, (name, oid, typmod)) in source.iter().enumerate() {
        if let (Some(oid), Some(d)) = (oid, dest.iter().find(|d| &d.0 == name)) {
            if *oid != d.1 || *typmod != d.2 {
                changes.push(ColumnChange::Retype {
                    name: name.clone(),
                    source_index: i,
                });
            }
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: &str, oid: u32) -> (String, Option<u32>, i32) {
        (n.into(), Some(oid), -1)
    }
    fn d(n: &str, oid: u32) -> (String, u32, i32) {
        (n.into(), oid, -1)
    }

    #[test]
    fn no_change() {
        assert!(diff_columns(&[s("a", 23), s("b", 25)], &[d("a", 23), d("b", 25)]).is_empty());
    }

    #[test]
    fn add_drop_rename_retype() {
        assert_eq!(
            diff_columns(
                &[s("a", 23), s("b", 25), s("c", 16)],
                &[d("a", 23), d("b", 25)]
            ),
            vec![ColumnChange::Add {
                name: "c".into(),
                source_index: 2
            }]
        );
        assert_eq!(
            diff_columns(&[s("a", 23)], &[d("a", 23), d("b", 25)]),
            vec![ColumnChange::Drop { name: "b".into() }]
        );
        assert_eq!(
            diff_columns(&[s("a", 23), s("renamed", 25)], &[d("a", 23), d("b", 25)]),
            vec![ColumnChange::Rename {
                from: "b".into(),
                to: "renamed".into()
            }]
        );
        assert_eq!(
            diff_columns(&[s("a", 20), s("b", 25)], &[d("a", 23), d("b", 25)]),
            vec![ColumnChange::Retype {
                name: "a".into(),
                source_index: 0
            }]
        );
        // a user-defined type (no comparable OID) is never "retyped"
        assert!(diff_columns(&[("u".into(), None, -1)], &[d("u", 99999)]).is_empty());
    }
}
