//! Object mappings (`synchdb_objmap`, SynchDB's `synchdb_add_objmap`): where
//! a source table lands (`table`), what a source column is called
//! (`column`) and typed (`datatype`) in the destination, and an expression
//! applied to a column's values (`transform`). This module owns their
//! formats (parsing and canonical forms, pure and unit-tested), the set a
//! worker uses (loaded at each start and on `synchdb_reload_objmap`, held in
//! a thread-local of the worker's main thread), and the one place where a
//! source table's shape, a Relation message and a snapshot copy are turned
//! into their mapped destination form. Everything that names destination
//! tables or columns asks here: the snapshot, the schema sync, table
//! creation while streaming, the relation map and the row statements.
//!
//! Transforms are SQL written by a superuser (only superusers may add
//! mappings). The value is never spliced into them: `%d` becomes a bound
//! parameter (or, in a snapshot copy, a column of a staging table), and the
//! result is cast to the destination column's type.

use crate::control::conninfo::TableRef;
use crate::source::catalog::{ColumnType, SourceTable};
use crate::source::decode::Relation;
use std::collections::HashMap;

/// The four kinds of mapping, as SynchDB names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjType {
    Table,
    Column,
    Datatype,
    Transform,
}

impl ObjType {
    pub fn parse(s: &str) -> Result<ObjType, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "table" => Ok(ObjType::Table),
            "column" => Ok(ObjType::Column),
            "datatype" => Ok(ObjType::Datatype),
            "transform" => Ok(ObjType::Transform),
            other => Err(format!(
                "unsupported object type \"{other}\"; use table, column, datatype or transform"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ObjType::Table => "table",
            ObjType::Column => "column",
            ObjType::Datatype => "datatype",
            ObjType::Transform => "transform",
        }
    }
}

/// Splits a dotted name as PostgreSQL reads identifiers: unquoted parts are
/// folded to lower case, `"quoted"` parts are taken as written (and may
/// contain dots); spaces around parts are ignored.
pub fn split_path(s: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = s.trim().chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut part = String::new();
        let mut quoted = false;
        if chars.peek() == Some(&'"') {
            quoted = true;
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err("unterminated quoted identifier".into()),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' || c.is_whitespace() {
                    break;
                }
                if c == '"' {
                    return Err("a quote inside an unquoted name".into());
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if part.is_empty() {
            return Err(if quoted {
                "an empty quoted name".into()
            } else {
                "an empty name part".into()
            });
        }
        if part.len() > 63 {
            return Err(format!("name \"{part}\" is longer than 63 bytes"));
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => continue,
            Some(c) => return Err(format!("unexpected character '{c}'")),
        }
    }
}

/// A name part as `split_path` reads it back: bare when it is a plain lower
/// case identifier, else double-quoted.
pub fn show_part(p: &str) -> String {
    let plain = p
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain {
        p.to_string()
    } else {
        format!("\"{}\"", p.replace('"', "\"\""))
    }
}

pub fn show_path(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| show_part(p))
        .collect::<Vec<_>>()
        .join(".")
}

/// What a mapping's `srcobj` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Table(TableRef),
    Column(TableRef, String),
    /// A source type (datatype mappings for every column of that type).
    Type(String),
}

impl Source {
    /// The canonical `srcobj` text: `srcdb.schema.table[.column]`, or the
    /// type name as given (trimmed, lower case).
    pub fn canonical(&self, srcdb: &str) -> String {
        match self {
            Source::Table(t) => show_path(&[srcdb, &t.schema, &t.table]),
            Source::Column(t, c) => show_path(&[srcdb, &t.schema, &t.table, c]),
            Source::Type(ty) => ty.clone(),
        }
    }
}

