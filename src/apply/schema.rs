//! Destination DDL on the worker's main thread: naming source types in the
//! destination (built-in, user-defined re-created in the destination schema,
//! extension types found where their extension lives), creating user-defined
//! types and tables, and following source schema changes announced by
//! pgoutput Relation messages (added, dropped, renamed and retyped columns).

use crate::apply::sqlgen;
use crate::control::conninfo::TableRef;
use crate::source::catalog::{ColumnType, SourceTable, UserType};
use crate::source::decode::Relation;
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
    // One statement per call: text from the source cannot have added one.
    crate::apply::untrusted::single_statement(sql);
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
/// when an extension type's extension is not installed here, or when a
/// built-in type's text from the source is not one type name here (it is
/// resolved, and written by this server's `format_type`).
pub fn type_sql(ty: &ColumnType, dst_schema: &str, what: &str) -> String {
    match ty {
        ColumnType::Builtin(s) => crate::apply::untrusted::builtin_type(s, what),
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
                &domain_checks(name, checks),
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
        if matches!(t, UserType::Domain { .. }) {
            crate::apply::untrusted::check_domain_constraints(dst_schema, t.name());
        }
        pgrx::log!("synchdb: created type {dst_schema}.{}", t.name());
    }
}

/// A source domain's CHECK constraints as CREATE DOMAIN takes them, each
/// expression checked (`untrusted::expression`). A NOT VALID one is left
/// out, with a WARNING: existing source values may break it, and CREATE
/// DOMAIN cannot take it.
fn domain_checks(domain: &str, checks: &[String]) -> Vec<String> {
    let what = format!("CHECK constraint of domain {}", sqlgen::quote_ident(domain));
    let mut out = Vec::new();
    for def in checks {
        let Some((expr, not_valid)) = crate::apply::untrusted::split_domain_check(def) else {
            crate::apply::untrusted::refuse(format!(
                "source {what} is not a CHECK constraint; refused: {}",
                crate::apply::untrusted::shown(def)
            ));
        };
        let pasted = crate::apply::untrusted::expression(expr, &what);
        if not_valid {
            pgrx::warning!(
                "synchdb: source {what} is NOT VALID and is left out in the destination: {}",
                crate::apply::untrusted::shown(def)
            );
            continue;
        }
        out.push(format!("CHECK {pasted}"));
    }
    out
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
        let mut have = have;
        for (i, label) in labels.iter().enumerate() {
            if have.contains(label) {
                continue;
            }
            // Placed after the nearest earlier label the destination has,
            // else before the nearest later one.
            let after = labels[..i].iter().rev().find(|l| have.contains(l));
            let before = labels[i + 1..].iter().find(|l| have.contains(l));
            let place = match (after, before) {
                (Some(prev), _) => format!(" AFTER {}", sqlgen::quote_literal(prev)),
                (None, Some(next)) => format!(" BEFORE {}", sqlgen::quote_literal(next)),
                (None, None) => String::new(),
            };
            run(&format!(
                "ALTER TYPE {} ADD VALUE IF NOT EXISTS {}{place}",
                sqlgen::qualified(dst_schema, name),
                sqlgen::quote_literal(label)
            ));
            pgrx::log!("synchdb: added label {label:?} to enum {dst_schema}.{name}");
            have.push(label.clone());
            added += 1;
        }
    }
    added
}

/// Creates a destination table from a source table's shape unless one
/// exists. Returns whether it was created now (then it is empty and, with
/// `defer_pk`, still without its primary key, which is faster to build after
/// a bulk load).
pub fn create_table(
    dst_schema: &str,
    dst_table: &str,
    shape: &SourceTable,
    defer_pk: bool,
) -> bool {
    run(&format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        sqlgen::quote_ident(dst_schema)
    ));
    if exists_table(dst_schema, dst_table) {
        return false;
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
            generated: c.generated.as_deref().map(|g| {
                crate::apply::untrusted::expression(
                    g,
                    &format!(
                        "generation expression of column \"{}\" of {}",
                        c.name, shape.table
                    ),
                )
            }),
        })
        .collect();
    let pk: &[String] = if defer_pk { &[] } else { &shape.primary_key };
    run(&sqlgen::create_table(dst_schema, dst_table, &cols, pk));
    crate::apply::untrusted::check_generated_columns(
        dst_schema,
        dst_table,
        &generated_columns(shape),
    );
    true
}

