//! Table lists as SynchDB writes them: the `table` and `snapshottable`
//! arguments of a connector as a comma-separated list whose entries are
//! plain names (`schema.table`, `db.schema.table`, quoted names) or
//! Debezium-style regular expressions (`public\.order.*`, matched against the
//! whole `schema.table` name), or `file:/path/list.json` naming a JSON file
//! with `{"table_list": [...]}` (for `table`) and `{"snapshot_table_list":
//! [...]}` (for `snapshottable`). Parsing, reading the file and matching;
//! pure logic, no pgrx.
//!
//! How an entry is told apart: an entry with a double quote, or made only
//! of identifier characters (letters, digits, `_`, `$`) and dots, is a name
//! (parsed as before, unquoted parts fold to lower case); anything else is
//! a regular expression, anchored at both ends and matched case-sensitively
//! against `schema.table` as the source spells it. Whitespace is refused in
//! both (quote a name, write `\s` in a pattern), and a pattern cannot hold a
//! comma (the list separator).

use crate::control::conninfo::{self, ConfigError, TableRef};

/// Upper bound of a compiled pattern (bytes of the regex program): a list
/// entry is a short name pattern, never a large program.
const PATTERN_SIZE_LIMIT_BYTES: usize = 1 << 20;

/// Upper bound of a table list file: lists of tables, not data.
const LIST_FILE_LIMIT_BYTES: u64 = 16 << 20;

/// A Debezium include-list regular expression.
#[derive(Debug, Clone)]
pub struct Pattern {
    /// As written in the list.
    pub source: String,
    re: regex::Regex,
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.source == other.source
    }
}

impl Pattern {
    /// Compiles `source` anchored at both ends (a full match, as Debezium
    /// matches include lists).
    pub fn new(source: &str) -> Result<Pattern, String> {
        let re = regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(PATTERN_SIZE_LIMIT_BYTES)
            .build()
            .map_err(|e| match e {
                regex::Error::Syntax(s) => {
                    // The crate's message is multi-line with a caret
                    // diagram; its last line says what is wrong.
                    let last = s
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or("syntax error");
                    format!("invalid regular expression ({})", last.trim())
                }
                regex::Error::CompiledTooBig(_) => "regular expression is too large".to_string(),
                _ => "invalid regular expression".to_string(),
            })?;
        Ok(Pattern {
            source: source.to_string(),
            re,
        })
    }

    /// Whether the pattern matches the whole `schema.table` name of `t`.
    pub fn matches(&self, t: &TableRef) -> bool {
        self.re.is_match(&format!("{}.{}", t.schema, t.table))
    }
}

/// What a table list selects: names given one by one and patterns.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Selection {
    pub names: Vec<TableRef>,
    pub patterns: Vec<Pattern>,
}

impl Selection {
    /// Whether tables created later may join (the list has patterns).
    pub fn has_patterns(&self) -> bool {
        !self.patterns.is_empty()
    }

    /// Whether table `t` is selected.
    pub fn matches(&self, t: &TableRef) -> bool {
        self.names.contains(t) || self.patterns.iter().any(|p| p.matches(t))
    }

    /// The selected tables among `existing` (the source's tables): every
    /// name (whether it exists or not, the caller checks), then each
    /// existing table a pattern matches, in the order of `existing`, each
    /// once.
    pub fn resolve(&self, existing: &[TableRef]) -> Vec<TableRef> {
        let mut out = self.names.clone();
        for t in existing {
            if !out.contains(t) && self.patterns.iter().any(|p| p.matches(t)) {
                out.push(t.clone());
            }
        }
        out
    }
}

/// Whether a list entry is a name (else a regular expression).
pub fn is_plain_name(entry: &str) -> bool {
    entry.contains('"')
        || entry
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == '.')
}

/// The JSON key of a list file that feeds argument `arg`.
pub fn file_key(arg: &str) -> &'static str {
    if arg == "snapshottable" {
        "snapshot_table_list"
    } else {
        "table_list"
    }
}

