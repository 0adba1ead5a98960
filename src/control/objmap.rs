//! The SQL functions of object mappings: `synchdb_add_objmap` (validated
//! before anything is stored), `synchdb_del_objmap` (disables a mapping, as
//! SynchDB does) and `synchdb_reload_objmap` (a running connector takes the
//! mappings again without a restart). Formats and their use are in
//! `apply::mapping`; README, "Object mapping", says what a change does.

use crate::apply::mapping::{self, ObjType, Source};
use crate::apply::schema;
use crate::control::api::{load_conninfo, my_database, raise, unknown_connector};
use crate::control::shmem;
use pgrx::prelude::*;

const FORMATS: &str = "Formats: table: srcobj srcdb.schema.table, dstobj table or schema.table; column: srcobj srcdb.schema.table.column, dstobj a column name; datatype: srcobj a type name (int4) or srcdb.schema.table.column, dstobj a built-in type (bigint, varchar|20); transform: srcobj srcdb.schema.table.column, dstobj an expression with %d for the value.";

fn require_superuser(what: &str) {
    if !unsafe { pg_sys::superuser() } {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to {what}"),
            Some("Object mappings decide where the connector's worker, a superuser, writes and which expressions it evaluates.".into()),
            Some("Only superusers may change object mappings."),
        );
    }
}

fn bad(msg: String, hint: Option<&str>) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        msg,
        None,
        hint,
    )
}

fn srcdb_of(name: &str) -> String {
    match load_conninfo(name) {
        Some((_, info)) => info.srcdb,
        None => unknown_connector(name),
    }
}

fn parse_kind(objtype: &str) -> ObjType {
    ObjType::parse(objtype).unwrap_or_else(|e| bad(format!("invalid objtype: {e}"), Some(FORMATS)))
}

fn parse_src(kind: ObjType, srcobj: &str, srcdb: &str) -> Source {
    mapping::parse_source(kind, srcobj, srcdb).unwrap_or_else(|e| {
        bad(
            format!(
                "invalid srcobj {} for a {} mapping: {e}",
                crate::apply::sqlgen::quote_literal(srcobj),
                kind.as_str()
            ),
            Some(FORMATS),
        )
    })
}

/// Adds (or replaces, and enables) a mapping of connector `name`.
#[pg_extern]
fn synchdb_add_objmap(name: &str, objtype: &str, srcobj: &str, dstobj: &str) -> i32 {
    require_superuser("add an object mapping");
    let srcdb = srcdb_of(name);
    let kind = parse_kind(objtype);
    let src = parse_src(kind, srcobj, &srcdb);
    let srcobj = src.canonical(&srcdb);
    let dst_err = |e: String| -> ! {
        bad(
            format!(
                "invalid dstobj {} for a {} mapping: {e}",
                crate::apply::sqlgen::quote_literal(dstobj),
                kind.as_str()
            ),
            Some(FORMATS),
        )
    };
    let stored = match kind {
        ObjType::Table => {
            let (s, t) = mapping::parse_table_dest(dstobj).unwrap_or_else(|e| dst_err(e));
            check_table_destination(name, &srcobj, &s, &t);
            mapping::show_path(&[&s, &t])
        }
        ObjType::Column => {
            mapping::show_part(&mapping::parse_column_dest(dstobj).unwrap_or_else(|e| dst_err(e)))
        }
        ObjType::Datatype => {
            let ty = mapping::parse_type_dest(dstobj).unwrap_or_else(|e| dst_err(e));
            if let Err(e) = mapping::resolve_builtin_type(&ty) {
                raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                    format!("invalid dstobj for a datatype mapping: {e}"),
                    None,
                    Some("Name a built-in type of this server, such as bigint, text, numeric(12,2) or varchar|20."),
                );
            }
            if let Source::Type(src_ty) = &src {
                match mapping::resolve_builtin_type(src_ty) {
                    Err(e) => raise(
                        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                        format!("invalid srcobj for a datatype mapping: {e}"),
                        None,
                        Some("A type-wide mapping names a built-in type (int4, text, ...); map a column of another type by srcdb.schema.table.column."),
                    ),
                    Ok(t) => {
                        if let Err(e) = mapping::check_global_source_type(&t) {
                            bad(format!("invalid srcobj for a datatype mapping: {e}"), None);
                        }
                    }
                }
            }
            dstobj.trim().to_string()
        }
        ObjType::Transform => {
            if let Err(e) = mapping::check_transform(dstobj) {
                raise(
                    PgSqlErrorCode::ERRCODE_SYNTAX_ERROR,
                    format!(
                        "invalid transform {}: {e}",
                        crate::apply::sqlgen::quote_literal(dstobj)
                    ),
                    None,
                    Some("A transform is one SQL expression; %d stands for the column's value, e.g. '%d' || '_x' or %d * 100."),
                );
            }
            dstobj.to_string()
        }
    };
    if let Err(e) = Spi::run_with_args(
        "INSERT INTO public.synchdb_objmap (name, objtype, enabled, srcobj, dstobj)
         VALUES ($1, $2, true, $3, $4)
         ON CONFLICT (name, objtype, srcobj) DO UPDATE
            SET enabled = true, dstobj = EXCLUDED.dstobj",
        &[
            name.into(),
            kind.as_str().into(),
            srcobj.as_str().into(),
            stored.as_str().into(),
        ],
    ) {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("storing the object mapping failed: {e}"),
            None,
            None,
        );
    }
    0
}

