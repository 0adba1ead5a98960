//! The connector definition: what `synchdb_add_conninfo` accepts, how it is
//! validated, how it is stored in `synchdb_conninfo.data`, and the names a
//! connector derives from it (replication slot, publication, origin). Pure
//! logic, no pgrx: covered by plain `#[test]`s.

use serde::{Deserialize, Serialize};

/// PostgreSQL's identifier limit (NAMEDATALEN - 1), in bytes.
pub const MAX_NAME_BYTES: usize = 63;

/// One connector's options, exactly the keys of `synchdb_conninfo.data`.
/// `Debug` is written by hand so the password never reaches a log line.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnInfo {
    pub hostname: String,
    pub port: i32,
    pub user: String,
    pub pwd: String,
    pub srcdb: String,
    pub srcschema: String,
    pub table: String,
    pub snapshottable: String,
    pub connector: String,
    /// An existing source publication to use (created by an admin; the
    /// connector never alters or drops it). Empty: the connector's own,
    /// named after it, which it creates and keeps in step.
    pub publication: String,
    /// A libpq-style password file to read when `pwd` is empty (default
    /// `~/.pgpass` of the server's OS user).
    #[serde(default)]
    pub passfile: String,
    /// TLS to the source, under libpq's names (README, "TLS"): `sslmode`
    /// (empty: `prefer`), the PEM files `sslrootcert`, `sslcert` and
    /// `sslkey` (read when the connector connects), and whether a password
    /// may be sent in cleartext over an unencrypted connection.
    #[serde(default)]
    pub sslmode: String,
    #[serde(default)]
    pub sslrootcert: String,
    #[serde(default)]
    pub sslcert: String,
    #[serde(default)]
    pub sslkey: String,
    #[serde(default)]
    pub allow_cleartext_password: bool,
    /// Write into destination tables owned by roles that are not
    /// superusers (as those roles); refused unless set.
    #[serde(default)]
    pub apply_as_table_owner: bool,
}

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnInfo")
            .field("hostname", &self.hostname)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("pwd", &"********")
            .field("srcdb", &self.srcdb)
            .field("srcschema", &self.srcschema)
            .field("table", &self.table)
            .field("snapshottable", &self.snapshottable)
            .field("connector", &self.connector)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .finish()
    }
}