/// The path of a `file:` list, or None for an inline list.
pub fn file_path(value: &str) -> Option<&str> {
    value.trim().strip_prefix("file:")
}

/// Parses argument `arg` (`table` or `snapshottable`): `None` for
/// 'null' / empty (every table), else what it selects. A `file:` list is
/// read now.
pub fn parse(
    arg: &'static str,
    value: Option<&str>,
    srcdb: &str,
) -> Result<Option<Selection>, ConfigError> {
    if conninfo::is_null_word(value) {
        return Ok(None);
    }
    let value = value.unwrap_or_default();
    match file_path(value) {
        Some(path) => {
            let text = read_list_file(arg, path)?;
            let entries = entries_of_file(arg, path, &text)?;
            let mut sel = Selection::default();
            for e in &entries {
                add_entry(&mut sel, arg, e.trim(), srcdb)?;
            }
            Ok(Some(sel))
        }
        None => {
            let mut sel = Selection::default();
            for raw in value.split(',') {
                add_entry(&mut sel, arg, raw.trim(), srcdb)?;
            }
            Ok(Some(sel))
        }
    }
}

fn add_entry(
    sel: &mut Selection,
    arg: &'static str,
    entry: &str,
    srcdb: &str,
) -> Result<(), ConfigError> {
    let bad = |reason: &str| ConfigError::BadTable {
        arg,
        entry: entry.to_string(),
        reason: reason.to_string(),
    };
    if entry.is_empty() {
        return Err(bad(
            "an empty entry (two commas in a row, or a trailing comma)",
        ));
    }
    if is_plain_name(entry) || entry.chars().any(char::is_whitespace) {
        // The name parser gives the reasons (whitespace: quote it).
        let one = conninfo::parse_table_list(arg, Some(entry), srcdb)?;
        for t in one.unwrap_or_default() {
            if !sel.names.contains(&t) {
                sel.names.push(t);
            }
        }
        return Ok(());
    }
    let p = Pattern::new(entry).map_err(|reason| ConfigError::BadRegex {
        arg,
        entry: entry.chars().take(200).collect(),
        reason,
    })?;
    if !sel.patterns.contains(&p) {
        sel.patterns.push(p);
    }
    Ok(())
}

