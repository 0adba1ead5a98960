//! Secondary indexes and unique constraints of a copied table. Their
//! definitions are read from the source inside the snapshot the rows were
//! copied under, and they are built in the destination right after the rows
//! are loaded (building an index after a bulk load is faster than keeping it
//! up to date during it), in the copy's own transaction. Each index is built
//! in a subtransaction of its own: one that cannot be built (a function,
//! type, operator class or collation the destination lacks, a name another
//! relation holds) is a WARNING naming it, never a failed copy.
//!
//! Statements are assembled from parts: the index and table names quoted
//! here, the access method, operator class and collation names read from the
//! catalog and quoted here, and only the key expressions and the predicate as
//! the source deparses them; the result must parse as exactly one CREATE
//! INDEX of the expected name on the expected table before it runs.

use crate::apply::sqlgen::{qualified, quote_ident};
use crate::source::catalog::{SourceError, SourceTable};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{CStr, CString};
use std::time::Duration;
use tokio_postgres::Client;

/// The default collation's OID (`DEFAULT_COLLATION_OID`), the same in every
/// PostgreSQL version.
const DEFAULT_COLLATION_OID: u32 = 100;
/// `INDOPTION_DESC` and `INDOPTION_NULLS_FIRST` bits of `pg_index.indoption`.
const INDOPTION_DESC: i32 = 0x0001;
const INDOPTION_NULLS_FIRST: i32 = 0x0002;

/// A schema-qualified catalog object name (collation, operator class).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

/// One key column of an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexKey {
    /// The column or expression as the source deparses it (an expression in
    /// parentheses unless it is a bare function call).
    pub expr: String,
    pub collation: Option<QualifiedName>,
    /// The operator class when it is not the default for the column's type.
    pub opclass: Option<QualifiedName>,
    pub desc: bool,
    pub nulls_first: bool,
}

/// A unique constraint an index backs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueConstraint {
    pub name: String,
    pub deferrable: bool,
    pub deferred: bool,
}

/// A source index, as the destination builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIndex {
    pub name: String,
    pub unique: bool,
    pub method: String,
    pub keys: Vec<IndexKey>,
    /// INCLUDE columns (PostgreSQL 11 and later).
    pub include: Vec<String>,
    pub predicate: Option<String>,
    /// NULLS NOT DISTINCT (PostgreSQL 15 and later).
    pub nulls_not_distinct: bool,
    pub constraint: Option<UniqueConstraint>,
}

fn quote_qualified(q: &QualifiedName) -> String {
    qualified(&q.schema, &q.name)
}

/// `CREATE [UNIQUE] INDEX` for `ix` on the destination table.
pub fn create_index_sql(ix: &SourceIndex, dst_schema: &str, dst_table: &str) -> String {
    let keys: Vec<String> = ix
        .keys
        .iter()
        .map(|k| {
            let mut s = k.expr.clone();
            if let Some(c) = &k.collation {
                s.push_str(" COLLATE ");
                s.push_str(&quote_qualified(c));
            }
            if let Some(o) = &k.opclass {
                s.push(' ');
                s.push_str(&quote_qualified(o));
            }
            // As pg_get_indexdef writes them: DESC implies NULLS FIRST.
            if k.desc {
                s.push_str(" DESC");
                if !k.nulls_first {
                    s.push_str(" NULLS LAST");
                }
            } else if k.nulls_first {
                s.push_str(" NULLS FIRST");
            }
            s
        })
        .collect();
    let mut sql = format!(
        "CREATE {}INDEX {} ON {} USING {} ({})",
        if ix.unique { "UNIQUE " } else { "" },
        quote_ident(&ix.name),
        qualified(dst_schema, dst_table),
        quote_ident(&ix.method),
        keys.join(", ")
    );
    if !ix.include.is_empty() {
        sql.push_str(&format!(" INCLUDE ({})", ix.include.join(", ")));
    }
    if ix.nulls_not_distinct {
        sql.push_str(" NULLS NOT DISTINCT");
    }
    if let Some(p) = &ix.predicate {
        sql.push_str(&format!(" WHERE {p}"));
    }
    sql
}

