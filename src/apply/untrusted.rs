//! Text read from the source that becomes part of destination DDL, which
//! the worker runs as a superuser: built-in type names, column defaults,
//! generated-column expressions and domain CHECK constraints. A compromised
//! source, or anyone between it and the destination, chooses that text, so
//! none of it is pasted into a statement unless PostgreSQL's own parser, in
//! this session (`standard_conforming_strings` on), agrees it is what it
//! claims to be:
//!
//! - a built-in type name is resolved to a destination type (it must be a
//!   type name and nothing else, in `pg_catalog` or `information_schema`),
//!   and the statement names it by this server's `format_type`;
//! - an expression must parse as `SELECT <text>` with one unnamed target and
//!   no other clause, and is pasted as `(<text>` newline `)`: the same
//!   tokens, a complete expression with balanced parentheses, so nothing it
//!   holds reaches outside the parentheses (the newline ends a trailing
//!   `--` comment);
//! - an expression the worker would evaluate (a default, a generated
//!   column, a domain CHECK, an index expression or predicate) may call only
//!   immutable functions of `pg_catalog` (`only_trusted_functions`): a
//!   stable built-in such as `table_to_xml` or `current_setting` reads what
//!   the superuser may read, and a function of another schema runs any code
//!   as the superuser; a default that calls anything else is left out, the
//!   rest is refused (see `default_expression`, `check_domain_constraints`,
//!   `check_generated_columns` and `indexes`);
//! - a statement runs only when it parses as exactly one statement.
//!
//! Identifiers (type, column, label and constraint names) are never parsed:
//! they are always quoted (`sqlgen`). Subqueries are refused by PostgreSQL
//! itself in defaults, generated columns and CHECK constraints.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgList;
use std::ffi::{c_void, CString};

/// How many characters of a refused text an error message quotes.
const SHOWN_CHARS: usize = 120;

/// A source text as an error message quotes it: escaped, and cut short.
pub fn shown(text: &str) -> String {
    let cut: String = text.chars().take(SHOWN_CHARS).collect();
    if cut.len() < text.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

/// Raises the ERROR of a refused text (SQLSTATE 42P17,
/// invalid_object_definition: the source defines something unusable).
pub fn refuse(message: String) -> ! {
    pgrx::ereport!(
        ERROR,
        PgSqlErrorCode::ERRCODE_INVALID_OBJECT_DEFINITION,
        message
    );
}

/// The form in which an expression that passed `expression` is pasted.
pub fn paste(expr: &str) -> String {
    format!("({expr}\n)")
}

/// A domain CHECK constraint as `pg_get_constraintdef` writes it
/// (`CHECK (<expression>)`, then ` NOT VALID` when not validated): the
/// expression and whether it is NOT VALID.
pub fn split_domain_check(def: &str) -> Option<(&str, bool)> {
    let (body, not_valid) = match def.strip_suffix(" NOT VALID") {
        Some(b) => (b, true),
        None => (def, false),
    };
    let inner = body.strip_prefix("CHECK (")?.strip_suffix(')')?;
    Some((inner, not_valid))
}

fn c_string(text: &str) -> Result<CString, String> {
    CString::new(text).map_err(|_| "it contains a NUL byte".to_string())
}

/// The raw parse trees of `sql` (an ERROR when it does not parse).
///
/// # Safety
/// Called in a backend, inside a transaction; the nodes live in the
/// current memory context.
unsafe fn raw_statements(sql: &CString) -> Vec<*mut pg_sys::Node> {
    let list = PgList::<pg_sys::RawStmt>::from_pg(pg_sys::raw_parser(
        sql.as_ptr(),
        pg_sys::RawParseMode::RAW_PARSE_DEFAULT,
    ));
    list.iter_ptr()
        .filter(|r| !r.is_null())
        .map(|r| (*r).stmt)
        .collect()
}

/// The expression of `SELECT <expr>`, when that is exactly one statement
/// with one unnamed target and no other clause.
///
/// # Safety
/// As `raw_statements`.
unsafe fn lone_expression(expr: &str) -> Result<*mut pg_sys::Node, String> {
    let sql = c_string(&format!("SELECT {expr}\n"))?;
    let stmts = raw_statements(&sql);
    let [stmt] = stmts.as_slice() else {
        return Err(format!("{} statements", stmts.len()));
    };
    if stmt.is_null() || !pgrx::is_a(*stmt, pg_sys::NodeTag::T_SelectStmt) {
        return Err("not an expression".into());
    }
    let s = &*(*stmt as *mut pg_sys::SelectStmt);
    let bare = s.distinctClause.is_null()
        && s.intoClause.is_null()
        && s.fromClause.is_null()
        && s.whereClause.is_null()
        && s.groupClause.is_null()
        && !s.groupDistinct
        && s.havingClause.is_null()
        && s.windowClause.is_null()
        && s.valuesLists.is_null()
        && s.sortClause.is_null()
        && s.limitOffset.is_null()
        && s.limitCount.is_null()
        && s.lockingClause.is_null()
        && s.withClause.is_null()
        && s.op == pg_sys::SetOperation::SETOP_NONE
        && s.larg.is_null()
        && s.rarg.is_null();
    if !bare {
        return Err("more than an expression".into());
    }
    let targets = PgList::<pg_sys::ResTarget>::from_pg(s.targetList);
    match targets.head() {
        Some(t)
            if targets.len() == 1
                && !t.is_null()
                && (*t).name.is_null()
                && (*t).indirection.is_null()
                && !(*t).val.is_null() =>
        {
            Ok((*t).val)
        }
        _ => Err(format!("{} expressions", targets.len())),
    }
}

/// Raises an ERROR unless `expr`, which the source wrote as `what` (e.g.
/// `default of column "d" of public.t`), is exactly one expression;
/// returns it as it must be pasted (`paste`).
pub fn expression(expr: &str, what: &str) -> String {
    let checked =
        crate::apply::pgtxn::in_subtransaction(|| unsafe { lone_expression(expr).map(|_| ()) });
    match checked {
        Ok(Ok(())) => paste(expr),
        Ok(Err(why)) | Err(why) => refuse(format!(
            "source {what} is not a single expression ({why}); refused: {}",
            shown(expr)
        )),
    }
}

/// Whether `expr` parses as exactly one expression (an object mapping's
/// transform, rendered): `Err` says why not.
pub fn check_single_expression(expr: &str) -> Result<(), String> {
    crate::apply::pgtxn::in_subtransaction(|| unsafe { lone_expression(expr).map(|_| ()) })
        .and_then(|r| r)
}

#[pg_guard]
unsafe extern "C-unwind" fn untrusted_function(func: pg_sys::Oid, _cx: *mut c_void) -> bool {
    pg_sys::func_volatile(func) as u8 != pg_sys::PROVOLATILE_IMMUTABLE
        || pg_sys::get_func_namespace(func) != pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE)
}