/// The names of the generated columns of a source table.
fn generated_columns(shape: &SourceTable) -> Vec<String> {
    shape
        .columns
        .iter()
        .filter(|c| c.generated.is_some())
        .map(|c| c.name.clone())
        .collect()
}

/// Creates a destination table from a Relation message alone (for a source
/// table that is no longer in the source catalog); every column type must
/// be built in. The replica identity columns of a default identity become
/// the primary key.
pub fn create_table_from_stream(dst_schema: &str, dst_table: &str, rel: &Relation) {
    run(&format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        sqlgen::quote_ident(dst_schema)
    ));
    let cols: Vec<sqlgen::ColumnDef> = rel
        .columns
        .iter()
        .map(|c| sqlgen::ColumnDef {
            name: c.name.clone(),
            type_sql: format_type(c.type_oid, c.type_mod),
            not_null: false,
            generated: None,
        })
        .collect();
    let pk: Vec<String> = if rel.replica_identity == b'd' {
        rel.columns
            .iter()
            .filter(|c| c.is_key)
            .map(|c| c.name.clone())
            .collect()
    } else {
        Vec::new()
    };
    run(&sqlgen::create_table(dst_schema, dst_table, &cols, &pk));
}

/// `format_type` of a built-in type OID and typmod, as the destination
/// writes it.
pub fn format_type(oid: u32, typmod: i32) -> String {
    match Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.format_type($1::oid, $2)",
        &[i64::from(oid).into(), typmod.into()],
    ) {
        Ok(Some(s)) if !s.starts_with("???") && !s.is_empty() => s,
        _ => pgrx::error!("type OID {oid} from the source is not a built-in type here"),
    }
}

/// Whether the destination table has no row.
pub fn is_empty(schema: &str, table: &str) -> bool {
    require_table(schema, table);
    let sql = format!(
        "SELECT NOT EXISTS (SELECT 1 FROM {})",
        sqlgen::qualified(schema, table)
    );
    match Spi::get_one::<bool>(&sql) {
        Ok(Some(b)) => b,
        Ok(None) => false,
        Err(e) => pgrx::error!("{e}"),
    }
}

/// Raises an ERROR unless destination schema `schema` (when it exists) is
/// trusted: owned by a superuser, with no other role allowed to create in
/// it, and no type in it owned by one. The worker (a superuser) uses what
/// the schema holds by name (types it finds there, names resolved there),
/// so an object another role planted would run that role's code with a
/// superuser's rights.
pub fn require_trusted_schema(schema: &str) {
    // pg_database_owner (the owner of PostgreSQL 15's schema public) stands
    // for the database's owner: trusted when that is a superuser.
    let row = Spi::get_three_with_args::<String, String, String>(
        "WITH dbo AS (SELECT r.rolsuper FROM pg_catalog.pg_database d
                        JOIN pg_catalog.pg_roles r ON r.oid = d.datdba
                       WHERE d.datname = pg_catalog.current_database())
         SELECT CASE WHEN o.rolsuper
                       OR (o.rolname = 'pg_database_owner' AND (SELECT rolsuper FROM dbo))
                     THEN '' ELSE o.rolname::text END,
                coalesce((SELECT string_agg(DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                                          ELSE g.rolname::text END, ', ')
                            FROM pg_catalog.aclexplode(n.nspacl) a
                            LEFT JOIN pg_catalog.pg_roles g ON g.oid = a.grantee
                           WHERE a.privilege_type = 'CREATE'
                             AND (a.grantee = 0 OR NOT g.rolsuper)
                             AND (g.rolname IS DISTINCT FROM 'pg_database_owner'
                                  OR NOT (SELECT rolsuper FROM dbo))), ''),
                coalesce((SELECT string_agg(format('%I (%s)', t.typname, r.rolname), ', ')
                            FROM pg_catalog.pg_type t
                            JOIN pg_catalog.pg_roles r ON r.oid = t.typowner
                            LEFT JOIN pg_catalog.pg_class c ON c.oid = t.typrelid
                           WHERE t.typnamespace = n.oid AND NOT r.rolsuper
                             AND t.typcategory <> 'A'
                             AND (t.typrelid = 0 OR c.relkind = 'c')), '')
           FROM pg_catalog.pg_namespace n
           JOIN pg_catalog.pg_roles o ON o.oid = n.nspowner
          WHERE n.nspname = $1",
        &[schema.into()],
    );
    let (owner, creators, types) = match row {
        Ok((o, c, t)) => (
            o.unwrap_or_default(),
            c.unwrap_or_default(),
            t.unwrap_or_default(),
        ),
        Err(pgrx::spi::Error::InvalidPosition) => return,
        Err(e) => pgrx::error!("{e}"),
    };
    let q = sqlgen::quote_ident(schema);
    if !owner.is_empty() {
        pgrx::error!(
            "destination schema {q} belongs to role \"{owner}\", which is not a superuser: what it holds would be used by the connector's worker, a superuser; run ALTER SCHEMA {q} OWNER TO a superuser"
        );
    }
    if !creators.is_empty() {
        pgrx::error!(
            "roles other than superusers may create objects in destination schema {q} ({creators}): the connector's worker, a superuser, would use them; run REVOKE CREATE ON SCHEMA {q} FROM {creators}"
        );
    }
    if !types.is_empty() {
        pgrx::error!(
            "destination schema {q} holds types owned by roles that are not superusers ({types}): the connector's worker, a superuser, would use them; drop them or give them to a superuser"
        );
    }
}