/// `ALTER TABLE ... ADD CONSTRAINT ... UNIQUE USING INDEX` for an index
/// that backs a unique constraint on the source.
pub fn add_constraint_sql(
    ix: &SourceIndex,
    c: &UniqueConstraint,
    dst_schema: &str,
    dst_table: &str,
) -> String {
    let mut sql = format!(
        "ALTER TABLE {} ADD CONSTRAINT {} UNIQUE USING INDEX {}",
        qualified(dst_schema, dst_table),
        quote_ident(&c.name),
        quote_ident(&ix.name)
    );
    if c.deferrable {
        sql.push_str(" DEFERRABLE");
        if c.deferred {
            sql.push_str(" INITIALLY DEFERRED");
        }
    }
    sql
}

/// The index list query for a source of version `version`
/// (`server_version_num`): INCLUDE columns exist from 11 (`indnkeyatts`),
/// NULLS NOT DISTINCT from 15. Primary keys (the copy builds them), indexes
/// of exclusion constraints (left to `pg_dump`) and invalid indexes (a
/// failed `CREATE INDEX CONCURRENTLY`) are left out; a partitioned table's
/// own index is taken even when not every partition has it yet.
pub fn index_list_sql(version: i32) -> String {
    let nkey = if version >= 110000 {
        "i.indnkeyatts"
    } else {
        "i.indnatts"
    };
    let nnd = if version >= 150000 {
        "i.indnullsnotdistinct"
    } else {
        "false"
    };
    format!(
        "SELECT i.indexrelid, ic.relname::text, i.indisunique, am.amname::text,
                i.indnatts::int, {nkey}::int, {nnd},
                con.conname::text, coalesce(con.condeferrable, false), coalesce(con.condeferred, false),
                pg_catalog.pg_get_expr(i.indpred, i.indrelid)
           FROM pg_catalog.pg_index i
           JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
           JOIN pg_catalog.pg_am am ON am.oid = ic.relam
           LEFT JOIN pg_catalog.pg_constraint con
                  ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
                 AND con.contype IN ('p', 'u', 'x')
          WHERE i.indrelid = $1 AND NOT i.indisprimary AND i.indislive
            AND (i.indisvalid OR ic.relkind = 'I')
            AND (con.contype IS NULL OR con.contype = 'u')
          ORDER BY ic.relname"
    )
}

/// Decides whether a key column's collation must be written: a plain
/// column's when it differs from the column's own, an expression's when it
/// is not the default collation (as `pg_get_indexdef` does).
pub fn collation_needed(index_coll: u32, attnum: i16, column_coll: u32) -> bool {
    if index_coll == 0 {
        return false;
    }
    if attnum != 0 {
        index_coll != column_coll
    } else {
        index_coll != DEFAULT_COLLATION_OID
    }
}

/// Reads the definitions of source table `relid`'s secondary indexes.
/// Names of objects in the table's own schema are read unqualified (that
/// schema first in the source's search_path), so that they resolve in the
/// destination schema, where user-defined types are created; everything
/// runs under a savepoint, so that a failure never aborts the snapshot's
/// transaction, and the search_path is restored by rolling back to it.
pub async fn read_indexes(
    client: &Client,
    relid: u32,
    src_schema: &str,
) -> Result<Vec<SourceIndex>, SourceError> {
    // The savepoint and the search path the definitions are printed for,
    // in one round trip (an E'' literal reads the same whatever
    // standard_conforming_strings says).
    let path = quote_ident(src_schema)
        .replace('\\', "\\\\")
        .replace('\'', "''");
    let r = match client
        .batch_execute(&format!(
            "SAVEPOINT synchdb_indexes; SELECT pg_catalog.set_config('search_path', E'{path}', true)"
        ))
        .await
    {
        Ok(()) => read_indexes_inner(client, relid).await,
        Err(e) => Err(SourceError::from_pg(e)),
    };
    let undo = client
        .batch_execute("ROLLBACK TO SAVEPOINT synchdb_indexes; RELEASE SAVEPOINT synchdb_indexes")
        .await
        .map_err(SourceError::from_pg);
    let list = r?;
    undo?;
    Ok(list)
}