#[pg_guard]
unsafe extern "C-unwind" fn untrusted_walker(node: *mut pg_sys::Node, cx: *mut c_void) -> bool {
    if node.is_null() {
        return false;
    }
    if pg_sys::check_functions_in_node(node, Some(untrusted_function), cx) {
        return true;
    }
    pg_sys::expression_tree_walker(node, Some(untrusted_walker), cx)
}

/// Whether every function an analyzed expression tree calls (directly, as
/// an operator, a cast or a type's I/O function) is an immutable function
/// of `pg_catalog`. Anything else, evaluated by the worker as a superuser,
/// could read or do what the source chose: a stable built-in
/// (`table_to_xml`, `current_setting`) reads any table or setting, and a
/// function of another schema, whatever volatility it declares, runs any
/// code.
///
/// # Safety
/// `node` is null or an analyzed expression tree; called in a transaction.
pub unsafe fn only_trusted_functions(node: *mut pg_sys::Node) -> bool {
    !untrusted_walker(node, std::ptr::null_mut())
}

/// A source column default, checked by `expression`, as `ADD COLUMN ...
/// DEFAULT` may use it: `None` (with a WARNING) when it calls a function
/// that is not an immutable built-in (`only_trusted_functions`), or names
/// what the destination lacks. Such a default would be evaluated here, as
/// the worker, for every existing row (and a volatile one could not match
/// the source's values anyway: `nextval`, `random()`, `now()`); the column
/// is added without it and existing rows hold NULL.
pub fn default_expression(expr: &str, what: &str) -> Option<String> {
    let pasted = expression(expr, what);
    let untrusted = crate::apply::pgtxn::in_subtransaction(|| unsafe {
        let raw = lone_expression(expr)?;
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        let cooked =
            pg_sys::transformExpr(pstate, raw, pg_sys::ParseExprKind::EXPR_KIND_COLUMN_DEFAULT);
        let untrusted = !only_trusted_functions(cooked);
        pg_sys::free_parsestate(pstate);
        Ok::<bool, String>(untrusted)
    });
    match untrusted {
        Ok(Ok(false)) => Some(pasted),
        Ok(Ok(true)) => {
            pgrx::warning!(
                "synchdb: source {what} calls a function that is not an immutable built-in; the column is added without it (existing rows hold NULL): {}",
                shown(expr)
            );
            None
        }
        Ok(Err(why)) | Err(why) => {
            pgrx::warning!(
                "synchdb: source {what} cannot be evaluated here ({why}); the column is added without it (existing rows hold NULL): {}",
                shown(expr)
            );
            None
        }
    }
}