impl ConnInfo {
    /// Reads the stored jsonb back, naming the key that is missing or mistyped
    /// (users edit `data` by hand with `jsonb_set`).
    pub fn from_json(value: &serde_json::Value) -> Result<ConnInfo, ConfigError> {
        let obj = value
            .as_object()
            .ok_or_else(|| ConfigError::BadStored("data is not a JSON object".into()))?;
        let text = |key: &'static str| -> Result<String, ConfigError> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(String::new()),
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                Some(_) => Err(ConfigError::BadStored(format!(
                    "key \"{key}\" is not a string"
                ))),
            }
        };
        let port = match obj.get("port") {
            Some(serde_json::Value::Number(n)) => n
                .as_i64()
                .and_then(|p| i32::try_from(p).ok())
                .ok_or_else(|| ConfigError::BadStored("key \"port\" is not an integer".into()))?,
            Some(serde_json::Value::String(s)) => s
                .trim()
                .parse::<i32>()
                .map_err(|_| ConfigError::BadStored("key \"port\" is not an integer".into()))?,
            _ => return Err(ConfigError::BadStored("key \"port\" is missing".into())),
        };
        let flag = |key: &'static str| -> Result<bool, ConfigError> {
            let bad = || ConfigError::BadStored(format!("key \"{key}\" is not a boolean"));
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(false),
                Some(serde_json::Value::Bool(b)) => Ok(*b),
                Some(serde_json::Value::String(s)) => {
                    match s.trim().to_ascii_lowercase().as_str() {
                        "true" | "on" | "yes" | "1" => Ok(true),
                        "false" | "off" | "no" | "0" | "" => Ok(false),
                        _ => Err(bad()),
                    }
                }
                Some(_) => Err(bad()),
            }
        };
        let allow_cleartext_password = flag("allow_cleartext_password")?;
        let apply_as_table_owner = flag("apply_as_table_owner")?;
        let info = ConnInfo {
            hostname: text("hostname")?,
            port,
            user: text("user")?,
            pwd: text("pwd")?,
            srcdb: text("srcdb")?,
            srcschema: text("srcschema")?,
            table: text("table")?,
            snapshottable: text("snapshottable")?,
            connector: text("connector")?,
            publication: text("publication")?,
            passfile: text("passfile")?,
            sslmode: text("sslmode")?,
            sslrootcert: text("sslrootcert")?,
            sslcert: text("sslcert")?,
            sslkey: text("sslkey")?,
            allow_cleartext_password,
            apply_as_table_owner,
        };
        Ok(info)
    }

    /// Checks every field as `synchdb_add_conninfo` does; used again at each
    /// start because `data` may have been edited since.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.hostname.trim().is_empty() {
            return Err(ConfigError::Empty("hostname"));
        }
        if !(1..=65535).contains(&self.port) {
            return Err(ConfigError::PortRange(self.port));
        }
        if self.user.trim().is_empty() {
            return Err(ConfigError::Empty("user"));
        }
        if self.srcdb.trim().is_empty() {
            return Err(ConfigError::Empty("srcdb"));
        }
        check_connector(&self.connector)?;
        crate::control::tablelist::parse("table", Some(&self.table), &self.srcdb)?;
        crate::control::tablelist::parse("snapshottable", Some(&self.snapshottable), &self.srcdb)?;
        if is_null_word(Some(&self.table)) {
            if self.srcschema.trim().is_empty() || is_null_word(Some(&self.srcschema)) {
                return Err(ConfigError::Empty("srcschema"));
            }
            parse_ident("srcschema", self.srcschema.trim())?;
        }
        if !self.publication.trim().is_empty() {
            parse_ident("publication", self.publication.trim())?;
        }
        self.tls()?;
        Ok(())
    }

    /// The TLS options of the connector's data, checked: a known `sslmode`,
    /// a root certificate for the verify modes, a key only with a
    /// certificate. The files themselves are read when it connects.
    pub fn tls(&self) -> Result<crate::source::tls::Options, ConfigError> {
        let mode = crate::source::tls::SslMode::parse(&self.sslmode)
            .ok_or_else(|| ConfigError::BadSslMode(self.sslmode.clone()))?;
        let path = |v: &str| {
            if is_null_word(Some(v)) {
                String::new()
            } else {
                v.trim().to_string()
            }
        };
        let opts = crate::source::tls::Options {
            mode,
            rootcert: path(&self.sslrootcert),
            cert: path(&self.sslcert),
            key: path(&self.sslkey),
            allow_cleartext_password: self.allow_cleartext_password,
        };
        if mode.verifies() && opts.rootcert.is_empty() {
            return Err(ConfigError::SslNeedsRoot(mode.as_str()));
        }
        if !opts.key.is_empty() && opts.cert.is_empty() {
            return Err(ConfigError::SslKeyWithoutCert);
        }
        Ok(opts)
    }

    /// The source publication the connector reads: the one named in the
    /// connector's data (an admin's), else its own (`object`).
    pub fn publication_name(&self, object: &str) -> String {
        match self.publication.trim() {
            "" => object.to_string(),
            p => parse_ident("publication", p).unwrap_or_else(|_| p.to_string()),
        }
    }

    /// Whether the publication is the connector's own (created, altered and
    /// dropped by it) rather than one an admin made.
    pub fn owns_publication(&self) -> bool {
        self.publication.trim().is_empty()
    }

    /// The source schema captured when `table` is 'null', folded like an
    /// unquoted identifier unless quoted.
    pub fn source_schema(&self) -> Result<String, ConfigError> {
        parse_ident("srcschema", self.srcschema.trim())
    }

    /// What `table` selects (names and patterns; a `file:` list is read
    /// now), or `None` for "every table of srcschema".
    pub fn tables(&self) -> Result<Option<crate::control::tablelist::Selection>, ConfigError> {
        crate::control::tablelist::parse("table", Some(&self.table), &self.srcdb)
    }

    /// The tables to re-snapshot in mode `always`, or `None` for all.
    pub fn snapshot_tables(
        &self,
    ) -> Result<Option<crate::control::tablelist::Selection>, ConfigError> {
        crate::control::tablelist::parse("snapshottable", Some(&self.snapshottable), &self.srcdb)
    }
}