async fn read_indexes_inner(client: &Client, relid: u32) -> Result<Vec<SourceIndex>, SourceError> {
    // Read when the connection was opened.
    let version = crate::source::catalog::server_version();
    let rows = client
        .query(index_list_sql(version).as_str(), &[&relid])
        .await
        .map_err(SourceError::from_pg)?;
    let mut out = Vec::new();
    for r in rows {
        let oid: u32 = r.try_get(0).map_err(SourceError::from_pg)?;
        let natts: i32 = r.try_get(4).map_err(SourceError::from_pg)?;
        let nkey: i32 = r.try_get(5).map_err(SourceError::from_pg)?;
        let cols = client
            .query(
                "SELECT k, pg_catalog.pg_get_indexdef(i.indexrelid, k, false),
                        coalesce(i.indkey[k - 1], 0)::int2,
                        coalesce(i.indoption[k - 1], 0)::int,
                        coalesce(i.indcollation[k - 1], 0::oid), coalesce(a.attcollation, 0::oid),
                        cn.nspname::text, co.collname::text,
                        coalesce(opc.opcdefault, true), opn.nspname::text, opc.opcname::text
                   FROM pg_catalog.pg_index i
                  CROSS JOIN LATERAL pg_catalog.generate_series(1, i.indnatts::int) AS k
                   LEFT JOIN pg_catalog.pg_attribute a
                          ON a.attrelid = i.indrelid AND a.attnum = i.indkey[k - 1] AND i.indkey[k - 1] <> 0
                   LEFT JOIN pg_catalog.pg_collation co ON co.oid = i.indcollation[k - 1]
                   LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
                   LEFT JOIN pg_catalog.pg_opclass opc ON opc.oid = i.indclass[k - 1]
                   LEFT JOIN pg_catalog.pg_namespace opn ON opn.oid = opc.opcnamespace
                  WHERE i.indexrelid = $1
                  ORDER BY k",
                &[&oid],
            )
            .await
            .map_err(SourceError::from_pg)?;
        let mut keys = Vec::new();
        let mut include = Vec::new();
        for c in cols {
            let k: i32 = c.try_get(0).map_err(SourceError::from_pg)?;
            let expr: Option<String> = c.try_get(1).map_err(SourceError::from_pg)?;
            let Some(expr) = expr.filter(|e| !e.is_empty()) else {
                return Err(SourceError::Query(format!(
                    "column {k} of index {oid} has no definition"
                )));
            };
            if k > nkey {
                include.push(expr);
                continue;
            }
            let attnum: i16 = c.try_get(2).map_err(SourceError::from_pg)?;
            let option: i32 = c.try_get(3).map_err(SourceError::from_pg)?;
            let index_coll: u32 = c.try_get(4).map_err(SourceError::from_pg)?;
            let column_coll: u32 = c.try_get(5).map_err(SourceError::from_pg)?;
            let coll_schema: Option<String> = c.try_get(6).map_err(SourceError::from_pg)?;
            let coll_name: Option<String> = c.try_get(7).map_err(SourceError::from_pg)?;
            let opc_default: bool = c.try_get(8).map_err(SourceError::from_pg)?;
            let opc_schema: Option<String> = c.try_get(9).map_err(SourceError::from_pg)?;
            let opc_name: Option<String> = c.try_get(10).map_err(SourceError::from_pg)?;
            let collation = match (coll_schema, coll_name) {
                (Some(schema), Some(name)) if collation_needed(index_coll, attnum, column_coll) => {
                    Some(QualifiedName { schema, name })
                }
                _ => None,
            };
            let opclass = match (opc_schema, opc_name) {
                (Some(schema), Some(name)) if !opc_default => Some(QualifiedName { schema, name }),
                _ => None,
            };
            keys.push(IndexKey {
                expr,
                collation,
                opclass,
                desc: option & INDOPTION_DESC != 0,
                nulls_first: option & INDOPTION_NULLS_FIRST != 0,
            });
        }
        if keys.is_empty() || usize::try_from(natts).ok() != Some(keys.len() + include.len()) {
            return Err(SourceError::Query(format!(
                "index {oid} has {natts} columns, {} were read",
                keys.len() + include.len()
            )));
        }
        let constraint = r
            .try_get::<_, Option<String>>(7)
            .map_err(SourceError::from_pg)?
            .map(|name| -> Result<UniqueConstraint, SourceError> {
                Ok(UniqueConstraint {
                    name,
                    deferrable: r.try_get(8).map_err(SourceError::from_pg)?,
                    deferred: r.try_get(9).map_err(SourceError::from_pg)?,
                })
            })
            .transpose()?;
        out.push(SourceIndex {
            name: r.try_get(1).map_err(SourceError::from_pg)?,
            unique: r.try_get(2).map_err(SourceError::from_pg)?,
            method: r.try_get(3).map_err(SourceError::from_pg)?,
            keys,
            include,
            predicate: r.try_get(10).map_err(SourceError::from_pg)?,
            nulls_not_distinct: r.try_get(6).map_err(SourceError::from_pg)?,
            constraint,
        });
    }
    Ok(out)
}