/// Raises an ERROR when a CHECK constraint of destination domain
/// `schema.name` calls a function that is not an immutable built-in
/// (`only_trusted_functions`): a domain's CHECK runs on every value applied,
/// as the worker, and its ERROR messages are readable by anyone. Called
/// right after the domain is created, in the same transaction, which the
/// ERROR rolls back with it (creating a domain evaluates nothing).
pub fn check_domain_constraints(schema: &str, name: &str) {
    let exprs: Result<Vec<String>, pgrx::spi::Error> = Spi::connect(|c| {
        let rows = c.select(
            "SELECT c.conbin::text FROM pg_catalog.pg_constraint c
               JOIN pg_catalog.pg_type t ON t.oid = c.contypid
               JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
              WHERE n.nspname = $1 AND t.typname = $2 AND c.contype = 'c'",
            None,
            &[schema.into(), name.into()],
        )?;
        let mut out = Vec::new();
        for r in rows {
            if let Some(e) = r.get::<String>(1)? {
                out.push(e);
            }
        }
        Ok(out)
    });
    let exprs = match exprs {
        Ok(e) => e,
        Err(e) => pgrx::error!("{e}"),
    };
    for e in exprs {
        let Ok(c) = CString::new(e) else {
            pgrx::error!(
                "a CHECK constraint of domain {} is unreadable",
                crate::apply::sqlgen::quote_ident(name)
            );
        };
        let trusted = unsafe {
            let node = pg_sys::stringToNode(c.as_ptr()) as *mut pg_sys::Node;
            only_trusted_functions(node)
        };
        if !trusted {
            refuse(format!(
                "source CHECK constraint of domain {} calls a function that is not an immutable built-in; refused (a domain CHECK runs on every value applied)",
                crate::apply::sqlgen::quote_ident(name)
            ));
        }
    }
}

/// Raises an ERROR when the expression of a generated column of destination
/// table `schema.table` named in `columns` calls a function that is not an
/// immutable built-in (`only_trusted_functions`): it is evaluated, as the
/// worker, for every row written. Called right after the DDL that created
/// the columns, in the same transaction (which the ERROR rolls back) and
/// before any row is written.
pub fn check_generated_columns(schema: &str, table: &str, columns: &[String]) {
    if columns.is_empty() {
        return;
    }
    let exprs: Result<Vec<(String, String)>, pgrx::spi::Error> = Spi::connect(|c| {
        let rows = c.select(
            "SELECT a.attname::text, d.adbin::text FROM pg_catalog.pg_attrdef d
               JOIN pg_catalog.pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
               JOIN pg_catalog.pg_class r ON r.oid = d.adrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace
              WHERE n.nspname = $1 AND r.relname = $2 AND a.attgenerated <> ''
                AND a.attname = ANY ($3)",
            None,
            &[schema.into(), table.into(), columns.to_vec().into()],
        )?;
        let mut out = Vec::new();
        for r in rows {
            if let (Some(n), Some(e)) = (r.get::<String>(1)?, r.get::<String>(2)?) {
                out.push((n, e));
            }
        }
        Ok(out)
    });
    let exprs = match exprs {
        Ok(e) => e,
        Err(e) => pgrx::error!("{e}"),
    };
    for (col, e) in exprs {
        let Ok(c) = CString::new(e) else {
            pgrx::error!(
                "the generation expression of column {} is unreadable",
                crate::apply::sqlgen::quote_ident(&col)
            );
        };
        let trusted = unsafe {
            let node = pg_sys::stringToNode(c.as_ptr()) as *mut pg_sys::Node;
            only_trusted_functions(node)
        };
        if !trusted {
            refuse(format!(
                "source generation expression of column {} of {} calls a function that is not an immutable built-in; refused (it is evaluated for every row written)",
                crate::apply::sqlgen::quote_ident(&col),
                crate::apply::sqlgen::qualified(schema, table)
            ));
        }
    }
}