/// Why a connector definition was rejected. Each variant maps to one SQLSTATE
/// in the SQL layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("connector name must not be empty")]
    NameEmpty,
    #[error("connector name \"{0}\" is too long ({1} bytes, at most 63)")]
    NameTooLong(String, usize),
    #[error("argument \"{0}\" must not be empty")]
    Empty(&'static str),
    #[error("argument \"port\" is {0}, it must be between 1 and 65535")]
    PortRange(i32),
    #[error("connector type \"{0}\" is not supported")]
    Unsupported(String),
    #[error("argument \"{arg}\" has a malformed entry \"{entry}\": {reason}")]
    BadTable {
        arg: &'static str,
        entry: String,
        reason: String,
    },
    #[error("argument \"{arg}\" has a malformed entry \"{entry}\": {reason}")]
    BadRegex {
        arg: &'static str,
        entry: String,
        reason: String,
    },
    #[error("argument \"{arg}\": could not read table list file \"{path}\": {reason}")]
    TableFile {
        arg: &'static str,
        path: String,
        reason: String,
        missing: bool,
    },
    #[error("argument \"{arg}\": table list file \"{path}\" is malformed: {reason}")]
    BadTableFile {
        arg: &'static str,
        path: String,
        reason: String,
    },
    #[error("argument \"{arg}\" is not a valid identifier: {reason}")]
    BadIdent { arg: &'static str, reason: String },
    #[error("snapshot mode \"{0}\" is not valid")]
    BadMode(String),
    #[error("snapshot mode \"{mode}\" does not apply to a PostgreSQL source")]
    ModeNotForPostgres { mode: String, hint: &'static str },
    #[error("stored connector data is malformed: {0}")]
    BadStored(String),
    #[error("sslmode \"{0}\" is not valid")]
    BadSslMode(String),
    #[error("sslmode {0} needs a root certificate (ssl_truststore, or sslrootcert in the connector's data)")]
    SslNeedsRoot(&'static str),
    #[error("sslkey is set but sslcert is not")]
    SslKeyWithoutCert,
}

/// A captured source table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableRef {
    pub schema: String,
    pub table: String,
}

impl std::fmt::Display for TableRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// The snapshot modes of `synchdb_start_engine_bgw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Initial,
    InitialOnly,
    NoData,
    Never,
    Always,
    /// Builds the destination tables without rows, then waits (stage
    /// `schema sync`, state `paused`) for `synchdb_resume_engine`, which
    /// continues as `initial`: copy, then stream.
    SchemaSync,
}

/// SynchDB mode names that mean nothing for a PostgreSQL source, with the
/// hint naming the closest mode.
const NOT_FOR_POSTGRES: &[(&str, &str)] = &[
    (
        "recovery",
        "A PostgreSQL source keeps no schema history to rebuild: the schema is read from the source at every start. Use 'initial' (or 'when_needed') to copy the tables without a complete copy, or 'always' to rebuild every table from the source.",
    ),
    (
        "schema_only_recovery",
        "A PostgreSQL source keeps no schema history to rebuild: the schema is read from the source at every start. Use 'initial' (or 'when_needed') to copy the tables without a complete copy, or 'always' to rebuild every table from the source.",
    ),
    (
        "schema_only",
        "Use 'no_data' (tables created empty, then stream) or 'schemasync' (tables created empty, paused for review, then copied and streamed).",
    ),
];

impl Mode {
    /// Case and surrounding white space are ignored; `when_needed` is
    /// another name for `initial`, which already copies exactly when no
    /// usable position exists (see the README).
    pub fn parse(s: &str) -> Result<Mode, ConfigError> {
        let name = s.trim().to_ascii_lowercase();
        match name.as_str() {
            "initial" | "when_needed" => Ok(Mode::Initial),
            "initial_only" => Ok(Mode::InitialOnly),
            "no_data" => Ok(Mode::NoData),
            "never" => Ok(Mode::Never),
            "always" => Ok(Mode::Always),
            "schemasync" => Ok(Mode::SchemaSync),
            _ => match NOT_FOR_POSTGRES.iter().find(|(n, _)| *n == name) {
                Some((n, hint)) => Err(ConfigError::ModeNotForPostgres {
                    mode: (*n).to_string(),
                    hint,
                }),
                None => Err(ConfigError::BadMode(s.to_string())),
            },
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Initial => "initial",
            Mode::InitialOnly => "initial_only",
            Mode::NoData => "no_data",
            Mode::Never => "never",
            Mode::Always => "always",
            Mode::SchemaSync => "schemasync",
        }
    }

    /// Whether the mode builds destination tables from the source schema.
    pub fn captures_schema(self) -> bool {
        !matches!(self, Mode::Never)
    }

    /// Whether the mode copies existing rows (`schemasync` once resumed).
    pub fn copies_data(self) -> bool {
        matches!(
            self,
            Mode::Initial | Mode::InitialOnly | Mode::Always | Mode::SchemaSync
        )
    }

    /// Whether the mode streams changes after the snapshot.
    pub fn streams(self) -> bool {
        !matches!(self, Mode::InitialOnly)
    }
}

pub const MODES: &str = "initial, initial_only, no_data, never, always, schemasync, when_needed";

/// Checks a connector name: not empty, at most 63 bytes.
pub fn check_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::NameEmpty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(ConfigError::NameTooLong(
            name.chars().take(20).collect::<String>() + "...",
            name.len(),
        ));
    }
    Ok(())
}