/// Drives a source future from the worker, giving up (as an ERROR) when the
/// worker is asked to stop.
fn block<F: std::future::Future>(rt: &tokio::runtime::Runtime, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    loop {
        let r =
            rt.block_on(async { tokio::time::timeout(Duration::from_millis(250), &mut fut).await });
        match r {
            Ok(v) => return v,
            Err(_) => {
                if crate::control::worker::stopping() {
                    pgrx::error!("the connector is stopping");
                }
            }
        }
    }
}

/// Builds, in the current (copy) transaction, the secondary indexes and
/// unique constraints source table `shape` has, on `dst_schema.dst_table`.
/// `client` is the snapshot's source session. An index whose name is taken
/// by another relation, or that fails to build, is skipped with a WARNING;
/// one that exists already on this table (an earlier copy) is left as it
/// is. A source that is lost while reading them raises an ERROR (the copy
/// is retried, as for any source problem); any other failure to read them
/// is a WARNING and the copy goes on without them.
pub fn copy_indexes(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    connector: &str,
    shape: &SourceTable,
    dst_schema: &str,
    dst_table: &str,
) {
    let t = &shape.table;
    let list = match block(rt, read_indexes(client, shape.oid, &t.schema)) {
        Ok(l) => l,
        Err(e) if client.is_closed() => {
            pgrx::error!("reading the indexes of {t} on the source: {e}")
        }
        Err(e) => {
            pgrx::warning!(
                "connector \"{connector}\": could not read the indexes of source table {t}, none are created in {}: {e}",
                qualified(dst_schema, dst_table)
            );
            return;
        }
    };
    if list.is_empty() {
        return;
    }
    // Plain key and INCLUDE columns follow the object mappings' renames
    // (an expression naming a renamed column fails with a WARNING below).
    let maps = crate::apply::mapping::current();
    let mut list = list;
    for ix in list.iter_mut() {
        for k in ix.keys.iter_mut() {
            k.expr = maps.index_column(t, &k.expr);
        }
        for c in ix.include.iter_mut() {
            *c = maps.index_column(t, c);
        }
    }
    let Some(table_oid) = crate::apply::schema::relid(dst_schema, dst_table) else {
        return;
    };
    let mut built = 0;
    for ix in &list {
        match existing_relation(dst_schema, &ix.name) {
            None => {}
            Some(on) if on == Some(table_oid) => continue,
            Some(_) => {
                pgrx::warning!(
                    "connector \"{connector}\": index {} of source table {t} is not created: another relation named {} exists in schema {}",
                    quote_ident(&ix.name),
                    quote_ident(&ix.name),
                    quote_ident(dst_schema)
                );
                continue;
            }
        }
        match crate::apply::pgtxn::in_subtransaction(|| build_index(ix, dst_schema, dst_table)) {
            Ok(()) => built += 1,
            Err(e) => pgrx::warning!(
                "connector \"{connector}\": index {} of source table {t} could not be created on {}: {e}",
                quote_ident(&ix.name),
                qualified(dst_schema, dst_table)
            ),
        }
    }
    pgrx::log!(
        "synchdb: connector \"{connector}\": created {built} of the {} secondary indexes of {t} on {}",
        list.len(),
        qualified(dst_schema, dst_table)
    );
}