/// Parses a type name (and nothing else) into its OID and typmod; an ERROR
/// when it is not one or names no type.
///
/// # Safety
/// Called in a backend, inside a transaction.
#[cfg(feature = "pg15")]
pub(crate) unsafe fn parse_type(name: &CString) -> (pg_sys::Oid, i32) {
    let mut oid = pg_sys::InvalidOid;
    let mut typmod = -1;
    pg_sys::parseTypeString(name.as_ptr(), &mut oid, &mut typmod, false);
    (oid, typmod)
}

#[cfg(not(feature = "pg15"))]
pub(crate) unsafe fn parse_type(name: &CString) -> (pg_sys::Oid, i32) {
    let mut oid = pg_sys::InvalidOid;
    let mut typmod = -1;
    // No soft-error context: a bad name raises its ERROR.
    pg_sys::parseTypeString(name.as_ptr(), &mut oid, &mut typmod, std::ptr::null_mut());
    (oid, typmod)
}

/// The destination's name for a built-in type the source wrote as `text`
/// (its `format_type`) for `what`: `text` must be one type name that
/// resolves here to a type of `pg_catalog` or `information_schema`, and the
/// result is this server's `format_type` of it, typmod included. Raises an
/// ERROR otherwise.
pub fn builtin_type(text: &str, what: &str) -> String {
    let resolved = crate::apply::pgtxn::in_subtransaction(|| {
        let name = c_string(text)?;
        let (oid, typmod) = unsafe { parse_type(&name) };
        let row = Spi::get_two_with_args::<bool, String>(
            "SELECT n.nspname IN ('pg_catalog', 'information_schema'),
                    pg_catalog.format_type(t.oid, $2)
               FROM pg_catalog.pg_type t
               JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
              WHERE t.oid = $1",
            &[oid.into(), typmod.into()],
        );
        match row {
            Ok((Some(true), Some(formatted))) => Ok(formatted),
            Ok((Some(false), _)) => Err("not a built-in type here".to_string()),
            Ok(_) => Err("no such type".to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    match resolved {
        Ok(Ok(t)) => t,
        Ok(Err(why)) | Err(why) => refuse(format!(
            "source type of {what} does not name a built-in type of the destination ({why}); refused: {}",
            shown(text)
        )),
    }
}

/// Raises an ERROR unless `sql` is exactly one statement. Every DDL
/// statement the worker builds is one; this guards that a text that passed
/// the checks above cannot have made it two.
pub fn single_statement(sql: &str) {
    let Ok(c) = CString::new(sql) else {
        refuse("a DDL statement contains a NUL byte; refused".into());
    };
    let n = unsafe { raw_statements(&c).len() };
    if n != 1 {
        refuse(format!("a DDL statement parses as {n} statements; refused"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_checks_split_as_pg_get_constraintdef_writes_them() {
        assert_eq!(
            split_domain_check("CHECK ((VALUE > 0))"),
            Some(("(VALUE > 0)", false))
        );
        assert_eq!(
            split_domain_check("CHECK ((VALUE < 100)) NOT VALID"),
            Some(("(VALUE < 100)", true))
        );
        // What is inside is checked as an expression later: here only the
        // frame counts.
        assert_eq!(
            split_domain_check("CHECK ((VALUE > 0)); CREATE ROLE evil SUPERUSER; --)"),
            Some(("(VALUE > 0)); CREATE ROLE evil SUPERUSER; --", false))
        );
        assert_eq!(split_domain_check("NOT NULL"), None);
        assert_eq!(split_domain_check("CHECK (VALUE > 0) NO INHERIT"), None);
        assert_eq!(split_domain_check("EXCLUDE (x WITH =)"), None);
    }

    #[test]
    fn pasted_expressions_end_trailing_comments() {
        assert_eq!(paste("1"), "(1\n)");
        // A trailing comment ends at the newline, before the parenthesis.
        assert_eq!(paste("1 -- )"), "(1 -- )\n)");
    }

    #[test]
    fn refused_text_is_shown_escaped_and_short() {
        assert_eq!(shown("a\"b"), "\"a\\\"b\"");
        let long = "x".repeat(500);
        let s = shown(&long);
        assert!(s.len() < 140 && s.ends_with("..."), "{s}");
        assert_eq!(shown("1;\nDROP"), "\"1;\\nDROP\"");
    }
}