/// A table mapping may name a destination the connector may write: a
/// trusted schema (README, "Security"), a table that does not exist yet or
/// that this connector created, and not one another mapping already uses.
fn check_table_destination(name: &str, srcobj: &str, s: &str, t: &str) {
    if let Err(e) = crate::apply::pgtxn::in_subtransaction(|| schema::require_trusted_schema(s)) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("destination schema \"{s}\" of a table mapping is not trusted: {e}"),
            None,
            None,
        );
    }
    if schema::relid(s, t).is_some() && !schema::owned_by(name, s, t) {
        raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_TABLE,
            format!(
                "destination {} already exists and was not created by connector \"{name}\"",
                crate::apply::sqlgen::qualified(s, t)
            ),
            None,
            Some("Map the table to a name that is free, or drop or rename the existing relation."),
        );
    }
    let shown = mapping::show_path(&[s, t]);
    let taken = Spi::get_one_with_args::<String>(
        "SELECT srcobj FROM public.synchdb_objmap
          WHERE name = $1 AND objtype = 'table' AND enabled AND srcobj <> $2
            AND dstobj = $3",
        &[name.into(), srcobj.into(), shown.as_str().into()],
    )
    .ok()
    .flatten();
    if let Some(other) = taken {
        raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("source table {other} is already mapped to {shown}"),
            None,
            Some("Each source table needs a destination of its own."),
        );
    }
}

/// Disables a mapping (SynchDB keeps the row with enabled = false); it
/// takes effect at the next start or synchdb_reload_objmap.
#[pg_extern]
fn synchdb_del_objmap(name: &str, objtype: &str, srcobj: &str) -> i32 {
    require_superuser("delete an object mapping");
    let srcdb = srcdb_of(name);
    let kind = parse_kind(objtype);
    let srcobj = parse_src(kind, srcobj, &srcdb).canonical(&srcdb);
    let found = Spi::get_one_with_args::<bool>(
        "WITH u AS (UPDATE public.synchdb_objmap SET enabled = false
                     WHERE name = $1 AND objtype = $2 AND srcobj = $3 RETURNING 1)
         SELECT EXISTS (SELECT 1 FROM u)",
        &[name.into(), kind.as_str().into(), srcobj.as_str().into()],
    );
    if !matches!(found, Ok(Some(true))) {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!(
                "connector \"{name}\" has no {} mapping for {srcobj}",
                kind.as_str()
            ),
            None,
            Some("See SELECT * FROM synchdb_objmap."),
        );
    }
    0
}

fn not_running(name: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("connector \"{name}\" is not running"),
        None,
        Some("A connector reads its object mappings when it starts."),
    )
}

/// Makes a running connector take its mappings again (between two
/// transactions, without a restart).
#[pg_extern]
fn synchdb_reload_objmap(name: &str) -> i32 {
    require_superuser("reload object mappings");
    let srcdb = srcdb_of(name);
    // What the worker would read must load: refused here, not there.
    if let Err(e) = mapping::load(name, &srcdb) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("the object mappings of connector \"{name}\" cannot be used: {e}"),
            None,
            Some("Fix or disable the mapping with synchdb_add_objmap or synchdb_del_objmap."),
        );
    }
    // Mappings changed in this very transaction are not visible to the
    // worker before it commits: the request is then sent at commit.
    let changed_here = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM public.synchdb_objmap
                         WHERE name = $1
                           AND xmin = pg_catalog.xid(pg_catalog.pg_current_xact_id_if_assigned()))",
        &[name.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if changed_here {
        if !shmem::is_running(my_database(), name) {
            not_running(name);
        }
        let n = name.to_string();
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || {
            shmem::request_reload(my_database(), &n);
        });
        pgrx::notice!(
            "connector \"{name}\" takes its object mappings when this transaction commits"
        );
        return 0;
    }
    if !shmem::request_reload(my_database(), name) {
        not_running(name);
    }
    // Taken between two source transactions: the changes applied after
    // this returns use the new mappings. Before streaming (a snapshot, a
    // schema review) they are taken when streaming begins.
    let streaming = Spi::get_one_with_args::<bool>(
        "SELECT stage <> 'schema sync' AND state <> 'syncing'
           FROM public.synchdb_state_view WHERE name = $1",
        &[name.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !streaming {
        return 0;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while shmem::reload_pending(my_database(), name) {
        if std::time::Instant::now() > deadline {
            pgrx::warning!(
                "connector \"{name}\" has not taken the new object mappings yet; it takes them after its current transaction"
            );
            break;
        }
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                20,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    }
    0
}
