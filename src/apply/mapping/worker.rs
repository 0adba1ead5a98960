//! The object mappings inside PostgreSQL: loading a connector's enabled
//! mappings (types resolved here), the set the worker uses now, the
//! snapshot copy of a table with transforms, and the source-to-destination
//! column record behind `synchdb_att_view`.

use super::*;
use crate::apply::{applier, schema, sqlgen, usercontext};
use pgrx::prelude::*;
use std::cell::RefCell;
use std::ffi::CString;
use std::rc::Rc;

thread_local! {
    /// The mappings of the connector this worker runs (empty elsewhere).
    static CURRENT: RefCell<Rc<Mappings>> = RefCell::new(Rc::new(Mappings::default()));
}

/// The mappings in use now.
pub fn current() -> Rc<Mappings> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Reads the enabled mappings of `connector` (inside a transaction) and
/// makes them the ones in use. A mapping that no longer resolves (a type
/// dropped since it was added) or whose destination schema is not trusted
/// is an error naming it.
pub fn load(connector: &str, srcdb: &str) -> Result<(), String> {
    let rows: Vec<(String, String, String)> = Spi::connect(|c| {
        let t = c.select(
            "SELECT objtype, srcobj, dstobj FROM public.synchdb_objmap
              WHERE name = $1 AND enabled ORDER BY objtype, srcobj",
            None,
            &[connector.into()],
        )?;
        let mut v = Vec::new();
        for r in t {
            v.push((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<String>(3)?.unwrap_or_default(),
            ));
        }
        Ok::<_, pgrx::spi::Error>(v)
    })
    .map_err(|e| format!("reading synchdb_objmap: {e}"))?;
    let mut m = Mappings {
        srcdb: srcdb.to_string(),
        ..Default::default()
    };
    for (objtype, srcobj, dstobj) in rows {
        let what = format!("object mapping ({objtype}, {srcobj})");
        let kind = ObjType::parse(&objtype).map_err(|e| format!("{what}: {e}"))?;
        let src = parse_source(kind, &srcobj, srcdb).map_err(|e| format!("{what}: {e}"))?;
        match (kind, src) {
            (ObjType::Table, Source::Table(t)) => {
                m.add_table(
                    t,
                    parse_table_dest(&dstobj).map_err(|e| format!("{what}: {e}"))?,
                );
            }
            (ObjType::Column, Source::Column(t, c)) => {
                m.add_column(
                    t,
                    c,
                    parse_column_dest(&dstobj).map_err(|e| format!("{what}: {e}"))?,
                );
            }
            (ObjType::Datatype, src) => {
                let ty = parse_type_dest(&dstobj).map_err(|e| format!("{what}: {e}"))?;
                let target = resolve_builtin_type(&ty).map_err(|e| format!("{what}: {e}"))?;
                match src {
                    Source::Type(name) => {
                        let src = resolve_builtin_type(&name)
                            .map_err(|e| format!("{what}: source type: {e}"))?;
                        check_global_source_type(&src).map_err(|e| format!("{what}: {e}"))?;
                        m.add_type(src.oid, target);
                    }
                    Source::Column(t, c) => m.add_column_type(t, c, target),
                    Source::Table(_) => {}
                }
            }
            (ObjType::Transform, Source::Column(t, c)) => {
                check_transform(&dstobj).map_err(|e| format!("{what}: {e}"))?;
                m.add_transform(t, c, dstobj);
            }
            _ => return Err(format!("{what}: malformed")),
        }
    }
    for s in m.schemas() {
        crate::apply::pgtxn::in_subtransaction(|| schema::require_trusted_schema(&s))
            .map_err(|e| format!("object mapping into schema \"{s}\": {e}"))?;
    }
    CURRENT.with(|c| *c.borrow_mut() = Rc::new(m));
    Ok(())
}

