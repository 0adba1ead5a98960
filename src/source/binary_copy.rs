//! COPY's binary format as the snapshot reader passes it on: the values of
//! `char(n)` columns lose their trailing blanks (the destination's input
//! function pads them again to n, so what is stored is the same, and it
//! counts the characters of every value it reads: blanks it is not given
//! cost nothing), everything else goes through byte for byte.
//!
//! Each CopyData message is rewritten only when it holds whole rows (the
//! first one after the header): PostgreSQL sends one row per message. The
//! first message that does not parse so is passed on untouched, and so is
//! everything after it — a row split over messages is never reinterpreted
//! from its middle. Nothing here trusts a length it has not checked.

use bytes::{BufMut, BytesMut};

/// The binary format's signature.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Rewrites CopyData payloads of one binary COPY.
#[derive(Debug)]
pub struct BlankTrimmer {
    /// Per column of the COPY, whether it is a `char(n)` column.
    trim: Vec<bool>,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Before the header.
    Header,
    /// At a row boundary.
    Rows,
    /// Something did not parse: pass everything on as it is.
    Raw,
}

impl BlankTrimmer {
    /// `trim[i]`: column i of the COPY is `char(n)` (with a declared n).
    /// When no column is, every payload is passed on as it is.
    pub fn new(trim: Vec<bool>) -> BlankTrimmer {
        let state = if trim.iter().any(|t| *t) {
            State::Header
        } else {
            State::Raw
        };
        BlankTrimmer { trim, state }
    }

    /// Appends the payload of one CopyData message to `out`, rewritten.
    pub fn append(&mut self, msg: &[u8], out: &mut BytesMut) {
        if self.state == State::Raw {
            out.extend_from_slice(msg);
            return;
        }
        let mark = out.len();
        match self.rewrite(msg, out) {
            Some(next) => self.state = next,
            None => {
                out.truncate(mark);
                out.extend_from_slice(msg);
                self.state = State::Raw;
            }
        }
    }

    /// The rewritten message, or None when it is not whole rows (and the
    /// header first, when it is due).
    fn rewrite(&self, msg: &[u8], out: &mut BytesMut) -> Option<State> {
        let mut at = 0usize;
        if self.state == State::Header {
            if msg.get(..11)? != SIGNATURE {
                return None;
            }
            let ext = usize::try_from(be_i32(msg, 15)?).ok()?;
            let end = 19usize.checked_add(ext)?;
            out.extend_from_slice(msg.get(..end)?);
            at = end;
        }
        out.reserve(msg.len().saturating_sub(at));
        while at < msg.len() {
            let fields = be_i16(msg, at)?;
            if fields == -1 {
                // The trailer: the last thing of the COPY.
                if at + 2 != msg.len() {
                    return None;
                }
                out.put_i16(-1);
                return Some(State::Rows);
            }
            if usize::try_from(fields).ok()? != self.trim.len() {
                return None;
            }
            out.put_i16(fields);
            at += 2;
            for &trim in &self.trim {
                let len = be_i32(msg, at)?;
                at += 4;
                if len == -1 {
                    out.put_i32(-1);
                    continue;
                }
                let len = usize::try_from(len).ok()?;
                let value = msg.get(at..at.checked_add(len)?)?;
                at += len;
                let kept = if trim {
                    let blanks = value.iter().rev().take_while(|b| **b == b' ').count();
                    &value[..value.len() - blanks]
                } else {
                    value
                };
                out.put_i32(i32::try_from(kept.len()).ok()?);
                out.extend_from_slice(kept);
            }
        }
        Some(State::Rows)
    }
}