/// Only PostgreSQL sources are supported; the other connector types of the
/// original SynchDB are refused by name.
pub fn check_connector(connector: &str) -> Result<(), ConfigError> {
    if connector.trim().eq_ignore_ascii_case("postgres") {
        Ok(())
    } else {
        Err(ConfigError::Unsupported(connector.to_string()))
    }
}

/// `'null'` (any case), empty, or SQL NULL all mean "not given".
pub fn is_null_word(value: Option<&str>) -> bool {
    match value {
        None => true,
        Some(v) => {
            let v = v.trim();
            v.is_empty() || v.eq_ignore_ascii_case("null")
        }
    }
}

/// Splits a dotted name into identifiers, honouring double quotes; unquoted
/// parts fold to lower case as in SQL.
fn split_ident_parts(entry: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = entry.chars().peekable();
    let mut quoted_part = false;
    let mut in_quotes = false;
    while let Some(c) = chars.next() {
        if in_quotes {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    cur.push('"');
                } else {
                    in_quotes = false;
                }
            } else {
                cur.push(c);
            }
            continue;
        }
        match c {
            '"' => {
                if !cur.is_empty() || quoted_part {
                    return Err("a quote in the middle of a name".into());
                }
                in_quotes = true;
                quoted_part = true;
            }
            '.' => {
                if cur.is_empty() {
                    return Err("an empty name part".into());
                }
                parts.push(std::mem::take(&mut cur));
                quoted_part = false;
            }
            c if c.is_whitespace() => return Err("whitespace inside a name (quote it)".into()),
            c => {
                if quoted_part {
                    return Err("characters after a closing quote".into());
                }
                cur.extend(c.to_lowercase());
            }
        }
    }
    if in_quotes {
        return Err("an unterminated quote".into());
    }
    if cur.is_empty() {
        return Err("an empty name part".into());
    }
    parts.push(cur);
    for p in &parts {
        if p.len() > MAX_NAME_BYTES {
            return Err(format!("name \"{p}\" is longer than 63 bytes"));
        }
    }
    Ok(parts)
}