/// Resolves a type name (with its modifier) to a type of `pg_catalog` or
/// `information_schema` in this database: only those are used by mappings
/// (a type another role owns would run its code in the worker).
pub fn resolve_builtin_type(text: &str) -> Result<TypeTarget, String> {
    let name = CString::new(text).map_err(|_| "the type name contains a NUL byte".to_string())?;
    let parsed = crate::apply::pgtxn::in_subtransaction(|| unsafe {
        crate::apply::untrusted::parse_type(&name)
    })
    .map_err(|e| format!("type \"{text}\" does not exist or is malformed ({e})"))?;
    let (oid, typmod) = parsed;
    let row = Spi::get_two_with_args::<bool, String>(
        "SELECT n.nspname IN ('pg_catalog', 'information_schema'),
                pg_catalog.format_type(t.oid, $2)
           FROM pg_catalog.pg_type t
           JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
          WHERE t.oid = $1",
        &[oid.into(), typmod.into()],
    );
    match row {
        Ok((Some(true), Some(sql))) => Ok(TypeTarget {
            oid: u32::from(oid),
            typmod,
            sql,
        }),
        Ok((Some(false), _)) => Err(format!(
            "type \"{text}\" is not a built-in type (of pg_catalog); mappings use built-in types only"
        )),
        Ok(_) | Err(_) => Err(format!("type \"{text}\" does not exist")),
    }
}

/// Whether a transform renders and parses as exactly one expression.
pub fn check_transform(template: &str) -> Result<(), String> {
    let rendered = render(template, "$1")?;
    crate::apply::untrusted::check_single_expression(&rendered)
}

/// The SQL of a transformed value: the template with `value` for `%d`,
/// cast to the destination column's type.
pub fn transformed(template: &str, value: &str, type_sql: &str) -> String {
    match render(template, value) {
        Ok(r) => format!("CAST({r} AS {type_sql})"),
        Err(e) => pgrx::error!("transform {}: {e}", sqlgen::quote_literal(template)),
    }
}

/// Loads a snapshot copy into `schema.table` (columns `cols`, destination
/// names). Without transforms for source table `t` this is the plain COPY;
/// with them, the rows are copied into a temporary staging table of the
/// destination columns' types first and inserted from there with each
/// transform applied (as the table's owner). Returns the rows loaded.
pub fn copy_into(
    schema_name: &str,
    table: &str,
    t: &TableRef,
    src_cols: &[String],
    cols: &[String],
    freeze: applier::CopyOptions,
    feed: &mut dyn FnMut() -> Result<Option<bytes::Bytes>, String>,
) -> u64 {
    let m = current();
    if !m.has_transforms(t) {
        return applier::copy_into(schema_name, table, cols, freeze, feed);
    }
    let dest = schema::dest_columns(schema_name, table);
    let mut defs = Vec::new();
    let mut exprs = Vec::new();
    for (src, c) in src_cols.iter().zip(cols) {
        let Some(d) = dest.iter().find(|d| &d.name == c) else {
            pgrx::error!(
                "column \"{c}\" of {} does not exist",
                sqlgen::qualified(schema_name, table)
            );
        };
        defs.push(format!("{} {}", sqlgen::quote_ident(c), d.type_text));
        let value = format!("s.{}", sqlgen::quote_ident(c));
        exprs.push(match m.transform(t, src) {
            Some(tpl) => transformed(tpl, &value, &d.type_text),
            None => value,
        });
    }
    schema::run_ddl("DROP TABLE IF EXISTS pg_temp.synchdb_stage");
    schema::run_ddl(&format!(
        "CREATE TEMPORARY TABLE synchdb_stage ({})",
        defs.join(", ")
    ));
    applier::copy_into(
        "pg_temp",
        "synchdb_stage",
        cols,
        applier::CopyOptions::default(),
        feed,
    );
    let relid = schema::relid(schema_name, table);
    let owner = relid.and_then(usercontext::run_as);
    if let (Some(relid), Some(owner)) = (relid, owner) {
        // The checks of every write as the table's owner (applier::copy_into).
        usercontext::refuse_untrusted_owner(relid, owner);
        usercontext::refuse_row_security(relid, owner);
        let role = Spi::get_one_with_args::<String>(
            "SELECT rolname::text FROM pg_catalog.pg_roles WHERE oid = $1",
            &[owner.into()],
        )
        .ok()
        .flatten()
        .unwrap_or_default();
        schema::run_ddl(&format!(
            "GRANT SELECT ON pg_temp.synchdb_stage TO {}",
            sqlgen::quote_ident(&role)
        ));
    }
    let names: Vec<String> = cols.iter().map(|c| sqlgen::quote_ident(c)).collect();
    let sql = format!(
        "WITH ins AS (INSERT INTO {} ({}) SELECT {} FROM pg_temp.synchdb_stage s RETURNING 1) SELECT count(*) FROM ins",
        sqlgen::qualified(schema_name, table),
        names.join(", "),
        exprs.join(", ")
    );
    let n = usercontext::as_role(owner, || Spi::get_one::<i64>(&sql));
    schema::run_ddl("DROP TABLE pg_temp.synchdb_stage");
    match n {
        Ok(Some(n)) => u64::try_from(n).unwrap_or(0),
        Ok(None) => 0,
        Err(e) => pgrx::error!("applying the transforms of {t}: {e}"),
    }
}