/// Raises an ERROR unless destination relation schema.table (when it
/// exists) is a table or a partitioned table. The worker reads and writes
/// destination relations as a superuser (or as their owner): a view, or a
/// table turned into one, would run its owner's functions with those rights.
pub fn require_table(schema: &str, table: &str) {
    let kind = Spi::get_one_with_args::<String>(
        "SELECT c.relkind::text FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relname = $2",
        &[schema.into(), table.into()],
    );
    match kind {
        Ok(Some(k)) if k == "r" || k == "p" => {}
        Ok(None) | Err(pgrx::spi::Error::InvalidPosition) => {}
        Ok(Some(k)) => pgrx::error!(
            "destination {}.{} is not a table (relkind {k}); the connector writes only into tables",
            sqlgen::quote_ident(schema),
            sqlgen::quote_ident(table)
        ),
        Err(e) => pgrx::error!("{e}"),
    }
}

/// Whether `connector` created (or adopted) destination table schema.table:
/// its state lists it. Tables nobody recorded are never emptied or reshaped.
pub fn owned_by(connector: &str, schema: &str, table: &str) -> bool {
    matches!(
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM public.synchdb_table_state
                             WHERE name = $1 AND dst_schema = $2 AND dst_table = $3)",
            &[connector.into(), schema.into(), table.into()],
        ),
        Ok(Some(true))
    )
}

/// Another connector's state that lists destination table schema.table.
pub fn owner_other_than(connector: &str, schema: &str, table: &str) -> Option<String> {
    Spi::get_one_with_args::<String>(
        "SELECT name FROM public.synchdb_table_state
          WHERE name <> $1 AND dst_schema = $2 AND dst_table = $3 LIMIT 1",
        &[connector.into(), schema.into(), table.into()],
    )
    .ok()
    .flatten()
}

fn update_state(sql: &str, connector: &str, t: &TableRef, value: pgrx::datum::DatumWithOid<'_>) {
    if let Err(e) = Spi::run_with_args(
        sql,
        &[
            connector.into(),
            t.schema.as_str().into(),
            t.table.as_str().into(),
            value,
        ],
    ) {
        pgrx::error!("{e}");
    }
}

/// Records the source OID of a table's state.
pub fn set_src_relid(connector: &str, t: &TableRef, relid: u32) {
    update_state(
        "UPDATE public.synchdb_table_state SET src_relid = $4::bigint::oid
          WHERE name = $1 AND src_schema = $2 AND src_table = $3",
        connector,
        t,
        i64::from(relid).into(),
    );
}