/// Parses `srcobj` for a mapping kind. Tables are `srcdb.schema.table`
/// (or `schema.table`), columns `srcdb.schema.table.column`; a datatype mapping takes a column (for that
/// column only) or a type name without dots (`int4`, `character varying`)
/// for every column of that type.
pub fn parse_source(kind: ObjType, srcobj: &str, srcdb: &str) -> Result<Source, String> {
    let raw = srcobj.trim();
    if raw.is_empty() {
        return Err("the source object is empty".into());
    }
    if kind == ObjType::Datatype && !raw.contains('.') {
        if raw.contains('|') {
            return Err(
                "the \"|true\" auto-increment qualifier is not used by the postgres connector; give the type name alone"
                    .into(),
            );
        }
        return Ok(Source::Type(
            raw.split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .to_ascii_lowercase(),
        ));
    }
    let mut parts = split_path(raw)?;
    let (min, what) = match kind {
        ObjType::Table => (2, "srcdb.schema.table"),
        _ => (3, "srcdb.schema.table.column"),
    };
    // A column always names its database: `a.b.c` could be read as
    // SynchDB's db.table.column as well as schema.table.column.
    if parts.len() == min + 1 || (kind != ObjType::Table && parts.len() == min) {
        let db = parts.remove(0);
        if db != srcdb {
            return Err(format!(
                "\"{db}\" is not the connector's source database \"{srcdb}\""
            ));
        }
    }
    if parts.len() != min {
        return Err(format!("expected {what}"));
    }
    let t = TableRef {
        schema: parts[0].clone(),
        table: parts[1].clone(),
    };
    Ok(match kind {
        ObjType::Table => Source::Table(t),
        _ => Source::Column(t, parts[2].clone()),
    })
}

/// A table mapping's destination: `name` (in schema `public`, as in
/// SynchDB) or `schema.name`.
pub fn parse_table_dest(dstobj: &str) -> Result<(String, String), String> {
    let parts = split_path(dstobj)?;
    let (schema, table) = match parts.as_slice() {
        [t] => ("public".to_string(), t.clone()),
        [s, t] => (s.clone(), t.clone()),
        _ => return Err("expected table or schema.table".into()),
    };
    if schema.starts_with("pg_") || schema == "information_schema" {
        return Err(format!("schema \"{schema}\" is reserved for the system"));
    }
    Ok((schema, table))
}

/// A column mapping's destination: one column name.
pub fn parse_column_dest(dstobj: &str) -> Result<String, String> {
    match split_path(dstobj)?.as_slice() {
        [c] => Ok(c.clone()),
        _ => Err("expected a column name (without table)".into()),
    }
}

/// A datatype mapping's destination as SynchDB writes it: `type` or
/// `type|length`; a length above 0 becomes the type's modifier
/// (`varchar|20` is `varchar(20)`), 0 and -1 mean none.
pub fn parse_type_dest(dstobj: &str) -> Result<String, String> {
    let (ty, len) = match dstobj.split_once('|') {
        Some((t, l)) => (t.trim(), Some(l.trim())),
        None => (dstobj.trim(), None),
    };
    if ty.is_empty() {
        return Err("the type name is empty".into());
    }
    let len: i64 = match len {
        None => 0,
        Some(l) => l
            .parse()
            .map_err(|_| format!("length \"{l}\" after '|' is not an integer"))?,
    };
    match len {
        0 | -1 => Ok(ty.to_string()),
        n if n > 0 => {
            if ty.contains('(') {
                Err("give the length either in the type or after '|', not both".into())
            } else {
                Ok(format!("{ty}({n})"))
            }
        }
        _ => Err(format!("length {len} is not valid")),
    }
}