/// One source column as `synchdb_att_view` shows it.
pub struct AttRow {
    pub src_name: String,
    /// The source type's name, when known (else the one recorded before).
    pub src_type: Option<String>,
    pub dst_name: String,
}

/// Records the source columns of `t` and their destination names (for
/// `synchdb_att_view`); columns no longer in the source are forgotten.
pub fn record_columns(connector: &str, srcdb: &str, t: &TableRef, cols: &[AttRow]) {
    let ext_tb = show_path(&[srcdb, &t.schema, &t.table]);
    let names: Vec<String> = cols.iter().map(|c| c.src_name.clone()).collect();
    let types: Vec<Option<String>> = cols.iter().map(|c| c.src_type.clone()).collect();
    let dsts: Vec<String> = cols.iter().map(|c| c.dst_name.clone()).collect();
    let objs: Vec<String> = cols
        .iter()
        .map(|c| show_path(&[srcdb, &t.schema, &t.table, &c.src_name]))
        .collect();
    let r = Spi::run_with_args(
        "DELETE FROM public.synchdb_attribute
          WHERE name = $1 AND src_schema = $2 AND src_table = $3
            AND ext_attname <> ALL ($4)",
        &[
            connector.into(),
            t.schema.as_str().into(),
            t.table.as_str().into(),
            names.clone().into(),
        ],
    )
    .and_then(|_| {
        Spi::run_with_args(
            "INSERT INTO public.synchdb_attribute AS a
                    (name, src_schema, src_table, position, ext_tbname, ext_attname,
                     ext_atttypename, pg_attname, ext_colobj)
             SELECT $1, $2, $3, u.ord, $4, u.n, u.ty, u.d, u.o
               FROM unnest($5::text[], $6::text[], $7::text[], $8::text[])
                    WITH ORDINALITY AS u(n, ty, d, o, ord)
             ON CONFLICT (name, src_schema, src_table, ext_attname) DO UPDATE
                SET position = EXCLUDED.position, ext_tbname = EXCLUDED.ext_tbname,
                    pg_attname = EXCLUDED.pg_attname, ext_colobj = EXCLUDED.ext_colobj,
                    ext_atttypename = coalesce(EXCLUDED.ext_atttypename, a.ext_atttypename)",
            &[
                connector.into(),
                t.schema.as_str().into(),
                t.table.as_str().into(),
                ext_tb.as_str().into(),
                names.into(),
                types.into(),
                dsts.into(),
                objs.into(),
            ],
        )
    });
    if let Err(e) = r {
        pgrx::error!("recording the columns of {t}: {e}");
    }
}

/// The `synchdb_att_view` rows of a source table from its shape (source
/// names and types) and its mapped shape.
pub fn att_rows(shape: &SourceTable, mapped: &SourceTable) -> Vec<AttRow> {
    shape
        .columns
        .iter()
        .zip(&mapped.columns)
        .map(|(s, d)| AttRow {
            src_name: s.name.clone(),
            src_type: Some(match &s.ty {
                ColumnType::Builtin(b) => b.clone(),
                ColumnType::User { name, dims } | ColumnType::Extension { name, dims, .. } => {
                    sqlgen::with_dims(name, *dims)
                }
            }),
            dst_name: d.name.clone(),
        })
        .collect()
}

/// The `synchdb_att_view` rows from a Relation message (source) and its
/// mapped form; types named by this server for built-in types.
pub fn att_rows_of_relation(src: &Relation, mapped: &Relation) -> Vec<AttRow> {
    src.columns
        .iter()
        .zip(&mapped.columns)
        .map(|(s, d)| AttRow {
            src_name: s.name.clone(),
            src_type: (s.type_oid < 10000).then(|| schema::format_type(s.type_oid, s.type_mod)),
            dst_name: d.name.clone(),
        })
        .collect()
}
