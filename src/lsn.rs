//! placeholder
#[derive(Debug)]
pub struct LsnError;
impl std::fmt::Display for LsnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad lsn")
    }
}
pub fn parse_lsn(s: &str) -> Result<u64, LsnError> {
    let (a, b) = s.split_once('/').ok_or(LsnError)?;
    let a = u64::from_str_radix(a, 16).map_err(|_| LsnError)?;
    let b = u64::from_str_radix(b, 16).map_err(|_| LsnError)?;
    Ok((a << 32) | b)
}
pub fn format_lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
}