fn parse_ident(arg: &'static str, value: &str) -> Result<String, ConfigError> {
    let parts = split_ident_parts(value).map_err(|reason| ConfigError::BadIdent { arg, reason })?;
    if parts.len() != 1 {
        return Err(ConfigError::BadIdent {
            arg,
            reason: "expected a single name".into(),
        });
    }
    Ok(parts.into_iter().next().unwrap_or_default())
}

/// Parses a comma-separated `schema.table` list (a leading `db.` must equal
/// `srcdb`). `None` means every table of the source schema.
pub fn parse_table_list(
    arg: &'static str,
    value: Option<&str>,
    srcdb: &str,
) -> Result<Option<Vec<TableRef>>, ConfigError> {
    if is_null_word(value) {
        return Ok(None);
    }
    let value = value.unwrap_or_default();
    let mut out: Vec<TableRef> = Vec::new();
    for raw in value.split(',') {
        let entry = raw.trim();
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
        let parts = split_ident_parts(entry).map_err(|r| bad(&r))?;
        let (schema, table) = match parts.as_slice() {
            [s, t] => (s.clone(), t.clone()),
            [d, s, t] => {
                if d != srcdb && !d.eq_ignore_ascii_case(srcdb) {
                    return Err(bad(&format!(
                        "database \"{d}\" is not the source database \"{srcdb}\""
                    )));
                }
                (s.clone(), t.clone())
            }
            [_] => return Err(bad("expected schema.table")),
            _ => return Err(bad("too many dotted parts, expected schema.table")),
        };
        let t = TableRef { schema, table };
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(Some(out))
}

/// Makes a replication slot / publication / origin name from a connector name:
/// `synchdb_` + the name when it only has lower-case letters, digits and
/// underscores; otherwise a sanitised form with a hash suffix, so that two
/// different connector names never share a slot. At most 63 bytes.
pub fn source_object_name(connector: &str) -> String {
    let clean: String = connector
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else if c.is_ascii_uppercase() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let exact = clean == connector;
    let base = format!("synchdb_{clean}");
    if exact && base.len() <= MAX_NAME_BYTES {
        return base;
    }
    let hash = fnv1a(connector.as_bytes());
    let suffix = format!("_{hash:08x}");
    let keep = MAX_NAME_BYTES - suffix.len();
    let mut head: String = base.chars().take(keep).collect();
    head.push_str(&suffix);
    head
}

/// The slot, publication and origin name of a connector in the destination
/// database `db_oid` of the cluster with system identifier `system_id`: a
/// sanitised prefix of the connector name plus one hash of the full name,
/// the system identifier and the database OID, so that connectors of the
/// same name in two destination databases or clusters never share a slot or
/// a publication on their source, nor an origin in their cluster, and two
/// long names never collide through truncation. At most 63 bytes.
pub fn unique_object_name(connector: &str, system_id: u64, db_oid: u32) -> String {
    let mut key = connector.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&system_id.to_le_bytes());
    key.extend_from_slice(&db_oid.to_le_bytes());
    let suffix = format!(
        "_{:08x}{:08x}",
        fnv1a(&key),
        fnv1a_seeded(&key, 0x9e37_79b9)
    );
    let clean: String = connector
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect();
    let keep = MAX_NAME_BYTES - suffix.len() - "synchdb_".len();
    let head: String = clean.chars().take(keep).collect();
    format!("synchdb_{head}{suffix}")
}

/// An 8-hex-digit hash of a name (for derived object names).
pub fn name_hash(name: &str) -> String {
    format!("{:08x}", fnv1a(name.as_bytes()))
}

fn fnv1a(bytes: &[u8]) -> u32 {
    fnv1a_seeded(bytes, 0x811c_9dc5)
}