/// Reads a list file, naming it in the error when it cannot be read.
fn read_list_file(arg: &'static str, path: &str) -> Result<String, ConfigError> {
    let err = |missing: bool, reason: String| ConfigError::TableFile {
        arg,
        path: path.to_string(),
        reason,
        missing,
    };
    if path.trim().is_empty() {
        return Err(err(true, "no file name after \"file:\"".into()));
    }
    let meta = std::fs::metadata(path)
        .map_err(|e| err(e.kind() == std::io::ErrorKind::NotFound, io_reason(&e)))?;
    if !meta.is_file() {
        return Err(err(false, "it is not a regular file".into()));
    }
    if meta.len() > LIST_FILE_LIMIT_BYTES {
        return Err(err(
            false,
            format!("it is larger than {} MB", LIST_FILE_LIMIT_BYTES >> 20),
        ));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| err(e.kind() == std::io::ErrorKind::NotFound, io_reason(&e)))?;
    String::from_utf8(bytes).map_err(|_| ConfigError::BadTableFile {
        arg,
        path: path.to_string(),
        reason: "it is not UTF-8 text".into(),
    })
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// The entries of a list file's key for `arg`: a JSON object whose key
/// holds an array of strings.
pub fn entries_of_file(
    arg: &'static str,
    path: &str,
    text: &str,
) -> Result<Vec<String>, ConfigError> {
    let bad = |reason: String| ConfigError::BadTableFile {
        arg,
        path: path.to_string(),
        reason,
    };
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        bad(format!(
            "it is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let obj = value
        .as_object()
        .ok_or_else(|| bad("it is not a JSON object".into()))?;
    let key = file_key(arg);
    let list = match obj.get(key) {
        Some(serde_json::Value::Array(a)) => a,
        Some(_) => return Err(bad(format!("\"{key}\" is not an array"))),
        None => return Err(bad(format!("it has no \"{key}\" array"))),
    };
    if list.is_empty() {
        return Err(bad(format!("\"{key}\" is empty")));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| match v {
            serde_json::Value::String(s) => Ok(s.clone()),
            _ => Err(bad(format!(
                "element {} of \"{key}\" is not a string",
                i + 1
            ))),
        })
        .collect()
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

    fn sel(v: &str) -> Selection {
        parse("table", Some(v), "postgres").unwrap().unwrap()
    }

    #[test]
    fn names_and_patterns_told_apart() {
        assert!(is_plain_name("public.orders"));
        assert!(is_plain_name("postgres.public.orders"));
        assert!(is_plain_name("\"My Schema\".t"));
        assert!(is_plain_name("s$1.t_2"));
        assert!(!is_plain_name(r"public\.order.*"));
        assert!(!is_plain_name("public.order_[0-9]+"));
        assert!(!is_plain_name("(public|sales)\\.t"));
        let s = sel(r"public.customers, public\.order.*");
        assert_eq!(s.names, vec![t("public", "customers")]);
        assert_eq!(s.patterns.len(), 1);
        assert_eq!(s.patterns[0].source, r"public\.order.*");
        assert!(s.has_patterns());
        assert!(!sel("public.a").has_patterns());
    }

    #[test]
    fn patterns_match_the_whole_name() {
        let s = sel(r"public\.order.*");
        assert!(s.matches(&t("public", "orders")));
        assert!(s.matches(&t("public", "order_items")));
        assert!(!s.matches(&t("public", "customers")));
        // Anchored: neither a prefix nor a suffix is enough.
        assert!(!s.matches(&t("xpublic", "orders")));
        assert!(!s.matches(&t("public", "reorders")));
        let s = sel(r"public\.order");
        assert!(s.matches(&t("public", "order")));
        assert!(!s.matches(&t("public", "orders")));
        // An alternation is anchored as a whole.
        let s = sel(r"public\.a|sales\.b");
        assert!(s.matches(&t("public", "a")));
        assert!(s.matches(&t("sales", "b")));
        assert!(!s.matches(&t("public", "ab")));
        assert!(!s.matches(&t("sales", "bb")));
        // Case-sensitive, as the source spells names.
        let s = sel(r"public\.Order.*");
        assert!(!s.matches(&t("public", "orders")));
        assert!(s.matches(&t("public", "Orders")));
    }

    #[test]
    fn resolve_against_existing_tables() {
        let s = sel(r"public.customers,public\.order.*");
        let existing = vec![
            t("public", "customers"),
            t("public", "order_items"),
            t("public", "orders"),
            t("public", "products"),
            t("sales", "orders"),
        ];
        assert_eq!(
            s.resolve(&existing),
            vec![
                t("public", "customers"),
                t("public", "order_items"),
                t("public", "orders")
            ]
        );
        // Names are kept even when missing (the caller reports them).
        let s = sel("public.gone");
        assert_eq!(s.resolve(&existing), vec![t("public", "gone")]);
    }

    #[test]
    fn malformed_entries() {
        for bad in [r"public\.order(", "public.[a-", r"x{2,1}", r"\p{Nope}"] {
            let r = parse("table", Some(bad), "postgres");
            assert!(
                matches!(r, Err(ConfigError::BadRegex { arg: "table", .. })),
                "{bad:?} gave {r:?}"
            );
        }
        // A comma splits the list: {1,3} leaves a broken pattern.
        assert!(matches!(
            parse("table", Some(r"public\.t{1,3}"), "postgres"),
            Err(ConfigError::BadRegex { .. })
        ));
        // Whitespace is refused in a pattern as in a name.
        assert!(matches!(
            parse("table", Some(r"public\.a b.*"), "postgres"),
            Err(ConfigError::BadTable { .. })
        ));
        for bad in ["public.", "orders", "public.t,,x\\..*", "x\\..*,"] {
            assert!(
                matches!(
                    parse("table", Some(bad), "postgres"),
                    Err(ConfigError::BadTable { .. })
                ),
                "{bad:?}"
            );
        }
        let e = parse("snapshottable", Some("(a"), "postgres").unwrap_err();
        assert!(e.to_string().contains("snapshottable"), "{e}");
        assert!(e.to_string().contains("regular expression"), "{e}");
    }

    #[test]
    fn null_means_everything() {
        assert_eq!(parse("table", None, "postgres"), Ok(None));
        assert_eq!(parse("table", Some("NULL"), "postgres"), Ok(None));
        assert_eq!(parse("table", Some(" "), "postgres"), Ok(None));
    }

    #[test]
    fn file_contents() {
        let ok =
            r#"{"table_list": ["public.a", "public\\.b.*"], "snapshot_table_list": ["public.a"]}"#;
        assert_eq!(
            entries_of_file("table", "/f", ok).unwrap(),
            vec!["public.a".to_string(), r"public\.b.*".to_string()]
        );
        assert_eq!(
            entries_of_file("snapshottable", "/f", ok).unwrap(),
            vec!["public.a".to_string()]
        );
        for (text, why) in [
            ("", "not valid JSON"),
            ("{\"table_list\": [", "not valid JSON"),
            ("[\"public.a\"]", "not a JSON object"),
            ("{}", "no \"table_list\""),
            ("{\"table_list\": \"public.a\"}", "not an array"),
            ("{\"table_list\": []}", "is empty"),
            ("{\"table_list\": [\"public.a\", 3]}", "element 2"),
        ] {
            let e = entries_of_file("table", "/f", text).unwrap_err();
            assert!(
                matches!(e, ConfigError::BadTableFile { .. }) && e.to_string().contains(why),
                "{text:?}: {e}"
            );
        }
        let e = entries_of_file("snapshottable", "/f", "{\"table_list\": [\"a.b\"]}").unwrap_err();
        assert!(e.to_string().contains("snapshot_table_list"), "{e}");
    }

    #[test]
    fn files_read_from_disk() {
        let dir = std::env::temp_dir().join(format!("synchdb-tablelist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("list.json");
        std::fs::write(
            &good,
            r#"{"table_list": ["public.a", "public\\.b.*"], "snapshot_table_list": ["public.a"]}"#,
        )
        .unwrap();
        let v = format!("file:{}", good.display());
        let s = parse("table", Some(&v), "postgres").unwrap().unwrap();
        assert_eq!(s.names, vec![t("public", "a")]);
        assert_eq!(s.patterns.len(), 1);
        let s = parse("snapshottable", Some(&v), "postgres")
            .unwrap()
            .unwrap();
        assert_eq!(s.names, vec![t("public", "a")]);
        assert!(!s.has_patterns());
        let missing = format!("file:{}", dir.join("nope.json").display());
        assert!(matches!(
            parse("table", Some(&missing), "postgres"),
            Err(ConfigError::TableFile { missing: true, .. })
        ));
        assert!(matches!(
            parse("table", Some("file:"), "postgres"),
            Err(ConfigError::TableFile { .. })
        ));
        let is_dir = format!("file:{}", dir.display());
        assert!(matches!(
            parse("table", Some(&is_dir), "postgres"),
            Err(ConfigError::TableFile { missing: false, .. })
        ));
        let broken = dir.join("broken.json");
        std::fs::write(&broken, "{\"table_list\": [\"(a\"]}").unwrap();
        assert!(matches!(
            parse(
                "table",
                Some(&format!("file:{}", broken.display())),
                "postgres"
            ),
            Err(ConfigError::BadRegex { .. })
        ));
        std::fs::write(&broken, [0xff, 0xfe]).unwrap();
        assert!(matches!(
            parse(
                "table",
                Some(&format!("file:{}", broken.display())),
                "postgres"
            ),
            Err(ConfigError::BadTableFile { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
