//! Log sequence numbers: PostgreSQL's `X/Y` text form (two hexadecimal
//! 32-bit halves) to and from `u64`. Pure Rust.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LsnError {
    #[error("empty LSN")]
    Empty,
    #[error("LSN \"{0}\" is not X/Y hexadecimal or a decimal integer")]
    Malformed(String),
}

/// Parses `X/Y` (each part 1 to 8 hex digits). A plain decimal integer is
/// accepted too, so an LSN copied from `last_dbz_offset` JSON works.
pub fn parse_lsn(s: &str) -> Result<u64, LsnError> {
    if s.is_empty() {
        return Err(LsnError::Empty);
    }
    let bad = || LsnError::Malformed(s.chars().take(40).collect());
    match s.split_once('/') {
        Some((hi, lo)) => {
            let part = |p: &str| -> Result<u64, LsnError> {
                if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad());
                }
                u64::from_str_radix(p, 16).map_err(|_| bad())
            };
            Ok((part(hi)? << 32) | part(lo)?)
        }
        None => {
            if !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            s.parse::<u64>().map_err(|_| bad())
        }
    }
}

/// Formats as PostgreSQL does: upper-case hex halves, `16/B374D848`.
pub fn format_lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for v in [0u64, 1, 0x16_B374_D848, u64::MAX, 37051152] {
            assert_eq!(parse_lsn(&format_lsn(v)), Ok(v));
        }
        assert_eq!(format_lsn(0), "0/0");
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("16/b374d848"), Ok(0x16_B374_D848));
        assert_eq!(parse_lsn("37051152"), Ok(37051152));
    }

    #[test]
    fn malformed() {
        assert_eq!(parse_lsn(""), Err(LsnError::Empty));
        for bad in [
            "/",
            "1/",
            "/1",
            "x/1",
            "1/2/3",
            "123456789/0",
            "0/123456789",
            " 0/1",
            "0/1 ",
            "-1",
            "1.5",
            "0x10",
        ] {
            assert!(parse_lsn(bad).is_err(), "{bad}");
        }
    }
}