/// Whether a relation named `name` exists in `schema`: `Some(Some(table))`
/// for an index (on `table`), `Some(None)` for anything else.
fn existing_relation(schema: &str, name: &str) -> Option<Option<pg_sys::Oid>> {
    let r = Spi::get_two_with_args::<bool, pg_sys::Oid>(
        "SELECT true, i.indrelid
           FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           LEFT JOIN pg_catalog.pg_index i ON i.indexrelid = c.oid
          WHERE n.nspname = $1 AND c.relname = $2",
        &[schema.into(), name.into()],
    );
    match r {
        Ok((Some(true), on)) => Some(on),
        _ => None,
    }
}

/// Builds one index (and its unique constraint), with the destination
/// schema as search_path so that the names the source wrote unqualified
/// (its table's own schema) resolve there.
fn build_index(ix: &SourceIndex, dst_schema: &str, dst_table: &str) {
    let sql = create_index_sql(ix, dst_schema, dst_table);
    check_index_statement(&sql, ix, dst_schema, dst_table);
    let run = |sql: &str| {
        if let Err(e) = Spi::run(sql) {
            pgrx::error!("{e}");
        }
    };
    let previous = match Spi::get_one::<String>("SELECT pg_catalog.current_setting('search_path')")
    {
        Ok(p) => p.unwrap_or_default(),
        Err(e) => pgrx::error!("{e}"),
    };
    if let Err(e) = Spi::run_with_args(
        "SELECT pg_catalog.set_config('search_path', $1, true)",
        &[quote_ident(dst_schema).as_str().into()],
    ) {
        pgrx::error!("{e}");
    }
    // Under the search_path the build uses, so functions resolve the same.
    if !only_trusted_functions_in(&sql, dst_schema, dst_table) {
        pgrx::error!(
            "an expression or predicate of the source's definition calls a function that is not an immutable built-in; the index is left out"
        );
    }
    run(&sql);
    if let Some(c) = &ix.constraint {
        run(&add_constraint_sql(ix, c, dst_schema, dst_table));
    }
    if let Err(e) = Spi::run_with_args(
        "SELECT pg_catalog.set_config('search_path', $1, true)",
        &[previous.as_str().into()],
    ) {
        pgrx::error!("{e}");
    }
}

/// Called through `pg_sys::ffi::pg_guard_ffi_boundary` (it raises ERRORs).
mod raw {
    use pgrx::pg_sys;
    unsafe extern "C-unwind" {
        pub fn transformIndexStmt(
            relid: pg_sys::Oid,
            stmt: *mut pg_sys::IndexStmt,
            query_string: *const std::ffi::c_char,
        ) -> *mut pg_sys::IndexStmt;
    }
}