fn fnv1a_seeded(bytes: &[u8], seed: u32) -> u32 {
    let mut h: u32 = seed;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ConnInfo {
        ConnInfo {
            hostname: "127.0.0.1".into(),
            port: 5432,
            user: "myuser".into(),
            pwd: "mypass".into(),
            srcdb: "postgres".into(),
            srcschema: "public".into(),
            table: "null".into(),
            snapshottable: "null".into(),
            connector: "postgres".into(),
            publication: String::new(),
            passfile: String::new(),
            sslmode: String::new(),
            sslrootcert: String::new(),
            sslcert: String::new(),
            sslkey: String::new(),
            allow_cleartext_password: false,
            apply_as_table_owner: false,
        }
    }

    #[test]
    fn names() {
        assert!(check_name("pgconn").is_ok());
        assert_eq!(check_name(""), Err(ConfigError::NameEmpty));
        assert!(check_name(&"a".repeat(63)).is_ok());
        assert!(matches!(
            check_name(&"a".repeat(64)),
            Err(ConfigError::NameTooLong(_, 64))
        ));
        // multibyte: 32 two-byte characters are 64 bytes
        assert!(check_name(&"é".repeat(32)).is_err());
    }

    #[test]
    fn connectors() {
        assert!(check_connector("postgres").is_ok());
        assert!(check_connector("POSTGRES").is_ok());
        for c in ["mysql", "sqlserver", "oracle", "", "pg"] {
            let e = check_connector(c).unwrap_err();
            assert!(e.to_string().contains("not supported"), "{e}");
        }
    }

    #[test]
    fn table_lists() {
        assert_eq!(parse_table_list("table", None, "postgres"), Ok(None));
        assert_eq!(
            parse_table_list("table", Some("null"), "postgres"),
            Ok(None)
        );
        assert_eq!(
            parse_table_list("table", Some("NULL"), "postgres"),
            Ok(None)
        );
        assert_eq!(parse_table_list("table", Some(" "), "postgres"), Ok(None));
        let got = parse_table_list(
            "table",
            Some("public.orders, postgres.public.Customers"),
            "postgres",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            got,
            vec![
                TableRef {
                    schema: "public".into(),
                    table: "orders".into()
                },
                TableRef {
                    schema: "public".into(),
                    table: "customers".into()
                },
            ]
        );
        let q = parse_table_list("table", Some(r#""My Schema"."Odd""Name""#), "postgres")
            .unwrap()
            .unwrap();
        assert_eq!(q[0].schema, "My Schema");
        assert_eq!(q[0].table, "Odd\"Name");
        // duplicates collapse
        let d = parse_table_list("table", Some("public.a,public.a"), "postgres")
            .unwrap()
            .unwrap();
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn malformed_table_lists() {
        for bad in [
            "public.",
            ".t",
            "a.b.c.d",
            "public.t,,public.u",
            "public.t,",
            "orders",
            "otherdb.public.t",
            "\"unterminated.t",
            "pub lic.t",
            "\"a\"b.t",
            "public..t",
        ] {
            let r = parse_table_list("table", Some(bad), "postgres");
            assert!(
                matches!(r, Err(ConfigError::BadTable { .. })),
                "{bad:?} gave {r:?}"
            );
        }
        let long = format!("public.{}", "x".repeat(64));
        assert!(parse_table_list("table", Some(&long), "postgres").is_err());
    }

    #[test]
    fn modes() {
        assert_eq!(Mode::parse("initial"), Ok(Mode::Initial));
        assert_eq!(Mode::parse("INITIAL_ONLY"), Ok(Mode::InitialOnly));
        assert_eq!(Mode::parse("no_data"), Ok(Mode::NoData));
        assert_eq!(Mode::parse("never"), Ok(Mode::Never));
        assert_eq!(Mode::parse("always"), Ok(Mode::Always));
        assert!(Mode::parse("sometimes").is_err());
        assert!(Mode::parse("").is_err());
        assert!(Mode::Initial.copies_data() && Mode::Initial.streams());
        assert!(!Mode::InitialOnly.streams());
        assert!(!Mode::NoData.copies_data() && Mode::NoData.captures_schema());
        assert!(!Mode::Never.captures_schema());
    }

    #[test]
    fn synchdb_mode_names() {
        // Case and surrounding white space do not matter.
        assert_eq!(Mode::parse("schemasync"), Ok(Mode::SchemaSync));
        assert_eq!(Mode::parse("  SchemaSync\t"), Ok(Mode::SchemaSync));
        assert_eq!(Mode::parse("when_needed"), Ok(Mode::Initial));
        assert_eq!(Mode::parse(" WHEN_NEEDED "), Ok(Mode::Initial));
        assert_eq!(Mode::parse("\nAlways\n"), Ok(Mode::Always));
        // Stored (synchdb_runtime) and passed to the worker by name: the
        // name reads back as the same mode.
        for m in [
            Mode::Initial,
            Mode::InitialOnly,
            Mode::NoData,
            Mode::Never,
            Mode::Always,
            Mode::SchemaSync,
        ] {
            assert_eq!(Mode::parse(m.as_str()), Ok(m));
            assert!(MODES.contains(m.as_str()));
        }
        assert!(MODES.contains("when_needed"));
        let sync = Mode::SchemaSync;
        assert!(sync.captures_schema() && sync.copies_data() && sync.streams());
        // SynchDB names without a meaning for a PostgreSQL source: refused
        // with a hint naming the closest mode.
        for name in ["recovery", " Recovery ", "schema_only_recovery"] {
            match Mode::parse(name) {
                Err(ConfigError::ModeNotForPostgres { mode, hint }) => {
                    assert_eq!(mode, name.trim().to_ascii_lowercase());
                    assert!(hint.contains("'always'") && hint.contains("'initial'"));
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        match Mode::parse("SCHEMA_ONLY") {
            Err(ConfigError::ModeNotForPostgres { mode, hint }) => {
                assert_eq!(mode, "schema_only");
                assert!(hint.contains("'no_data'") && hint.contains("'schemasync'"));
            }
            other => panic!("schema_only: {other:?}"),
        }
        let e = Mode::parse("recovery").unwrap_err().to_string();
        assert_eq!(
            e,
            "snapshot mode \"recovery\" does not apply to a PostgreSQL source"
        );
        // Near misses are not guessed at.
        for bad in [
            "schema sync",
            "schema_sync",
            "whenneeded",
            "when-needed",
            "initial,never",
            "\u{0}",
        ] {
            assert_eq!(Mode::parse(bad), Err(ConfigError::BadMode(bad.to_string())));
        }
    }

    #[test]
    fn validate_fields() {
        assert!(sample().validate().is_ok());
        let mut c = sample();
        c.hostname = " ".into();
        assert_eq!(c.validate(), Err(ConfigError::Empty("hostname")));
        for p in [0, -1, 65536] {
            let mut c = sample();
            c.port = p;
            assert_eq!(c.validate(), Err(ConfigError::PortRange(p)));
        }
        let mut c = sample();
        c.connector = "mysql".into();
        assert!(matches!(c.validate(), Err(ConfigError::Unsupported(_))));
        let mut c = sample();
        c.snapshottable = "x.".into();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::BadTable {
                arg: "snapshottable",
                ..
            })
        ));
        let mut c = sample();
        c.srcschema = "".into();
        assert_eq!(c.validate(), Err(ConfigError::Empty("srcschema")));
    }

    #[test]
    fn json_round_trip_and_edits() {
        let c = sample();
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["port"], serde_json::json!(5432));
        assert_eq!(ConnInfo::from_json(&v).unwrap(), c);
        let mut edited = v.clone();
        edited["snapshottable"] = serde_json::json!("public.customers");
        edited["port"] = serde_json::json!("5433");
        let e = ConnInfo::from_json(&edited).unwrap();
        assert_eq!(e.snapshottable, "public.customers");
        assert_eq!(e.port, 5433);
        let mut broken = v.clone();
        broken["port"] = serde_json::json!([1]);
        assert!(ConnInfo::from_json(&broken).is_err());
        assert!(ConnInfo::from_json(&serde_json::json!("x")).is_err());
        let mut missing = v;
        missing.as_object_mut().unwrap().remove("port");
        assert!(ConnInfo::from_json(&missing).is_err());
    }

    #[test]
    fn tls_options() {
        let c = sample();
        let t = c.tls().expect("defaults");
        assert_eq!(t.mode, crate::source::tls::SslMode::Prefer);
        assert!(!t.allow_cleartext_password);
        let mut v = serde_json::to_value(&c).unwrap();
        v["sslmode"] = serde_json::json!("VERIFY-FULL");
        v["sslrootcert"] = serde_json::json!("/etc/ca.pem");
        v["sslcert"] = serde_json::json!("null");
        v["allow_cleartext_password"] = serde_json::json!("on");
        let e = ConnInfo::from_json(&v).unwrap();
        let t = e.tls().unwrap();
        assert_eq!(t.mode, crate::source::tls::SslMode::VerifyFull);
        assert_eq!(t.rootcert, "/etc/ca.pem");
        assert_eq!(t.cert, "");
        assert!(t.allow_cleartext_password);
        assert!(e.validate().is_ok());
        v["allow_cleartext_password"] = serde_json::json!(1);
        assert!(ConnInfo::from_json(&v).is_err());
        let mut c = sample();
        c.sslmode = "sometimes".into();
        assert_eq!(
            c.validate(),
            Err(ConfigError::BadSslMode("sometimes".into()))
        );
        c.sslmode = "verify-ca".into();
        assert_eq!(c.validate(), Err(ConfigError::SslNeedsRoot("verify-ca")));
        c.sslmode = "require".into();
        c.sslkey = "/k.pem".into();
        assert_eq!(c.validate(), Err(ConfigError::SslKeyWithoutCert));
        // Connectors stored before TLS existed read as prefer.
        let mut old = serde_json::to_value(sample()).unwrap();
        for k in [
            "sslmode",
            "sslrootcert",
            "sslcert",
            "sslkey",
            "allow_cleartext_password",
        ] {
            old.as_object_mut().unwrap().remove(k);
        }
        assert_eq!(ConnInfo::from_json(&old).unwrap(), sample());
    }

    #[test]
    fn debug_hides_password() {
        let shown = format!("{:?}", sample());
        assert!(!shown.contains("mypass"), "{shown}");
    }

    #[test]
    fn object_names() {
        assert_eq!(source_object_name("pgconn"), "synchdb_pgconn");
        let here = unique_object_name("pgconn", 7_300_000_000_000_000_001, 5);
        assert!(here.starts_with("synchdb_pgconn_"));
        assert_ne!(
            here,
            unique_object_name("pgconn", 7_300_000_000_000_000_001, 16384)
        );
        assert_ne!(
            here,
            unique_object_name("pgconn", 7_300_000_000_000_000_002, 5)
        );
        assert_eq!(
            here,
            unique_object_name("pgconn", 7_300_000_000_000_000_001, 5)
        );
        assert!(unique_object_name(&"y".repeat(63), 1, 1).len() <= 63);
        assert_ne!(
            unique_object_name("orders_replication_from_production_cluster_eu_01", 1, 1),
            unique_object_name("orders_replication_from_production_cluster_eu_02", 1, 1)
        );
        assert_ne!(
            unique_object_name("PgConn", 1, 1),
            unique_object_name("pgconn", 1, 1)
        );
        assert_ne!(
            unique_object_name(&"y".repeat(63), 1, 1),
            unique_object_name(&"y".repeat(62), 1, 1)
        );
        let a = source_object_name("PgConn");
        let b = source_object_name("pgconn");
        assert_ne!(a, b);
        let long = source_object_name(&"x".repeat(63));
        assert!(long.len() <= 63);
        assert_ne!(long, source_object_name(&"x".repeat(62)));
        let odd = source_object_name("my conn-1");
        assert!(odd
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
    }
}