/// Records which destination columns mirror source columns.
pub fn set_src_columns(connector: &str, t: &TableRef, cols: &[String]) {
    update_state(
        "UPDATE public.synchdb_table_state SET src_columns = $4
          WHERE name = $1 AND src_schema = $2 AND src_table = $3",
        connector,
        t,
        cols.to_vec().into(),
    );
}

/// Marks a table's copy as not done: the next start copies it again into
/// the same destination table (emptied and reshaped, the DBA's columns,
/// indexes and triggers kept).
/// The table is found by its source OID when known: the name may be one
/// the stream announced in the very transaction that was rolled back.
pub fn mark_for_copy(connector: &str, t: &TableRef, src_relid: u32) {
    update_state(
        "UPDATE public.synchdb_table_state SET state = 'schema', sync_lsn = '0/0'
          WHERE name = $1
            AND CASE WHEN $4 <> 0 AND EXISTS (SELECT 1 FROM public.synchdb_table_state
                                               WHERE name = $1 AND src_relid = $4::bigint::oid)
                     THEN src_relid = $4::bigint::oid
                     ELSE src_schema = $2 AND src_table = $3 END",
        connector,
        t,
        i64::from(src_relid).into(),
    );
}

/// Records that a table owes a copy whatever the mode (state 'copy'): it
/// joined the publication after rows were written to it. An existing state
/// keeps its destination table.
pub fn request_copy(connector: &str, t: &TableRef, dst_schema: &str, dst_table: &str) {
    let r = Spi::run_with_args(
        "INSERT INTO public.synchdb_table_state (name, src_schema, src_table, dst_schema, dst_table, state)
         VALUES ($1, $2, $3, $4, $5, 'copy')
         ON CONFLICT (name, src_schema, src_table) DO UPDATE SET state = 'copy', sync_lsn = '0/0'",
        &[
            connector.into(),
            t.schema.as_str().into(),
            t.table.as_str().into(),
            dst_schema.into(),
            dst_table.into(),
        ],
    );
    if let Err(e) = r {
        pgrx::error!("{e}");
    }
}

/// Forgets the state of a source table that is gone (its name now belongs
/// to a table renamed into it); its destination table stays.
pub fn forget_table(connector: &str, t: &TableRef) {
    update_state(
        "DELETE FROM public.synchdb_table_state
          WHERE name = $1 AND src_schema = $2 AND src_table = $3 AND $4",
        connector,
        t,
        true.into(),
    );
}

/// Marks a table whose copy was pending as done at `lsn` without copying
/// it: it no longer exists on the source (or is no longer captured), so
/// its changes older than `lsn` must not be applied (nor start another copy).
pub fn mark_ready_at(connector: &str, t: &TableRef, lsn: u64) {
    update_state(
        "UPDATE public.synchdb_table_state SET state = 'ready', sync_lsn = $4::pg_lsn
          WHERE name = $1 AND src_schema = $2 AND src_table = $3",
        connector,
        t,
        crate::lsn::format_lsn(lsn).as_str().into(),
    );
}