/// Whether every function the expressions and predicate of CREATE INDEX
/// `sql` (checked by `check_index_statement`) on `dst_schema.dst_table`
/// call is an immutable built-in (`untrusted::only_trusted_functions`):
/// building the index evaluates them, as the worker, for every row. The
/// statement is analyzed here (its names resolved), not run.
fn only_trusted_functions_in(sql: &str, dst_schema: &str, dst_table: &str) -> bool {
    let Some(relid) = crate::apply::schema::relid(dst_schema, dst_table) else {
        pgrx::error!(
            "destination table {} is gone",
            qualified(dst_schema, dst_table)
        );
    };
    let Ok(c) = CString::new(sql) else {
        pgrx::error!("the index definition contains a NUL byte");
    };
    unsafe {
        let list = pgrx::PgList::<pg_sys::RawStmt>::from_pg(pg_sys::raw_parser(
            c.as_ptr(),
            pg_sys::RawParseMode::RAW_PARSE_DEFAULT,
        ));
        let Some(raw) = list.head().filter(|r| list.len() == 1 && !r.is_null()) else {
            return false;
        };
        let node = (*raw).stmt;
        if !pgrx::is_a(node, pg_sys::NodeTag::T_IndexStmt) {
            return false;
        }
        // What CREATE INDEX takes anyway; the analysis expects it held.
        pg_sys::LockRelationOid(relid, pg_sys::ShareLock as pg_sys::LOCKMODE);
        let stmt = node as *mut pg_sys::IndexStmt;
        let text = c.as_ptr();
        let st = pg_sys::ffi::pg_guard_ffi_boundary(|| raw::transformIndexStmt(relid, stmt, text));
        if st.is_null() {
            return false;
        }
        let elems = pgrx::PgList::<pg_sys::IndexElem>::from_pg((*st).indexParams);
        let exprs_ok = elems
            .iter_ptr()
            .all(|e| e.is_null() || crate::apply::untrusted::only_trusted_functions((*e).expr));
        let including = pgrx::PgList::<pg_sys::IndexElem>::from_pg((*st).indexIncludingParams);
        let including_ok = including
            .iter_ptr()
            .all(|e| e.is_null() || crate::apply::untrusted::only_trusted_functions((*e).expr));
        exprs_ok
            && including_ok
            && crate::apply::untrusted::only_trusted_functions((*st).whereClause)
    }
}

fn cstr_eq(p: *const std::ffi::c_char, s: &str) -> bool {
    !p.is_null() && unsafe { CStr::from_ptr(p) }.to_bytes() == s.as_bytes()
}