fn be_i16(b: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be_i32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&0i32.to_be_bytes());
        h.extend_from_slice(&0i32.to_be_bytes());
        h
    }

    fn row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut r = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => r.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    r.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    r.extend_from_slice(v);
                }
            }
        }
        r
    }

    fn run(t: &mut BlankTrimmer, msgs: &[Vec<u8>]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for m in msgs {
            t.append(m, &mut out);
        }
        out.to_vec()
    }

    #[test]
    fn trims_only_char_columns_and_keeps_the_rest() {
        let mut t = BlankTrimmer::new(vec![false, true, true]);
        let first = [header(), row(&[Some(b"ab  "), Some(b"x  "), None])].concat();
        let second = row(&[Some(b" "), Some(b"   "), Some("é ".as_bytes())]);
        let got = run(&mut t, &[first, second, (-1i16).to_be_bytes().to_vec()]);
        let want = [
            header(),
            row(&[Some(b"ab  "), Some(b"x"), None]),
            row(&[Some(b" "), Some(b""), Some("é".as_bytes())]),
            (-1i16).to_be_bytes().to_vec(),
        ]
        .concat();
        assert_eq!(got, want);
    }

    #[test]
    fn leading_and_inner_blanks_stay() {
        let mut t = BlankTrimmer::new(vec![true]);
        let got = run(&mut t, &[[header(), row(&[Some(b"  a b  ")])].concat()]);
        assert_eq!(got, [header(), row(&[Some(b"  a b")])].concat());
    }

    #[test]
    fn header_extension_is_kept() {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&0i32.to_be_bytes());
        h.extend_from_slice(&3i32.to_be_bytes());
        h.extend_from_slice(b"xyz");
        let mut t = BlankTrimmer::new(vec![true]);
        let got = run(&mut t, &[[h.clone(), row(&[Some(b"a ")])].concat()]);
        assert_eq!(got, [h, row(&[Some(b"a")])].concat());
    }

    #[test]
    fn nothing_to_trim_passes_through() {
        let mut t = BlankTrimmer::new(vec![false, false]);
        let msgs = vec![
            [header(), row(&[Some(b"a "), Some(b"b ")])].concat(),
            b"not even a row".to_vec(),
        ];
        assert_eq!(run(&mut t, &msgs), msgs.concat());
    }

    /// Malformed or unexpected input: that message and everything after
    /// it pass through exactly as received.
    #[test]
    fn anything_unexpected_turns_to_pass_through() {
        let cases: Vec<Vec<Vec<u8>>> = vec![
            // No signature.
            vec![row(&[Some(b"a ")]), row(&[Some(b"b ")])],
            // A row split over two messages.
            {
                let whole = [header(), row(&[Some(b"abc   ")])].concat();
                let (a, b) = whole.split_at(whole.len() - 3);
                vec![a.to_vec(), b.to_vec(), row(&[Some(b"d ")])]
            },
            // Wrong field count.
            vec![
                header(),
                row(&[Some(b"a "), Some(b"b ")]),
                row(&[Some(b"c ")]),
            ],
            // A length past the end.
            vec![[header(), vec![0, 1, 0, 0, 0, 9, b'a']].concat()],
            // A negative length other than -1.
            vec![[header(), vec![0, 1, 0xff, 0xff, 0xff, 0xfe]].concat()],
            // Header extension longer than the message.
            vec![[SIGNATURE.to_vec(), vec![0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff]].concat()],
            // Bytes after the trailer.
            vec![header(), [(-1i16).to_be_bytes().to_vec(), vec![0]].concat()],
            // A truncated field count.
            vec![[header(), vec![0]].concat()],
        ];
        for (i, msgs) in cases.into_iter().enumerate() {
            let mut t = BlankTrimmer::new(vec![true]);
            let mut out = BytesMut::new();
            let mut raw_from = None;
            for (k, m) in msgs.iter().enumerate() {
                let before = out.len();
                t.append(m, &mut out);
                if raw_from.is_none() && out[before..] == m[..] && t.state == State::Raw {
                    raw_from = Some(k);
                }
            }
            let k = raw_from.unwrap_or_else(|| panic!("case {i} never passed through"));
            let tail: Vec<u8> = msgs[k..].concat();
            assert!(out.ends_with(&tail), "case {i}");
        }
    }
}
