//! SynchDB's smaller conventions, as pure logic: the operation letters of
//! `synchdb.skipped_operations` (SynchDB's `synchdb.dbz_skipped_oeprations`)
//! and the offsets `synchdb_set_offset` accepts (`X/Y`, an integer, or the
//! JSON `last_dbz_offset` shows). No pgrx: covered by plain `#[test]`s.

/// Operation kinds as bits of a skip mask.
pub const SKIP_INSERT: u8 = 1;
pub const SKIP_UPDATE: u8 = 2;
pub const SKIP_DELETE: u8 = 4;
pub const SKIP_TRUNCATE: u8 = 8;

/// Parses a comma-separated list of SynchDB's (Debezium's) operation
/// letters: `c` create/insert, `u` update, `d` delete, `t` truncate; empty
/// or `none` skips nothing. Case and spaces are ignored.
pub fn parse_skipped_operations(value: &str) -> Result<u8, String> {
    let value = value.trim();
    if value.is_empty() || value.eq_ignore_ascii_case("none") {
        return Ok(0);
    }
    let mut mask = 0u8;
    for raw in value.split(',') {
        let item = raw.trim().to_ascii_lowercase();
        mask |= match item.as_str() {
            "c" => SKIP_INSERT,
            "u" => SKIP_UPDATE,
            "d" => SKIP_DELETE,
            "t" => SKIP_TRUNCATE,
            "" => return Err("an empty entry in the list".into()),
            other => {
                return Err(format!(
                    "\"{}\" is not an operation letter (c = insert, u = update, d = delete, t = truncate)",
                    other.chars().take(20).collect::<String>()
                ))
            }
        };
    }
    Ok(mask)
}

/// The skip bit of a change kind as the applier names it.
pub fn skip_bit(kind: &str) -> u8 {
    match kind {
        "INSERT" => SKIP_INSERT,
        "UPDATE" => SKIP_UPDATE,
        "DELETE" => SKIP_DELETE,
        "TRUNCATE" => SKIP_TRUNCATE,
        _ => 0,
    }
}

/// Reads an offset for `synchdb_set_offset`: `X/Y`, a decimal integer, or
/// the JSON object of `last_dbz_offset`, whose `lsn` is taken: the end of
/// the last applied commit, the position a replication origin stores.
/// Streaming from it starts with the next transaction (exactly once);
/// `lsn_commit` (where that commit record begins) would apply the last
/// transaction again, and `lsn_proc` is a change inside it.
pub fn parse_offset(value: &str) -> Result<u64, String> {
    let value = value.trim();
    if !value.starts_with('{') {
        return crate::lsn::parse_lsn(value).map_err(|e| e.to_string());
    }
    let v: serde_json::Value = serde_json::from_str(value).map_err(|e| {
        format!(
            "it is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    let obj = v
        .as_object()
        .ok_or_else(|| "it is not a JSON object".to_string())?;
    match obj.get("lsn") {
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| "\"lsn\" is not a non-negative integer".to_string()),
        Some(serde_json::Value::String(s)) => {
            crate::lsn::parse_lsn(s.trim()).map_err(|e| format!("\"lsn\": {e}"))
        }
        Some(_) => Err("\"lsn\" is not an integer".into()),
        None => Err("it has no \"lsn\" key".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_operations() {
        assert_eq!(parse_skipped_operations(""), Ok(0));
        assert_eq!(parse_skipped_operations("  "), Ok(0));
        assert_eq!(parse_skipped_operations("none"), Ok(0));
        assert_eq!(parse_skipped_operations("t"), Ok(SKIP_TRUNCATE));
        assert_eq!(
            parse_skipped_operations("c, U,d ,t"),
            Ok(SKIP_INSERT | SKIP_UPDATE | SKIP_DELETE | SKIP_TRUNCATE)
        );
        assert_eq!(parse_skipped_operations("d,d"), Ok(SKIP_DELETE));
        for bad in ["x", "c,,u", "c,", "insert", "cu", "r"] {
            assert!(parse_skipped_operations(bad).is_err(), "{bad:?}");
        }
        assert_eq!(skip_bit("TRUNCATE"), SKIP_TRUNCATE);
        assert_eq!(skip_bit("INSERT"), SKIP_INSERT);
        assert_eq!(skip_bit("BEGIN"), 0);
    }

    #[test]
    fn offsets() {
        assert_eq!(parse_offset("0/1A2B3C4"), Ok(0x1A2B3C4));
        assert_eq!(parse_offset("37051152"), Ok(37051152));
        let shown = r#"{"lsn_proc":37051152,"messageType":"INSERT","lsn_commit":36989040,"lsn":37051200,"txId":1007,"ts_usec":1767208115470483}"#;
        assert_eq!(parse_offset(shown), Ok(37051200));
        assert_eq!(parse_offset(r#" {"lsn":"0/10"} "#), Ok(16));
        assert_eq!(
            parse_offset(r#"{"lsn_proc":5,"lsn_commit":5,"lsn":5}"#),
            Ok(5)
        );
        for bad in [
            "",
            "x/y",
            "{",
            "{}",
            "[1]",
            r#"{"lsn":-1}"#,
            r#"{"lsn":1.5}"#,
            r#"{"lsn":true}"#,
            r#"{"lsn":"zz"}"#,
            r#"{"lsn_commit":5}"#,
        ] {
            assert!(parse_offset(bad).is_err(), "{bad:?}");
        }
    }
}