/// Raises an ERROR unless `sql` parses as exactly one CREATE INDEX of
/// `ix.name` on `dst_schema.dst_table` with `ix.method`: text the source
/// wrote (expressions, predicate) cannot turn it into anything else.
fn check_index_statement(sql: &str, ix: &SourceIndex, dst_schema: &str, dst_table: &str) {
    let Ok(c) = CString::new(sql) else {
        pgrx::error!("the index definition contains a NUL byte");
    };
    let ok = unsafe {
        let list = pgrx::PgList::<pg_sys::RawStmt>::from_pg(pg_sys::raw_parser(
            c.as_ptr(),
            pg_sys::RawParseMode::RAW_PARSE_DEFAULT,
        ));
        match list.head() {
            Some(raw) if list.len() == 1 && !raw.is_null() => {
                let node = (*raw).stmt;
                if pgrx::is_a(node, pg_sys::NodeTag::T_IndexStmt) {
                    let st = node as *mut pg_sys::IndexStmt;
                    let rel = (*st).relation;
                    !rel.is_null()
                        && cstr_eq((*st).idxname, &ix.name)
                        && cstr_eq((*st).accessMethod, &ix.method)
                        && (*st).unique == ix.unique
                        && (*st).tableSpace.is_null()
                        && cstr_eq((*rel).schemaname, dst_schema)
                        && cstr_eq((*rel).relname, dst_table)
                } else {
                    false
                }
            }
            _ => false,
        }
    };
    if !ok {
        pgrx::error!("the source's definition does not make a single CREATE INDEX statement");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(expr: &str) -> IndexKey {
        IndexKey {
            expr: expr.into(),
            collation: None,
            opclass: None,
            desc: false,
            nulls_first: false,
        }
    }

    fn index(name: &str, keys: Vec<IndexKey>) -> SourceIndex {
        SourceIndex {
            name: name.into(),
            unique: false,
            method: "btree".into(),
            keys,
            include: Vec::new(),
            predicate: None,
            nulls_not_distinct: false,
            constraint: None,
        }
    }

    #[test]
    fn plain_and_unique() {
        let ix = index("t_a", vec![key("a")]);
        assert_eq!(
            create_index_sql(&ix, "postgres", "t"),
            r#"CREATE INDEX "t_a" ON "postgres"."t" USING "btree" (a)"#
        );
        let mut u = index("t_a_b_key", vec![key("a"), key("b")]);
        u.unique = true;
        u.include = vec!["c".into()];
        u.nulls_not_distinct = true;
        assert_eq!(
            create_index_sql(&u, "postgres", "t"),
            r#"CREATE UNIQUE INDEX "t_a_b_key" ON "postgres"."t" USING "btree" (a, b) INCLUDE (c) NULLS NOT DISTINCT"#
        );
        let c = UniqueConstraint {
            name: "t_a_b_key".into(),
            deferrable: true,
            deferred: true,
        };
        assert_eq!(
            add_constraint_sql(&u, &c, "postgres", "t"),
            r#"ALTER TABLE "postgres"."t" ADD CONSTRAINT "t_a_b_key" UNIQUE USING INDEX "t_a_b_key" DEFERRABLE INITIALLY DEFERRED"#
        );
    }

    #[test]
    fn key_options_as_pg_get_indexdef_writes_them() {
        let mut k1 = key("lower(a)");
        k1.opclass = Some(QualifiedName {
            schema: "pg_catalog".into(),
            name: "text_pattern_ops".into(),
        });
        k1.desc = true;
        let mut k2 = key("((b + 1))");
        k2.desc = true;
        k2.nulls_first = true;
        let mut k3 = key("a");
        k3.collation = Some(QualifiedName {
            schema: "pg_catalog".into(),
            name: "POSIX".into(),
        });
        k3.nulls_first = true;
        let mut ix = index("Weird \"name\"", vec![k1, k2, k3]);
        ix.predicate = Some("((b > 0) AND (a <> 'x'::text))".into());
        assert_eq!(
            create_index_sql(&ix, "my db", "t"),
            r#"CREATE INDEX "Weird ""name""" ON "my db"."t" USING "btree" (lower(a) "pg_catalog"."text_pattern_ops" DESC NULLS LAST, ((b + 1)) DESC, a COLLATE "pg_catalog"."POSIX" NULLS FIRST) WHERE ((b > 0) AND (a <> 'x'::text))"#
        );
    }

    #[test]
    fn collations_written_only_when_needed() {
        // Plain column: only a collation other than the column's own.
        assert!(!collation_needed(0, 1, 100));
        assert!(!collation_needed(950, 1, 950));
        assert!(collation_needed(951, 1, 100));
        assert!(collation_needed(100, 1, 950));
        // Expression: only a collation other than the default.
        assert!(!collation_needed(100, 0, 0));
        assert!(collation_needed(950, 0, 0));
    }

    #[test]
    fn version_dependent_columns() {
        let v10 = index_list_sql(100000);
        assert!(v10.contains("i.indnatts::int, i.indnatts::int, false"));
        let v11 = index_list_sql(110000);
        assert!(v11.contains("i.indnkeyatts::int, false"));
        let v15 = index_list_sql(150000);
        assert!(v15.contains("i.indnkeyatts::int, i.indnullsnotdistinct"));
    }
}
