//! SQL text the connector runs in the destination: identifier quoting, the
//! destination names of source tables, CREATE TABLE from a source table's
//! shape, and the INSERT / UPDATE / DELETE statements prepared for apply.
//! Values are never spliced in: statements use `$n` parameters. Pure logic.

use crate::control::conninfo::TableRef;
use std::collections::HashMap;

/// Quotes an identifier unconditionally (always valid, and never confused
/// with a keyword).
pub fn quote_ident(ident: &str) -> String {
    let mut s = String::with_capacity(ident.len() + 2);
    s.push('"');
    for c in ident.chars() {
        if c == '"' {
            s.push('"');
        }
        s.push(c);
    }
    s.push('"');
    s
}

pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// Where each source table lands: `<srcdb>.<table>`, or `<srcdb>.<schema>_<table>`
/// for tables whose name occurs in more than one captured schema.
pub fn destination_names(tables: &[TableRef]) -> HashMap<TableRef, String> {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for t in tables {
        *count.entry(t.table.as_str()).or_default() += 1;
    }
    tables
        .iter()
        .map(|t| {
            let name = if count.get(t.table.as_str()).copied().unwrap_or(0) > 1 {
                format!("{}_{}", t.schema, t.table)
            } else {
                t.table.clone()
            };
            (t.clone(), name)
        })
        .collect()
}

/// A destination column to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDef {
    pub name: String,
    pub type_sql: String,
    pub not_null: bool,
    /// Expression of a stored generated column (computed in the destination).
    pub generated: Option<String>,
}

/// A string literal, quoted for SQL with standard_conforming_strings on.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub fn create_enum(schema: &str, name: &str, labels: &[String]) -> String {
    let l: Vec<String> = labels.iter().map(|x| quote_literal(x)).collect();
    format!(
        "CREATE TYPE {} AS ENUM ({})",
        qualified(schema, name),
        l.join(", ")
    )
}

pub fn create_composite(schema: &str, name: &str, attrs: &[(String, String)]) -> String {
    let a: Vec<String> = attrs
        .iter()
        .map(|(n, t)| format!("{} {t}", quote_ident(n)))
        .collect();
    format!(
        "CREATE TYPE {} AS ({})",
        qualified(schema, name),
        a.join(", ")
    )
}

pub fn create_domain(
    schema: &str,
    name: &str,
    base: &str,
    not_null: bool,
    checks: &[String],
) -> String {
    let mut s = format!("CREATE DOMAIN {} AS {base}", qualified(schema, name));
    if not_null {
        s.push_str(" NOT NULL");
    }
    for c in checks {
        s.push(' ');
        s.push_str(c);
    }
    s
}

pub fn create_range(schema: &str, name: &str, subtype: &str, multirange: Option<&str>) -> String {
    let mut s = format!(
        "CREATE TYPE {} AS RANGE (subtype = {subtype}",
        qualified(schema, name)
    );
    if let Some(m) = multirange {
        s.push_str(&format!(
            ", multirange_type_name = {}",
            qualified(schema, m)
        ));
    }
    s.push(')');
    s
}

/// A type name with `dims` array dimensions.
pub fn with_dims(base: &str, dims: usize) -> String {
    let mut s = base.to_string();
    for _ in 0..dims {
        s.push_str("[]");
    }
    s
}

pub fn add_primary_key(schema: &str, table: &str, pk: &[String]) -> String {
    let keys: Vec<String> = pk.iter().map(|k| quote_ident(k)).collect();
    format!(
        "ALTER TABLE {} ADD PRIMARY KEY ({})",
        qualified(schema, table),
        keys.join(", ")
    )
}

pub fn create_table(schema: &str, table: &str, cols: &[ColumnDef], pk: &[String]) -> String {
    let mut parts: Vec<String> = cols
        .iter()
        .map(|c| {
            let mut d = format!("{} {}", quote_ident(&c.name), c.type_sql);
            if c.not_null {
                d.push_str(" NOT NULL");
            }
            if let Some(g) = &c.generated {
                d.push_str(&format!(" GENERATED ALWAYS AS ({g}) STORED"));
            }
            d
        })
        .collect();
    if !pk.is_empty() {
        let keys: Vec<String> = pk.iter().map(|k| quote_ident(k)).collect();
        parts.push(format!("PRIMARY KEY ({})", keys.join(", ")));
    }
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({})",
        qualified(schema, table),
        parts.join(", ")
    )
}