/// Renders a transform `template` with `value` (SQL for the value: `$3`, or
/// a staging column): a bare `%d` becomes `(value)`, and a string literal
/// holding `%d` (SynchDB's `'%d'`, spliced there as text) becomes the
/// concatenation of its pieces with `(value)::text`. Nothing else changes.
/// The result is parenthesised (a trailing `--` comment cannot swallow what
/// follows). Errors on what cannot be rendered safely.
pub fn render(template: &str, value: &str) -> Result<String, String> {
    let t: Vec<char> = template.chars().collect();
    let mut out = String::with_capacity(template.len() + 16);
    let mut i = 0;
    let is_ident = |c: char| c.is_alphanumeric() || c == '_' || c == '$';
    while i < t.len() {
        let c = t[i];
        match c {
            '\'' => {
                // E'..' and U&'..' have escapes: copied, never split.
                let prefix = i > 0 && {
                    let p = t[i - 1];
                    ((p == 'e' || p == 'E') && (i < 2 || !is_ident(t[i - 2]))) || p == '&'
                };
                let backslash = i > 0 && (t[i - 1] == 'e' || t[i - 1] == 'E') && prefix;
                let mut j = i + 1;
                let mut body = String::new();
                loop {
                    match t.get(j) {
                        None => return Err("unterminated string literal".into()),
                        Some('\\') if backslash => {
                            body.push('\\');
                            if let Some(n) = t.get(j + 1) {
                                body.push(*n);
                            }
                            j += 2;
                        }
                        Some('\'') if t.get(j + 1) == Some(&'\'') => {
                            body.push_str("''");
                            j += 2;
                        }
                        Some('\'') => break,
                        Some(ch) => {
                            body.push(*ch);
                            j += 1;
                        }
                    }
                }
                if body.contains("%d") {
                    if prefix {
                        return Err(
                            "%d inside an E'' or U&'' string is not supported; use '%d' in a plain string"
                                .into(),
                        );
                    }
                    let pieces: Vec<String> = body
                        .split("%d")
                        .enumerate()
                        .flat_map(|(k, piece)| {
                            let mut v = Vec::new();
                            if k > 0 {
                                v.push(format!("({value})::text"));
                            }
                            if !piece.is_empty() {
                                v.push(format!("'{piece}'"));
                            }
                            v
                        })
                        .collect();
                    out.push('(');
                    out.push_str(&pieces.join(" || "));
                    out.push(')');
                } else {
                    out.push('\'');
                    out.push_str(&body);
                    out.push('\'');
                }
                i = j + 1;
            }
            '"' => {
                let mut j = i + 1;
                loop {
                    match t.get(j) {
                        None => return Err("unterminated quoted identifier".into()),
                        Some('"') if t.get(j + 1) == Some(&'"') => j += 2,
                        Some('"') => break,
                        Some(_) => j += 1,
                    }
                }
                out.extend(&t[i..=j]);
                i = j + 1;
            }
            '$' if i == 0 || !is_ident(t[i - 1]) => {
                if t.get(i + 1).is_some_and(|c| c.is_ascii_digit()) {
                    return Err(
                        "parameters ($1, ...) are not allowed; write %d for the value".into(),
                    );
                }
                // A dollar-quoted string: copied as it is.
                let mut j = i + 1;
                while t.get(j).is_some_and(|c| c.is_alphanumeric() || *c == '_') {
                    j += 1;
                }
                if t.get(j) != Some(&'$') {
                    out.push(c);
                    i += 1;
                    continue;
                }
                let tag: String = t[i..=j].iter().collect();
                let rest: String = t[j + 1..].iter().collect();
                let Some(end) = rest.find(&tag) else {
                    return Err("unterminated dollar-quoted string".into());
                };
                out.push_str(&tag);
                out.push_str(&rest[..end]);
                out.push_str(&tag);
                i = j + 1 + rest[..end].chars().count() + tag.chars().count();
            }
            '-' if t.get(i + 1) == Some(&'-') => {
                while i < t.len() && t[i] != '\n' {
                    out.push(t[i]);
                    i += 1;
                }
            }
            '/' if t.get(i + 1) == Some(&'*') => {
                let rest: String = t[i + 2..].iter().collect();
                let Some(end) = rest.find("*/") else {
                    return Err("unterminated comment".into());
                };
                // Nested comments are not worth the risk.
                if rest[..end].contains("/*") {
                    return Err("nested comments are not supported".into());
                }
                out.push_str("/*");
                out.push_str(&rest[..end]);
                out.push_str("*/");
                i += 2 + rest[..end].chars().count() + 2;
            }
            '%' if t.get(i + 1) == Some(&'d') && !t.get(i + 2).is_some_and(|c| is_ident(*c)) => {
                out.push('(');
                out.push_str(value);
                out.push(')');
                i += 2;
            }
            ';' => return Err("a transform is one expression (no ';')".into()),
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    if out.trim().is_empty() {
        return Err("the transform expression is empty".into());
    }
    Ok(format!("({out}\n)"))
}

/// Replaces the parameters `$n` of statement `sql` for which `with` has an
/// entry (n → SQL), outside quoted identifiers and string literals.
pub fn replace_params(sql: &str, with: &HashMap<usize, String>) -> String {
    let t: Vec<char> = sql.chars().collect();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    while i < t.len() {
        match t[i] {
            q @ ('"' | '\'') => {
                let mut j = i + 1;
                while j < t.len() {
                    if t[j] == q {
                        if t.get(j + 1) == Some(&q) {
                            j += 2;
                            continue;
                        }
                        break;
                    }
                    j += 1;
                }
                let end = j.min(t.len() - 1);
                out.extend(&t[i..=end]);
                i = end + 1;
            }
            '$' if t.get(i + 1).is_some_and(|c| c.is_ascii_digit()) => {
                let mut j = i + 1;
                while t.get(j).is_some_and(|c| c.is_ascii_digit()) {
                    j += 1;
                }
                let digits: String = t[i + 1..j].iter().collect();
                match digits.parse::<usize>().ok().and_then(|n| with.get(&n)) {
                    Some(r) => out.push_str(r),
                    None => out.extend(&t[i..j]),
                }
                i = j;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Type OIDs below this are assigned in the bootstrap catalogs and name the
/// same built-in type on every server (as in `apply::applier`).
const FIRST_NORMAL_OID: u32 = 10000;

/// Whether a resolved type may be the source of a type-wide datatype
/// mapping: a built-in scalar type of the bootstrap catalogs (matched by
/// OID on the source); array and other types are mapped column by column.
pub fn check_global_source_type(t: &TypeTarget) -> Result<(), String> {
    if t.sql.ends_with(']') {
        return Err(format!(
            "type-wide mappings take scalar types; map the array column \"{}\" by srcdb.schema.table.column",
            t.sql
        ));
    }
    if t.oid >= FIRST_NORMAL_OID {
        return Err(format!(
            "type \"{}\" is not one of the bootstrap catalog types; map its columns by srcdb.schema.table.column",
            t.sql
        ));
    }
    Ok(())
}

/// A resolved destination type of a datatype mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeTarget {
    pub oid: u32,
    pub typmod: i32,
    /// This server's `format_type` of it.
    pub sql: String,
}

/// The mappings of one connector, resolved for use.
#[derive(Debug, Clone, Default)]
pub struct Mappings {
    pub srcdb: String,
    tables: HashMap<TableRef, (String, String)>,
    columns: HashMap<(TableRef, String), String>,
    /// Source type OID (built-in types) → destination type.
    types: Vec<(u32, TypeTarget)>,
    column_types: HashMap<(TableRef, String), TypeTarget>,
    transforms: HashMap<(TableRef, String), String>,
}

impl Mappings {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
            && self.columns.is_empty()
            && self.types.is_empty()
            && self.column_types.is_empty()
            && self.transforms.is_empty()
    }

    pub fn add_table(&mut self, t: TableRef, dest: (String, String)) {
        self.tables.insert(t, dest);
    }
    pub fn add_column(&mut self, t: TableRef, col: String, dest: String) {
        self.columns.insert((t, col), dest);
    }
    pub fn add_type(&mut self, src_oid: u32, dest: TypeTarget) {
        self.types.retain(|(o, _)| *o != src_oid);
        self.types.push((src_oid, dest));
    }
    pub fn add_column_type(&mut self, t: TableRef, col: String, dest: TypeTarget) {
        self.column_types.insert((t, col), dest);
    }
    pub fn add_transform(&mut self, t: TableRef, col: String, template: String) {
        self.transforms.insert((t, col), template);
    }

    /// Where source table `t` lands when a table mapping names it.
    pub fn table(&self, t: &TableRef) -> Option<&(String, String)> {
        self.tables.get(t)
    }

    /// The destination schemas named by table mappings.
    pub fn schemas(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tables.values().map(|(s, _)| s.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Where `t` lands: its mapping, else the given default.
    pub fn destination(&self, t: &TableRef, schema: &str, table: &str) -> (String, String) {
        self.tables
            .get(t)
            .cloned()
            .unwrap_or_else(|| (schema.to_string(), table.to_string()))
    }

    pub fn column_name(&self, t: &TableRef, col: &str) -> String {
        self.columns
            .get(&(t.clone(), col.to_string()))
            .cloned()
            .unwrap_or_else(|| col.to_string())
    }

    /// The source column whose destination name is `dest` (the reverse of
    /// `column_name`).
    pub fn source_column(&self, t: &TableRef, dest: &str) -> String {
        self.columns
            .iter()
            .find(|((tt, _), d)| tt == t && d.as_str() == dest)
            .map(|((_, c), _)| c.clone())
            .unwrap_or_else(|| dest.to_string())
    }

    /// The destination type of a source column: its own mapping first, then
    /// one of its (built-in, non-array) source type.
    pub fn column_type(
        &self,
        t: &TableRef,
        col: &str,
        src_oid: Option<u32>,
    ) -> Option<&TypeTarget> {
        if let Some(tt) = self.column_types.get(&(t.clone(), col.to_string())) {
            return Some(tt);
        }
        // Only OIDs of the bootstrap catalogs name the same type on both
        // servers (see `check_global_source_type`).
        let oid = src_oid.filter(|o| *o < FIRST_NORMAL_OID)?;
        self.types.iter().find(|(o, _)| *o == oid).map(|(_, tt)| tt)
    }

    /// An index key or INCLUDE column as the source deparses it, with a
    /// renamed column's destination name (other keys as they are).
    pub fn index_column(&self, t: &TableRef, expr: &str) -> String {
        let quoted = expr.starts_with('"');
        let plain = quoted
            || expr
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
        match split_path(expr) {
            Ok(parts) if plain && parts.len() == 1 => {
                match self.columns.get(&(t.clone(), parts[0].clone())) {
                    Some(d) => format!("\"{}\"", d.replace('"', "\"\"")),
                    None => expr.to_string(),
                }
            }
            _ => expr.to_string(),
        }
    }

    pub fn transform(&self, t: &TableRef, col: &str) -> Option<&str> {
        self.transforms
            .get(&(t.clone(), col.to_string()))
            .map(|s| s.as_str())
    }

    pub fn has_transforms(&self, t: &TableRef) -> bool {
        self.transforms.keys().any(|(tt, _)| tt == t)
    }

    /// A source table's shape as the destination builds it: columns renamed
    /// and retyped (the primary key follows the renames).
    pub fn map_shape(&self, shape: &SourceTable) -> SourceTable {
        let t = &shape.table;
        let mut out = shape.clone();
        for c in out.columns.iter_mut() {
            if c.generated.is_none() {
                let builtin_scalar = match &c.ty {
                    ColumnType::Builtin(s) => !s.ends_with(']'),
                    _ => false,
                };
                let oid = builtin_scalar.then_some(c.type_oid);
                if let Some(tt) = self.column_type(t, &c.name, oid) {
                    c.ty = ColumnType::Builtin(tt.sql.clone());
                    c.type_oid = tt.oid;
                }
            }
            c.name = self.column_name(t, &c.name);
        }
        out.primary_key = shape
            .primary_key
            .iter()
            .map(|k| self.column_name(t, k))
            .collect();
        out
    }

    /// A Relation message as the destination sees it (columns renamed and
    /// retyped), and each column's transform template.
    pub fn map_relation(&self, rel: &Relation) -> (Relation, Vec<Option<String>>) {
        let t = TableRef {
            schema: rel.namespace.clone(),
            table: rel.name.clone(),
        };
        let mut out = rel.clone();
        let mut transforms = Vec::with_capacity(rel.columns.len());
        for c in out.columns.iter_mut() {
            transforms.push(self.transform(&t, &c.name).map(str::to_string));
            if let Some(tt) = self.column_type(&t, &c.name, Some(c.type_oid)) {
                c.type_oid = tt.oid;
                c.type_mod = tt.typmod;
            }
            c.name = self.column_name(&t, &c.name);
        }
        (out, transforms)
    }
}

mod worker;
pub use worker::*;

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(s: &str, t: &str) -> TableRef {
        TableRef {
            schema: s.into(),
            table: t.into(),
        }
    }

    #[test]
    fn objtypes() {
        assert_eq!(ObjType::parse(" Table ").unwrap(), ObjType::Table);
        assert_eq!(ObjType::parse("TRANSFORM").unwrap(), ObjType::Transform);
        assert!(ObjType::parse("notexist").is_err());
        assert!(ObjType::parse("").is_err());
    }

    #[test]
    fn paths() {
        assert_eq!(split_path("Db.S.T").unwrap(), vec!["db", "s", "t"]);
        assert_eq!(
            split_path("db.\"My.Schema\".\"T\"\"x\"").unwrap(),
            vec!["db", "My.Schema", "T\"x"]
        );
        assert_eq!(split_path(" a . b ").unwrap(), vec!["a", "b"]);
        for bad in ["", "a..b", "a.", ".a", "\"a", "a\"b", "a b", "\"\""] {
            assert!(split_path(bad).is_err(), "{bad}");
        }
        assert!(split_path(&"x".repeat(64)).is_err());
        assert_eq!(show_path(&["db", "My.Schema", "t"]), "db.\"My.Schema\".t");
        assert_eq!(show_part("a\"b"), "\"a\"\"b\"");
        assert_eq!(show_part("1a"), "\"1a\"");
    }

    #[test]
    fn sources() {
        let s = parse_source(ObjType::Table, "postgres.public.orders", "postgres").unwrap();
        assert_eq!(s, Source::Table(tr("public", "orders")));
        assert_eq!(s.canonical("postgres"), "postgres.public.orders");
        assert_eq!(
            parse_source(ObjType::Table, "public.orders", "postgres").unwrap(),
            Source::Table(tr("public", "orders"))
        );
        assert!(parse_source(ObjType::Table, "other.public.orders", "postgres").is_err());
        assert!(parse_source(ObjType::Table, "orders", "postgres").is_err());
        assert!(parse_source(ObjType::Table, "a.b.c.d", "postgres").is_err());
        let c = parse_source(ObjType::Column, "postgres.public.orders.Qty", "postgres").unwrap();
        assert_eq!(c, Source::Column(tr("public", "orders"), "qty".into()));
        assert_eq!(c.canonical("postgres"), "postgres.public.orders.qty");
        assert!(parse_source(ObjType::Column, "postgres.public.orders", "postgres").is_err());
        assert!(parse_source(ObjType::Transform, "public.orders", "postgres").is_err());
        assert!(parse_source(ObjType::Column, "public.orders.qty", "postgres").is_err());
        assert_eq!(
            parse_source(ObjType::Datatype, " Character  Varying ", "postgres").unwrap(),
            Source::Type("character varying".into())
        );
        assert_eq!(
            parse_source(ObjType::Datatype, "postgres.public.orders.qty", "postgres").unwrap(),
            Source::Column(tr("public", "orders"), "qty".into())
        );
        assert!(parse_source(ObjType::Datatype, "int|true", "postgres").is_err());
        assert!(parse_source(ObjType::Datatype, "  ", "postgres").is_err());
    }

    #[test]
    fn destinations() {
        assert_eq!(
            parse_table_dest("people").unwrap(),
            ("public".into(), "people".into())
        );
        assert_eq!(
            parse_table_dest("Schema1.People").unwrap(),
            ("schema1".into(), "people".into())
        );
        assert!(parse_table_dest("pg_catalog.x").is_err());
        assert!(parse_table_dest("information_schema.x").is_err());
        assert!(parse_table_dest("a.b.c").is_err());
        assert!(parse_table_dest("").is_err());
        assert_eq!(parse_column_dest("Contact").unwrap(), "contact");
        assert!(parse_column_dest("t.contact").is_err());
        assert_eq!(parse_type_dest("bigint").unwrap(), "bigint");
        assert_eq!(parse_type_dest("bigint|0").unwrap(), "bigint");
        assert_eq!(parse_type_dest("text|-1").unwrap(), "text");
        assert_eq!(parse_type_dest("varchar|20").unwrap(), "varchar(20)");
        assert_eq!(parse_type_dest("numeric(10,2)").unwrap(), "numeric(10,2)");
        assert!(parse_type_dest("varchar(3)|20").is_err());
        assert!(parse_type_dest("varchar|x").is_err());
        assert!(parse_type_dest("varchar|-5").is_err());
        assert!(parse_type_dest("|3").is_err());
    }

    #[test]
    fn transforms_render_with_the_value_as_sql() {
        assert_eq!(render("%d * 100", "$1").unwrap(), "(($1) * 100\n)");
        assert_eq!(
            render("'%d' || '_x'", "$2").unwrap(),
            "((($2)::text) || '_x'\n)"
        );
        assert_eq!(
            render("'>>%d<<'", "s.\"c\"").unwrap(),
            "(('>>' || (s.\"c\")::text || '<<')\n)"
        );
        // Quotes inside literals and identifiers are kept as written.
        assert_eq!(
            render("'it''s %d' || \"%d\"", "$1").unwrap(),
            "(('it''s ' || ($1)::text) || \"%d\"\n)"
        );
        assert_eq!(
            render("case when %d < 500 then 0 else %d end", "$1").unwrap(),
            "(case when ($1) < 500 then 0 else ($1) end\n)"
        );
        // A constant (a mask) is a transform too.
        assert_eq!(render("'***'", "$1").unwrap(), "('***'\n)");
        // Comments cannot swallow the closing parenthesis.
        assert_eq!(render("%d -- c", "$1").unwrap(), "(($1) -- c\n)");
        assert_eq!(render("$$%d$$ || %d", "$1").unwrap(), "($$%d$$ || ($1)\n)");
        assert!(render("E'a\\'%d' || %d", "$1").is_err());
        assert_eq!(
            render("E'a\\'b' || %d", "$1").unwrap(),
            "(E'a\\'b' || ($1)\n)"
        );
        assert!(render("%dx", "$1").unwrap().contains("%dx"));
    }

    #[test]
    fn type_wide_sources_are_scalar_bootstrap_types() {
        let t = |oid: u32, sql: &str| TypeTarget {
            oid,
            typmod: -1,
            sql: sql.into(),
        };
        assert!(check_global_source_type(&t(23, "integer")).is_ok());
        assert!(check_global_source_type(&t(1007, "integer[]")).is_err());
        assert!(check_global_source_type(&t(13000, "information_schema.cardinal_number")).is_err());
    }

    #[test]
    fn malformed_transforms() {
        for bad in [
            "",
            "   ",
            "'abc",
            "\"abc",
            "%d; DROP TABLE x",
            "$1 + 1",
            "$$abc",
            "/* abc",
            "/* /* */ */ %d",
            "U&'%d'",
        ] {
            assert!(render(bad, "$1").is_err(), "{bad}");
        }
    }

    #[test]
    fn params_are_replaced_outside_quotes() {
        let mut w = HashMap::new();
        w.insert(2, "f($2)".to_string());
        w.insert(10, "g".to_string());
        assert_eq!(
            replace_params(
                "INSERT INTO \"s\".\"$2\" (\"a\", \"b\") VALUES ($1, $2) -- '$2' $10 $20",
                &w
            ),
            "INSERT INTO \"s\".\"$2\" (\"a\", \"b\") VALUES ($1, f($2)) -- '$2' g $20"
        );
        assert_eq!(replace_params("\"unterminated $2", &w), "\"unterminated $2");
    }

    #[test]
    fn shapes_and_relations_are_mapped() {
        use crate::source::catalog::SourceColumn;
        use crate::source::decode::RelColumn;
        let t = tr("public", "orders");
        let mut m = Mappings::default();
        m.add_column(t.clone(), "id".into(), "order_id".into());
        m.add_type(
            23,
            TypeTarget {
                oid: 20,
                typmod: -1,
                sql: "bigint".into(),
            },
        );
        m.add_column_type(
            t.clone(),
            "note".into(),
            TypeTarget {
                oid: 1043,
                typmod: 24,
                sql: "character varying(20)".into(),
            },
        );
        m.add_transform(t.clone(), "note".into(), "'%d' || '_x'".into());
        let col = |name: &str, ty: &str, oid: u32| SourceColumn {
            name: name.into(),
            ty: ColumnType::Builtin(ty.into()),
            type_oid: oid,
            not_null: false,
            generated: None,
        };
        let shape = SourceTable {
            table: t.clone(),
            oid: 1,
            columns: vec![
                col("id", "integer", 23),
                col("note", "text", 25),
                col("arr", "integer[]", 23),
            ],
            primary_key: vec!["id".into()],
        };
        let s = m.map_shape(&shape);
        assert_eq!(s.columns[0].name, "order_id");
        assert_eq!(s.columns[0].ty, ColumnType::Builtin("bigint".into()));
        assert_eq!(
            s.columns[1].ty,
            ColumnType::Builtin("character varying(20)".into())
        );
        // Arrays of a mapped type are left alone.
        assert_eq!(s.columns[2].ty, ColumnType::Builtin("integer[]".into()));
        assert_eq!(s.primary_key, vec!["order_id".to_string()]);
        assert_eq!(m.source_column(&t, "order_id"), "id");
        assert_eq!(m.index_column(&t, "id"), "\"order_id\"");
        assert_eq!(m.index_column(&t, "note"), "note");
        assert_eq!(m.index_column(&t, "lower(id)"), "lower(id)");
        assert_eq!(m.index_column(&t, "\"Id\""), "\"Id\"");
        assert_eq!(m.source_column(&t, "note"), "note");
        let rel = Relation {
            id: 1,
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: b'd',
            columns: vec![
                RelColumn {
                    is_key: true,
                    name: "id".into(),
                    type_oid: 23,
                    type_mod: -1,
                },
                RelColumn {
                    is_key: false,
                    name: "note".into(),
                    type_oid: 25,
                    type_mod: -1,
                },
            ],
        };
        let (r, tf) = m.map_relation(&rel);
        assert_eq!(r.columns[0].name, "order_id");
        assert_eq!(r.columns[0].type_oid, 20);
        assert_eq!((r.columns[1].type_oid, r.columns[1].type_mod), (1043, 24));
        assert_eq!(tf, vec![None, Some("'%d' || '_x'".to_string())]);
        assert!(m.has_transforms(&t));
        assert!(!m.has_transforms(&tr("public", "other")));
        assert_eq!(
            m.destination(&t, "postgres", "orders"),
            ("postgres".to_string(), "orders".to_string())
        );
    }
}