/// Prepares an existing destination table (created by this connector) for
/// a fresh copy of `shape`: emptied, source columns the source no longer has
/// dropped, missing ones added, changed types and NOT NULL set again; the
/// DBA's own columns, indexes and triggers are kept. Returns whether the
/// primary key must be built after the load.
pub fn reshape_for_copy(
    dst_schema: &str,
    dst_table: &str,
    shape: &SourceTable,
    src_columns: Option<&[String]>,
) -> bool {
    let target = sqlgen::qualified(dst_schema, dst_table);
    run(&format!("TRUNCATE {target}"));
    let owned = |name: &str| src_columns.is_none_or(|l| l.iter().any(|c| c == name));
    // Renamed columns keep their place (the table is empty: a rename and a
    // drop plus an add are the same here, but the column order is not).
    let src: Vec<(String, Option<u32>, i32)> = shape
        .columns
        .iter()
        .filter(|c| c.generated.is_none())
        .map(|c| (c.name.clone(), None, -1))
        .collect();
    let src_names: Vec<&str> = src.iter().map(|c| c.0.as_str()).collect();
    let dst: Vec<(String, u32, i32)> = dest_columns(dst_schema, dst_table)
        .iter()
        .filter(|d| !d.generated && (owned(&d.name) || src_names.contains(&d.name.as_str())))
        .map(|d| (d.name.clone(), u32::from(d.type_oid), d.typmod))
        .collect();
    for ch in diff_columns(&src, &dst) {
        match ch {
            ColumnChange::Rename { from, to } => run(&format!(
                "ALTER TABLE {target} RENAME COLUMN {} TO {}",
                sqlgen::quote_ident(&from),
                sqlgen::quote_ident(&to)
            )),
            ColumnChange::Drop { name } => run(&format!(
                "ALTER TABLE {target} DROP COLUMN {}",
                sqlgen::quote_ident(&name)
            )),
            ColumnChange::Add { .. } | ColumnChange::Retype { .. } => {}
        }
    }
    // The primary key follows the source's; a key where the source has
    // none is the DBA's and stays.
    let pk = primary_key_columns(dst_schema, dst_table);
    let drop_pk = !shape.primary_key.is_empty() && !pk.is_empty() && pk != shape.primary_key;
    if drop_pk {
        if let Ok(Some(con)) = Spi::get_one_with_args::<String>(
            "SELECT conname::text FROM pg_catalog.pg_constraint WHERE conrelid = $1::regclass AND contype = 'p'",
            &[target.as_str().into()],
        ) {
            run(&format!(
                "ALTER TABLE {target} DROP CONSTRAINT {}",
                sqlgen::quote_ident(&con)
            ));
        }
    }
    let kept_pk: Vec<String> = if drop_pk { Vec::new() } else { pk.clone() };
    let dest = dest_columns(dst_schema, dst_table);
    for d in &dest {
        let in_source = shape.columns.iter().any(|c| c.name == d.name);
        if !in_source && d.generated && owned(&d.name) {
            run(&format!(
                "ALTER TABLE {target} DROP COLUMN {}",
                sqlgen::quote_ident(&d.name)
            ));
        }
    }
    for c in &shape.columns {
        let what = format!("column \"{}\" of {}", c.name, shape.table);
        let ty = type_sql(&c.ty, dst_schema, &what);
        let col = sqlgen::quote_ident(&c.name);
        let existing = dest.iter().find(|d| d.name == c.name);
        let same_kind = existing.is_some_and(|d| d.generated == c.generated.is_some());
        if existing.is_some() && !same_kind {
            run(&format!("ALTER TABLE {target} DROP COLUMN {col}"));
        }
        match existing.filter(|_| same_kind) {
            None => {
                let mut d = format!("ALTER TABLE {target} ADD COLUMN {col} {ty}");
                if let Some(g) = &c.generated {
                    let g = crate::apply::untrusted::expression(
                        g,
                        &format!("generation expression of {what}"),
                    );
                    d.push_str(&format!(" GENERATED ALWAYS AS ({g}) STORED"));
                }
                run(&d);
            }
            Some(d) => {
                let expected = match &c.ty {
                    // Already this server's format_type.
                    ColumnType::Builtin(_) => ty.clone(),
                    _ => canonical_type(&ty),
                };
                if d.type_text != expected {
                    run(&format!(
                        "ALTER TABLE {target} ALTER COLUMN {col} TYPE {ty} USING NULL"
                    ));
                }
            }
        }
        if c.generated.is_none() && (c.not_null || !kept_pk.contains(&c.name)) {
            run(&format!(
                "ALTER TABLE {target} ALTER COLUMN {col} {} NOT NULL",
                if c.not_null { "SET" } else { "DROP" }
            ));
        }
    }
    crate::apply::untrusted::check_generated_columns(
        dst_schema,
        dst_table,
        &generated_columns(shape),
    );
    !shape.primary_key.is_empty() && pk != shape.primary_key
}

/// `format_type` of a type as SQL names it (resolved here; without typmod,
/// which user-defined and extension types do not have).
fn canonical_type(ty: &str) -> String {
    Spi::get_one::<String>(&format!(
        "SELECT pg_catalog.format_type(pg_catalog.pg_typeof(NULL::{ty}), NULL)"
    ))
    .ok()
    .flatten()
    .unwrap_or_else(|| ty.to_string())
}