pub fn insert(schema: &str, table: &str, cols: &[&str]) -> String {
    let names: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
    let params: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
    format!(
        "INSERT INTO {} ({}) VALUES ({})",
        qualified(schema, table),
        names.join(", "),
        params.join(", ")
    )
}

/// How rows are found for UPDATE and DELETE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMatch {
    /// Key columns with `=` (primary key or replica identity index).
    Key,
    /// The whole old row (REPLICA IDENTITY FULL): one matching row at a time,
    /// `IS NOT DISTINCT FROM` so NULLs match, as native replication does.
    Full,
}

/// `by_text[i]`: compare key column `i` through its text form, for types
/// without a default equality operator (json, xml, point, ...), whose `=`
/// is missing or means something else (box compares areas).
fn where_clause(key_cols: &[&str], by_text: &[bool], first_param: usize, how: KeyMatch) -> String {
    let op = match how {
        KeyMatch::Key => "=",
        KeyMatch::Full => "IS NOT DISTINCT FROM",
    };
    key_cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if by_text.get(i).copied().unwrap_or(false) {
                format!("{}::text {op} ${}::text", quote_ident(c), first_param + i)
            } else {
                format!("{} {op} ${}", quote_ident(c), first_param + i)
            }
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// `UPDATE ... SET set_cols = $1.. WHERE key = $k..`: parameters are the set
/// values first, then the key values.
pub fn update(
    schema: &str,
    table: &str,
    set_cols: &[&str],
    key_cols: &[&str],
    by_text: &[bool],
    how: KeyMatch,
) -> String {
    let sets: Vec<String> = set_cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = ${}", quote_ident(c), i + 1))
        .collect();
    let target = qualified(schema, table);
    let cond = where_clause(key_cols, by_text, set_cols.len() + 1, how);
    match how {
        KeyMatch::Key => format!("UPDATE {target} SET {} WHERE {cond}", sets.join(", ")),
        KeyMatch::Full => format!(
            "UPDATE {target} SET {} WHERE ctid = (SELECT ctid FROM {target} WHERE {cond} LIMIT 1)",
            sets.join(", ")
        ),
    }
}

pub fn delete(
    schema: &str,
    table: &str,
    key_cols: &[&str],
    by_text: &[bool],
    how: KeyMatch,
) -> String {
    let target = qualified(schema, table);
    let cond = where_clause(key_cols, by_text, 1, how);
    match how {
        KeyMatch::Key => format!("DELETE FROM {target} WHERE {cond}"),
        KeyMatch::Full => format!(
            "DELETE FROM {target} WHERE ctid = (SELECT ctid FROM {target} WHERE {cond} LIMIT 1)"
        ),
    }
}

pub fn truncate(targets: &[(String, String)], restart_identity: bool) -> String {
    let names: Vec<String> = targets.iter().map(|(s, t)| qualified(s, t)).collect();
    format!(
        "TRUNCATE TABLE {}{}",
        names.join(", "),
        if restart_identity {
            " RESTART IDENTITY"
        } else {
            ""
        }
    )
}

/// The source query of a snapshot copy: only stored (not generated) columns.
pub fn copy_out(schema: &str, table: &str, cols: &[&str]) -> String {
    let names: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
    format!(
        "COPY (SELECT {} FROM {}) TO STDOUT",
        names.join(", "),
        qualified(schema, table)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str, n: &str) -> TableRef {
        TableRef {
            schema: s.into(),
            table: n.into(),
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("orders"), "\"orders\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_ident("select"), "\"select\"");
        assert_eq!(qualified("My Schema", "t"), "\"My Schema\".\"t\"");
    }

    #[test]
    fn names_collide_only_when_needed() {
        let m = destination_names(&[
            t("public", "orders"),
            t("sales", "orders"),
            t("public", "items"),
        ]);
        assert_eq!(m[&t("public", "orders")], "public_orders");
        assert_eq!(m[&t("sales", "orders")], "sales_orders");
        assert_eq!(m[&t("public", "items")], "items");
    }

    #[test]
    fn ddl() {
        let cols = vec![
            ColumnDef {
                name: "id".into(),
                type_sql: "integer".into(),
                not_null: true,
                generated: None,
            },
            ColumnDef {
                name: "Note".into(),
                type_sql: "character varying(20)".into(),
                not_null: false,
                generated: Some("upper(\"x\")".into()),
            },
        ];
        assert_eq!(
            create_table("postgres", "orders", &cols, &["id".into()]),
            "CREATE TABLE IF NOT EXISTS \"postgres\".\"orders\" (\"id\" integer NOT NULL, \"Note\" character varying(20) GENERATED ALWAYS AS (upper(\"x\")) STORED, PRIMARY KEY (\"id\"))"
        );
        assert!(!create_table("s", "t", &cols, &[]).contains("PRIMARY KEY"));
    }

    #[test]
    fn dml() {
        assert_eq!(
            insert("s", "t", &["a", "b"]),
            "INSERT INTO \"s\".\"t\" (\"a\", \"b\") VALUES ($1, $2)"
        );
        assert_eq!(
            update("s", "t", &["b"], &["a"], &[], KeyMatch::Key),
            "UPDATE \"s\".\"t\" SET \"b\" = $1 WHERE \"a\" = $2"
        );
        assert_eq!(
            update("s", "t", &["b", "c"], &["a", "b"], &[false, false], KeyMatch::Full),
            "UPDATE \"s\".\"t\" SET \"b\" = $1, \"c\" = $2 WHERE ctid = (SELECT ctid FROM \"s\".\"t\" WHERE \"a\" IS NOT DISTINCT FROM $3 AND \"b\" IS NOT DISTINCT FROM $4 LIMIT 1)"
        );
        assert_eq!(
            delete("s", "t", &["a"], &[], KeyMatch::Key),
            "DELETE FROM \"s\".\"t\" WHERE \"a\" = $1"
        );
        assert_eq!(
            truncate(&[("s".into(), "a".into()), ("s".into(), "b".into())], true),
            "TRUNCATE TABLE \"s\".\"a\", \"s\".\"b\" RESTART IDENTITY"
        );
        assert_eq!(
            copy_out("public", "x", &["a"]),
            "COPY (SELECT \"a\" FROM \"public\".\"x\") TO STDOUT"
        );
    }

    #[test]
    fn type_ddl() {
        assert_eq!(
            create_enum("postgres", "mood", &["sad".into(), "it's ok".into()]),
            "CREATE TYPE \"postgres\".\"mood\" AS ENUM ('sad', 'it''s ok')"
        );
        assert_eq!(
            create_composite(
                "s",
                "pt",
                &[
                    ("x".into(), "integer".into()),
                    ("Tag".into(), "text[]".into())
                ]
            ),
            "CREATE TYPE \"s\".\"pt\" AS (\"x\" integer, \"Tag\" text[])"
        );
        assert_eq!(
            create_domain("s", "pos", "integer", true, &["CHECK ((VALUE > 0))".into()]),
            "CREATE DOMAIN \"s\".\"pos\" AS integer NOT NULL CHECK ((VALUE > 0))"
        );
        assert_eq!(
            create_range("s", "fr", "double precision", None),
            "CREATE TYPE \"s\".\"fr\" AS RANGE (subtype = double precision)"
        );
        assert_eq!(
            create_range("s", "fr", "double precision", Some("frm")),
            "CREATE TYPE \"s\".\"fr\" AS RANGE (subtype = double precision, multirange_type_name = \"s\".\"frm\")"
        );
        assert_eq!(with_dims("\"s\".\"t\"", 2), "\"s\".\"t\"[][]");
        assert_eq!(
            add_primary_key("s", "t", &["a".into(), "b".into()]),
            "ALTER TABLE \"s\".\"t\" ADD PRIMARY KEY (\"a\", \"b\")"
        );
    }
}