/// The primary key columns of a destination table, in key order.
pub fn primary_key_columns(schema: &str, table: &str) -> Vec<String> {
    let qualified = sqlgen::qualified(schema, table);
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT a.attname::text FROM pg_catalog.pg_index i
               JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = $1::regclass AND i.indisprimary
              ORDER BY array_position(i.indkey::int2[], a.attnum)",
            None,
            &[qualified.as_str().into()],
        )?;
        let mut out = Vec::new();
        for r in rows {
            if let Some(n) = r.get::<String>(1)? {
                out.push(n);
            }
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_default()
}

pub fn add_primary_key(dst_schema: &str, dst_table: &str, pk: &[String]) {
    if !pk.is_empty() {
        run(&sqlgen::add_primary_key(dst_schema, dst_table, pk));
    }
}

/// Marks a source table ready in `synchdb_table_state` (snapshot complete as
/// of `sync_lsn`, or created empty with 0).
#[allow(clippy::too_many_arguments)]
pub fn record_table(
    name: &str,
    t: &TableRef,
    dst_schema: &str,
    dst_table: &str,
    src_relid: u32,
    sync_lsn: u64,
    rows: u64,
    columns: Option<&[String]>,
) {
    let r = Spi::run_with_args(
        "INSERT INTO public.synchdb_table_state
              (name, src_schema, src_table, src_relid, dst_schema, dst_table, state, sync_lsn, rows_copied, synced_at, src_columns)
         VALUES ($1, $2, $3, NULLIF($8, 0)::oid, $4, $5, 'ready', $6::pg_lsn, $7, now(), $9)
         ON CONFLICT (name, src_schema, src_table) DO UPDATE
            SET dst_schema = EXCLUDED.dst_schema, dst_table = EXCLUDED.dst_table, state = 'ready',
                src_relid = EXCLUDED.src_relid,
                src_columns = coalesce(EXCLUDED.src_columns, synchdb_table_state.src_columns),
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
            columns.map(|c| c.to_vec()).into(),
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
    /// `format_type` of its type and typmod.
    pub type_text: String,
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
            "SELECT a.attname::text, a.atttypid, a.atttypmod, a.attgenerated <> '', a.attnum,
                    pg_catalog.format_type(a.atttypid, a.atttypmod)
               FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            None,
            &[qualified.as_str().into()],
        )?;
        let mut out = Vec::new();
        for row in rows {
            if let (Some(n), Some(t), Some(m), Some(g), Some(a), Some(tt)) = (
                row.get::<String>(1)?,
                row.get::<pg_sys::Oid>(2)?,
                row.get::<i32>(3)?,
                row.get::<bool>(4)?,
                row.get::<i16>(5)?,
                row.get::<String>(6)?,
            ) {
                out.push(DestCol {
                    name: n,
                    attnum: a,
                    type_oid: t,
                    typmod: m,
                    generated: g,
                    type_text: tt,
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
    // (source index, destination index) of the renamed columns.
    let mut renamed: Vec<(usize, usize)> = Vec::new();
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
            renamed.push((i, d));
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
    // A renamed column may have changed type too (after its rename).
    for (i, (name, oid, typmod)) in source.iter().enumerate() {
        let d = dest.iter().find(|d| &d.0 == name).or_else(|| {
            renamed
                .iter()
                .find(|(s, _)| *s == i)
                .and_then(|(_, d)| dest.get(*d))
        });
        if let (Some(oid), Some(d)) = (oid, d) {
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
        // Renamed and retyped while no row changed: both, rename first.
        assert_eq!(
            diff_columns(&[s("a", 23), s("r", 25)], &[d("a", 23), d("n", 23)]),
            vec![
                ColumnChange::Rename {
                    from: "n".into(),
                    to: "r".into()
                },
                ColumnChange::Retype {
                    name: "r".into(),
                    source_index: 1
                }
            ]
        );
        // a user-defined type (no comparable OID) is never "retyped"
        assert!(diff_columns(&[("u".into(), None, -1)], &[d("u", 99999)]).is_empty());
    }
}
