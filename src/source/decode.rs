//! pgoutput decoding: turns the payload of one XLogData message into a
//! `Message` (protocol version 1), or, with `decode_streamed`, into a
//! `Decoded` (protocol version 2: the Stream Start/Stop/Commit/Abort
//! messages of in-progress transactions, and the (sub)transaction id that
//! prefixes the messages inside a streamed block). Every read is checked;
//! malformed or truncated input is an error, never a panic. Pure Rust, no
//! pgrx.

use bytes::Bytes;

pub type Lsn = u64;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub const PG_EPOCH_OFFSET_USEC: i64 = 946_684_800_000_000;

/// A PostgreSQL timestamp (µs since 2000-01-01) as µs since the Unix epoch.
pub fn pg_ts_to_unix_usec(ts: i64) -> i64 {
    ts.saturating_add(PG_EPOCH_OFFSET_USEC)
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    /// An unchanged TOASTed value: the destination keeps what it has.
    Unchanged,
    Text(Bytes),
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelColumn {
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_mod: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// 'd' default, 'n' nothing, 'f' full, 'i' index.
    pub replica_identity: u8,
    pub columns: Vec<RelColumn>,
}

/// How an old tuple identifies the row: key columns ('K') or whole row ('O').
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    Key,
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: Lsn,
        commit_ts: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    },
    Origin {
        lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    Insert {
        rel_id: u32,
        new: Vec<TupleValue>,
    },
    Update {
        rel_id: u32,
        old: Option<(OldKind, Vec<TupleValue>)>,
        new: Vec<TupleValue>,
    },
    Delete {
        rel_id: u32,
        old: (OldKind, Vec<TupleValue>),
    },
    Truncate {
        cascade: bool,
        restart_identity: bool,
        rel_ids: Vec<u32>,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error(
        "truncated pgoutput message: {what} needs {need} bytes at offset {offset}, {have} left"
    )]
    Truncated {
        what: &'static str,
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("unknown pgoutput message type 0x{0:02x}")]
    UnknownMessage(u8),
    #[error("unknown tuple value kind 0x{0:02x}")]
    UnknownTupleKind(u8),
    #[error("unexpected tuple marker 0x{0:02x} in {1}")]
    UnexpectedMarker(u8, &'static str),
    #[error("string without terminator in {0}")]
    Unterminated(&'static str),
    #[error("invalid UTF-8 in {0}")]
    InvalidUtf8(&'static str),
    #[error("negative length {0} in {1}")]
    NegativeLength(i32, &'static str),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("{0}")]
    OutOfPlace(&'static str),
}

/// One pgoutput message of protocol version 2 (streaming of in-progress
/// transactions, PostgreSQL 14 on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A message as in protocol 1. Inside a streamed block, `xid` is the
    /// (sub)transaction the change belongs to (None outside one, and for
    /// Origin, which carries none).
    Message { xid: Option<u32>, msg: Message },
    /// A block of changes of the in-progress top-level transaction `xid`
    /// begins; `first` on its first block.
    StreamStart { xid: u32, first: bool },
    /// The current streamed block ends.
    StreamStop,
    /// The streamed transaction `xid` committed.
    StreamCommit {
        xid: u32,
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    },
    /// The streamed transaction `xid` (when `subxid == xid`), or its
    /// subtransaction `subxid`, aborted. `abort` (LSN, time) comes only with
    /// protocol 4 and `streaming 'parallel'`.
    StreamAbort {
        xid: u32,
        subxid: u32,
        abort: Option<(Lsn, i64)>,
    },
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Lets values be sliced out of the original buffer without copying.
    owner: Option<&'a Bytes>,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let have = self.buf.len() - self.pos;
        if n > have {
            return Err(DecodeError::Truncated {
                what,
                offset: self.pos,
                need: n,
                have,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::Unterminated(what))?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| DecodeError::InvalidUtf8(what))?;
        self.pos += end + 1;
        Ok(s.to_string())
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        let s = self.take(n, what)?;
        Ok(match self.owner {
            Some(b) => b.slice(start..start + n),
            None => Bytes::copy_from_slice(s),
        })
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

/// Decodes one pgoutput message.
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let mut c = Cursor {
        buf,
        pos: 0,
        owner: None,
    };
    decode_from(&mut c)
}

/// Like `decode`, but values share the buffer instead of being copied.
pub fn decode_bytes(buf: &Bytes) -> Result<Message, DecodeError> {
    let mut c = Cursor {
        buf: buf.as_ref(),
        pos: 0,
        owner: Some(buf),
    };
    decode_from(&mut c)
}

/// Decodes one pgoutput message of protocol version 2 or later. `in_stream`
/// says whether a Stream Start came without its Stream Stop yet: messages
/// there carry a transaction id, and transaction boundaries are out of
/// place. Values share the buffer.
pub fn decode_streamed(buf: &Bytes, in_stream: bool) -> Result<Decoded, DecodeError> {
    let mut c = Cursor {
        buf: buf.as_ref(),
        pos: 0,
        owner: Some(buf),
    };
    let c = &mut c;
    let Some(&tag) = buf.first() else {
        return Err(DecodeError::Empty);
    };
    let out = match (tag, in_stream) {
        (b'S', false) => {
            c.u8("message type")?;
            Decoded::StreamStart {
                xid: c.u32("stream start xid")?,
                first: c.u8("stream start first segment")? == 1,
            }
        }
        (b'E', true) => {
            c.u8("message type")?;
            Decoded::StreamStop
        }
        (b'c', false) => {
            c.u8("message type")?;
            Decoded::StreamCommit {
                xid: c.u32("stream commit xid")?,
                flags: c.u8("stream commit flags")?,
                commit_lsn: c.u64("stream commit LSN")?,
                end_lsn: c.u64("stream commit end LSN")?,
                commit_ts: c.i64("stream commit timestamp")?,
            }
        }
        (b'A', false) => {
            c.u8("message type")?;
            let xid = c.u32("stream abort xid")?;
            let subxid = c.u32("stream abort subxid")?;
            // Protocol 4 with parallel streaming adds where and when.
            let abort = if c.remaining() == 0 {
                None
            } else {
                Some((c.u64("stream abort LSN")?, c.i64("stream abort timestamp")?))
            };
            Decoded::StreamAbort { xid, subxid, abort }
        }
        (b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M', true) => {
            c.u8("message type")?;
            let xid = c.u32("streamed transaction id")?;
            let msg = decode_body(tag, c)?;
            Decoded::Message {
                xid: Some(xid),
                msg,
            }
        }
        (b'S', true) => {
            return Err(DecodeError::OutOfPlace(
                "Stream Start inside a streamed block",
            ))
        }
        (b'E', false) => {
            return Err(DecodeError::OutOfPlace(
                "Stream Stop outside a streamed block",
            ))
        }
        (b'c' | b'A', true) => {
            return Err(DecodeError::OutOfPlace(
                "Stream Commit or Abort inside a streamed block",
            ))
        }
        (b'B' | b'C', true) => {
            return Err(DecodeError::OutOfPlace(
                "Begin or Commit inside a streamed block",
            ))
        }
        _ => {
            c.u8("message type")?;
            let msg = decode_body(tag, c)?;
            Decoded::Message { xid: None, msg }
        }
    };
    c.finish()?;
    Ok(out)
}

fn decode_from(c: &mut Cursor<'_>) -> Result<Message, DecodeError> {
    if c.remaining() == 0 {
        return Err(DecodeError::Empty);
    }
    let tag = c.u8("message type")?;
    let msg = decode_body(tag, c)?;
    c.finish()?;
    Ok(msg)
}

/// The message after its type byte (and, when streamed, its xid).
fn decode_body(tag: u8, c: &mut Cursor<'_>) -> Result<Message, DecodeError> {
    let msg = match tag {
        b'B' => Message::Begin {
            final_lsn: c.u64("begin final LSN")?,
            commit_ts: c.i64("begin timestamp")?,
            xid: c.u32("begin xid")?,
        },
        b'C' => Message::Commit {
            flags: c.u8("commit flags")?,
            commit_lsn: c.u64("commit LSN")?,
            end_lsn: c.u64("commit end LSN")?,
            commit_ts: c.i64("commit timestamp")?,
        },
        b'O' => Message::Origin {
            lsn: c.u64("origin LSN")?,
            name: c.cstr("origin name")?,
        },
        b'R' => {
            let id = c.u32("relation id")?;
            let namespace = c.cstr("relation namespace")?;
            let name = c.cstr("relation name")?;
            let replica_identity = c.u8("replica identity")?;
            let n = c.i16("relation column count")?;
            if n < 0 {
                return Err(DecodeError::NegativeLength(
                    i32::from(n),
                    "relation columns",
                ));
            }
            // Each column needs at least 10 bytes: never trust the count for
            // allocation beyond what the buffer can hold.
            let mut columns = Vec::with_capacity((n as usize).min(c.remaining() / 10));
            for _ in 0..n {
                let flags = c.u8("column flags")?;
                let cname = c.cstr("column name")?;
                let type_oid = c.u32("column type")?;
                let type_mod = c.i32("column type modifier")?;
                columns.push(RelColumn {
                    is_key: flags & 1 == 1,
                    name: cname,
                    type_oid,
                    type_mod,
                });
            }
            Message::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            id: c.u32("type id")?,
            namespace: c.cstr("type namespace")?,
            name: c.cstr("type name")?,
        },
        b'I' => {
            let rel_id = c.u32("insert relation id")?;
            match c.u8("insert tuple marker")? {
                b'N' => {}
                m => return Err(DecodeError::UnexpectedMarker(m, "insert")),
            }
            Message::Insert {
                rel_id,
                new: tuple(c)?,
            }
        }
        b'U' => {
            let rel_id = c.u32("update relation id")?;
            let mut marker = c.u8("update tuple marker")?;
            let mut old = None;
            if marker == b'K' || marker == b'O' {
                let kind = if marker == b'K' {
                    OldKind::Key
                } else {
                    OldKind::Full
                };
                old = Some((kind, tuple(c)?));
                marker = c.u8("update new tuple marker")?;
            }
            if marker != b'N' {
                return Err(DecodeError::UnexpectedMarker(marker, "update"));
            }
            Message::Update {
                rel_id,
                old,
                new: tuple(c)?,
            }
        }
        b'D' => {
            let rel_id = c.u32("delete relation id")?;
            let kind = match c.u8("delete tuple marker")? {
                b'K' => OldKind::Key,
                b'O' => OldKind::Full,
                m => return Err(DecodeError::UnexpectedMarker(m, "delete")),
            };
            Message::Delete {
                rel_id,
                old: (kind, tuple(c)?),
            }
        }
        b'T' => {
            let n = c.u32("truncate relation count")?;
            let options = c.u8("truncate options")?;
            let mut rel_ids = Vec::with_capacity((n as usize).min(c.remaining() / 4));
            for _ in 0..n {
                rel_ids.push(c.u32("truncate relation id")?);
            }
            Message::Truncate {
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                rel_ids,
            }
        }
        b'M' => {
            let flags = c.u8("message flags")?;
            let lsn = c.u64("message LSN")?;
            let prefix = c.cstr("message prefix")?;
            let len = c.i32("message length")?;
            if len < 0 {
                return Err(DecodeError::NegativeLength(len, "message content"));
            }
            let content = c.bytes(len as usize, "message content")?;
            Message::Message {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content,
            }
        }
        other => return Err(DecodeError::UnknownMessage(other)),
    };
    Ok(msg)
}

fn tuple(c: &mut Cursor<'_>) -> Result<Vec<TupleValue>, DecodeError> {
    let n = c.i16("tuple column count")?;
    if n < 0 {
        return Err(DecodeError::NegativeLength(i32::from(n), "tuple columns"));
    }
    let mut out = Vec::with_capacity((n as usize).min(c.remaining()));
    for _ in 0..n {
        let v = match c.u8("tuple value kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::Unchanged,
            kind @ (b't' | b'b') => {
                let len = c.i32("tuple value length")?;
                if len < 0 {
                    return Err(DecodeError::NegativeLength(len, "tuple value"));
                }
                let data = c.bytes(len as usize, "tuple value")?;
                if kind == b't' {
                    TupleValue::Text(data)
                } else {
                    TupleValue::Binary(data)
                }
            }
            other => return Err(DecodeError::UnknownTupleKind(other)),
        };
        out.push(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny encoder for building test messages.
    #[derive(Default)]
    struct Enc(Vec<u8>);
    impl Enc {
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn s(mut self, v: &str) -> Self {
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(0);
            self
        }
        fn text(self, v: &str) -> Self {
            let mut e = self.u8(b't').i32(v.len() as i32);
            e.0.extend_from_slice(v.as_bytes());
            e
        }
    }

    fn samples() -> Vec<(Vec<u8>, Message)> {
        let rel = Enc::default()
            .u8(b'R')
            .u32(16384)
            .s("public")
            .s("orders")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .s("id")
            .u32(23)
            .i32(-1)
            .u8(0)
            .s("note")
            .u32(1043)
            .i32(24);
        let upd = Enc::default()
            .u8(b'U')
            .u32(16384)
            .u8(b'K')
            .i16(2)
            .text("1")
            .u8(b'n')
            .u8(b'N')
            .i16(2)
            .text("2")
            .u8(b'u');
        vec![
            (
                Enc::default()
                    .u8(b'B')
                    .u64(0x1_0000_0010)
                    .i64(42)
                    .u32(777)
                    .0,
                Message::Begin {
                    final_lsn: 0x1_0000_0010,
                    commit_ts: 42,
                    xid: 777,
                },
            ),
            (
                Enc::default().u8(b'C').u8(0).u64(10).u64(20).i64(30).0,
                Message::Commit {
                    flags: 0,
                    commit_lsn: 10,
                    end_lsn: 20,
                    commit_ts: 30,
                },
            ),
            (
                Enc::default().u8(b'O').u64(5).s("node1").0,
                Message::Origin {
                    lsn: 5,
                    name: "node1".into(),
                },
            ),
            (
                rel.0,
                Message::Relation(Relation {
                    id: 16384,
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
                            type_oid: 1043,
                            type_mod: 24,
                        },
                    ],
                }),
            ),
            (
                Enc::default().u8(b'Y').u32(99).s("public").s("mood").0,
                Message::Type {
                    id: 99,
                    namespace: "public".into(),
                    name: "mood".into(),
                },
            ),
            (
                Enc::default()
                    .u8(b'I')
                    .u32(16384)
                    .u8(b'N')
                    .i16(3)
                    .text("1")
                    .u8(b'n')
                    .text("")
                    .0,
                Message::Insert {
                    rel_id: 16384,
                    new: vec![
                        TupleValue::Text(Bytes::from_static(b"1")),
                        TupleValue::Null,
                        TupleValue::Text(Bytes::new()),
                    ],
                },
            ),
            (
                upd.0,
                Message::Update {
                    rel_id: 16384,
                    old: Some((
                        OldKind::Key,
                        vec![TupleValue::Text(Bytes::from_static(b"1")), TupleValue::Null],
                    )),
                    new: vec![
                        TupleValue::Text(Bytes::from_static(b"2")),
                        TupleValue::Unchanged,
                    ],
                },
            ),
            (
                Enc::default().u8(b'U').u32(7).u8(b'N').i16(1).text("x").0,
                Message::Update {
                    rel_id: 7,
                    old: None,
                    new: vec![TupleValue::Text(Bytes::from_static(b"x"))],
                },
            ),
            (
                Enc::default()
                    .u8(b'U')
                    .u32(7)
                    .u8(b'O')
                    .i16(1)
                    .text("a")
                    .u8(b'N')
                    .i16(1)
                    .text("b")
                    .0,
                Message::Update {
                    rel_id: 7,
                    old: Some((
                        OldKind::Full,
                        vec![TupleValue::Text(Bytes::from_static(b"a"))],
                    )),
                    new: vec![TupleValue::Text(Bytes::from_static(b"b"))],
                },
            ),
            (
                Enc::default().u8(b'D').u32(7).u8(b'O').i16(1).text("a").0,
                Message::Delete {
                    rel_id: 7,
                    old: (
                        OldKind::Full,
                        vec![TupleValue::Text(Bytes::from_static(b"a"))],
                    ),
                },
            ),
            (
                Enc::default().u8(b'D').u32(7).u8(b'K').i16(1).u8(b'n').0,
                Message::Delete {
                    rel_id: 7,
                    old: (OldKind::Key, vec![TupleValue::Null]),
                },
            ),
            (
                Enc::default().u8(b'T').u32(2).u8(3).u32(1).u32(2).0,
                Message::Truncate {
                    cascade: true,
                    restart_identity: true,
                    rel_ids: vec![1, 2],
                },
            ),
            (
                Enc::default().u8(b'T').u32(1).u8(2).u32(9).0,
                Message::Truncate {
                    cascade: false,
                    restart_identity: true,
                    rel_ids: vec![9],
                },
            ),
            (
                Enc::default()
                    .u8(b'M')
                    .u8(1)
                    .u64(77)
                    .s("app")
                    .i32(3)
                    .u8(1)
                    .u8(2)
                    .u8(3)
                    .0,
                Message::Message {
                    transactional: true,
                    lsn: 77,
                    prefix: "app".into(),
                    content: Bytes::from_static(&[1, 2, 3]),
                },
            ),
            (
                Enc::default()
                    .u8(b'I')
                    .u32(1)
                    .u8(b'N')
                    .i16(1)
                    .u8(b'b')
                    .i32(2)
                    .u8(0xff)
                    .u8(0)
                    .0,
                Message::Insert {
                    rel_id: 1,
                    new: vec![TupleValue::Binary(Bytes::from_static(&[0xff, 0]))],
                },
            ),
        ]
    }

    #[test]
    fn decodes_every_message_type() {
        for (bytes, want) in samples() {
            assert_eq!(decode(&bytes), Ok(want.clone()));
            assert_eq!(decode_bytes(&Bytes::from(bytes)), Ok(want));
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for (bytes, _) in samples() {
            for len in 0..bytes.len() {
                assert!(decode(&bytes[..len]).is_err(), "prefix {len} of {bytes:?}");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        for (mut bytes, _) in samples() {
            bytes.push(0);
            assert_eq!(decode(&bytes), Err(DecodeError::Trailing(1)));
        }
    }

    #[test]
    fn malformed_input() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownMessage(b'Z')));
        // unknown tuple kind
        let bad = Enc::default().u8(b'I').u32(1).u8(b'N').i16(1).u8(b'x').0;
        assert_eq!(decode(&bad), Err(DecodeError::UnknownTupleKind(b'x')));
        // insert without the N marker
        let bad = Enc::default().u8(b'I').u32(1).u8(b'K').i16(0).0;
        assert!(matches!(
            decode(&bad),
            Err(DecodeError::UnexpectedMarker(b'K', _))
        ));
        // delete with a new tuple marker
        let bad = Enc::default().u8(b'D').u32(1).u8(b'N').i16(0).0;
        assert!(matches!(
            decode(&bad),
            Err(DecodeError::UnexpectedMarker(b'N', _))
        ));
        // string without terminator
        let bad = Enc::default().u8(b'O').u64(1).u8(b'a').0;
        assert_eq!(decode(&bad), Err(DecodeError::Unterminated("origin name")));
        // invalid UTF-8
        let bad = Enc::default().u8(b'O').u64(1).u8(0xff).u8(0).0;
        assert_eq!(decode(&bad), Err(DecodeError::InvalidUtf8("origin name")));
        // negative value length
        let bad = Enc::default()
            .u8(b'I')
            .u32(1)
            .u8(b'N')
            .i16(1)
            .u8(b't')
            .i32(-5)
            .0;
        assert!(matches!(
            decode(&bad),
            Err(DecodeError::NegativeLength(-5, _))
        ));
        // negative column count
        let bad = Enc::default().u8(b'I').u32(1).u8(b'N').i16(-1).0;
        assert!(matches!(
            decode(&bad),
            Err(DecodeError::NegativeLength(-1, _))
        ));
        // huge value length
        let bad = Enc::default()
            .u8(b'I')
            .u32(1)
            .u8(b'N')
            .i16(1)
            .u8(b't')
            .i32(i32::MAX)
            .0;
        assert!(matches!(decode(&bad), Err(DecodeError::Truncated { .. })));
        // huge counts do not allocate
        let bad = Enc::default().u8(b'T').u32(u32::MAX).u8(0).0;
        assert!(matches!(decode(&bad), Err(DecodeError::Truncated { .. })));
        let bad = Enc::default().u8(b'I').u32(1).u8(b'N').i16(i16::MAX).0;
        assert!(matches!(decode(&bad), Err(DecodeError::Truncated { .. })));
        let bad = Enc::default().u8(b'M').u8(0).u64(1).s("p").i32(-1).0;
        assert!(matches!(
            decode(&bad),
            Err(DecodeError::NegativeLength(-1, _))
        ));
    }

    /// splitmix64, for reproducible random inputs.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Decodes `buf` while recording the largest single allocation made.
    fn decode_probed(buf: &[u8]) -> (Result<Message, DecodeError>, usize) {
        probe::reset();
        let r = decode(buf);
        (r, probe::largest())
    }

    #[test]
    fn fuzz_random_and_mutated_messages() {
        let tags = b"BCORYIUDTMKNtbnuz";
        let mut rng = Rng(0x5EED);
        // Random bytes, most starting with a real message type.
        for _ in 0..20_000 {
            let len = rng.below(96);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if let Some(first) = buf.first_mut() {
                *first = tags[rng.below(tags.len())];
            }
            let (_, largest) = decode_probed(&buf);
            assert!(
                largest <= 64 * 1024,
                "{largest} bytes allocated for {buf:?}"
            );
        }
        // Valid messages with bytes flipped, inserted or cut.
        let samples = samples();
        for _ in 0..20_000 {
            let (orig, _) = &samples[rng.below(samples.len())];
            let mut buf = orig.clone();
            for _ in 0..=rng.below(4) {
                match rng.below(3) {
                    0 if !buf.is_empty() => {
                        let i = rng.below(buf.len());
                        buf[i] = rng.next() as u8;
                    }
                    1 => {
                        let i = rng.below(buf.len() + 1);
                        buf.insert(i, [0u8, 0xff, 0x7f, 0x80][rng.below(4)]);
                    }
                    _ => {
                        let n = rng.below(buf.len() + 1);
                        buf.truncate(n);
                    }
                }
            }
            let (_, largest) = decode_probed(&buf);
            assert!(
                largest <= 64 * 1024,
                "{largest} bytes allocated for {buf:?}"
            );
        }
    }

    #[test]
    fn absurd_counts_and_lengths_allocate_nothing_of_their_size() {
        // The probe sees allocations.
        probe::reset();
        let v = std::hint::black_box(vec![0u8; 1 << 20]);
        assert!(probe::largest() >= 1 << 20);
        drop(v);
        let cases = [
            Enc::default().u8(b'T').u32(u32::MAX).u8(0).u32(1).0,
            Enc::default().u8(b'I').u32(1).u8(b'N').i16(i16::MAX).0,
            Enc::default()
                .u8(b'I')
                .u32(1)
                .u8(b'N')
                .i16(1)
                .u8(b't')
                .i32(i32::MAX)
                .0,
            Enc::default()
                .u8(b'R')
                .u32(1)
                .s("s")
                .s("t")
                .u8(b'd')
                .i16(i16::MAX)
                .0,
            Enc::default().u8(b'M').u8(0).u64(1).s("p").i32(i32::MAX).0,
        ];
        for buf in cases {
            let (r, largest) = decode_probed(&buf);
            assert!(r.is_err(), "{buf:?}");
            assert!(largest <= 4096, "{largest} bytes allocated for {buf:?}");
        }
    }

    /// Protocol 2 samples: (bytes, in a streamed block, decoded).
    fn streamed_samples() -> Vec<(Vec<u8>, bool, Decoded)> {
        let mut out = vec![
            (
                Enc::default().u8(b'S').u32(900).u8(1).0,
                false,
                Decoded::StreamStart {
                    xid: 900,
                    first: true,
                },
            ),
            (
                Enc::default().u8(b'S').u32(900).u8(0).0,
                false,
                Decoded::StreamStart {
                    xid: 900,
                    first: false,
                },
            ),
            (Enc::default().u8(b'E').0, true, Decoded::StreamStop),
            (
                Enc::default()
                    .u8(b'c')
                    .u32(900)
                    .u8(0)
                    .u64(10)
                    .u64(20)
                    .i64(30)
                    .0,
                false,
                Decoded::StreamCommit {
                    xid: 900,
                    flags: 0,
                    commit_lsn: 10,
                    end_lsn: 20,
                    commit_ts: 30,
                },
            ),
            (
                Enc::default().u8(b'A').u32(900).u32(901).0,
                false,
                Decoded::StreamAbort {
                    xid: 900,
                    subxid: 901,
                    abort: None,
                },
            ),
            (
                Enc::default().u8(b'A').u32(900).u32(900).u64(77).i64(88).0,
                false,
                Decoded::StreamAbort {
                    xid: 900,
                    subxid: 900,
                    abort: Some((77, 88)),
                },
            ),
        ];
        // Every protocol 1 message decodes the same outside a block; the
        // changes and Relation/Type/Message inside one carry an xid after
        // their type byte.
        for (bytes, msg) in samples() {
            match bytes[0] {
                b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M' => {
                    let mut inside = vec![bytes[0]];
                    inside.extend_from_slice(&901u32.to_be_bytes());
                    inside.extend_from_slice(&bytes[1..]);
                    out.push((
                        inside,
                        true,
                        Decoded::Message {
                            xid: Some(901),
                            msg: msg.clone(),
                        },
                    ));
                }
                b'O' => out.push((
                    bytes.clone(),
                    true,
                    Decoded::Message {
                        xid: None,
                        msg: msg.clone(),
                    },
                )),
                _ => {}
            }
            out.push((bytes, false, Decoded::Message { xid: None, msg }));
        }
        out
    }

    #[test]
    fn decodes_streamed_messages() {
        for (bytes, in_stream, want) in streamed_samples() {
            assert_eq!(
                decode_streamed(&Bytes::from(bytes.clone()), in_stream),
                Ok(want),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn streamed_truncation_and_trailing_bytes_are_errors() {
        for (bytes, in_stream, want) in streamed_samples() {
            for len in 0..bytes.len() {
                let r = decode_streamed(&Bytes::copy_from_slice(&bytes[..len]), in_stream);
                // A Stream Abort without the protocol 4 fields is complete.
                let complete_abort =
                    len == 9 && matches!(want, Decoded::StreamAbort { abort: Some(_), .. });
                assert_eq!(
                    r.is_ok(),
                    complete_abort,
                    "prefix {len} of {bytes:?}: {r:?}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            let r = decode_streamed(&Bytes::from(longer), in_stream);
            assert!(r.is_err(), "{bytes:?} with a trailing byte: {r:?}");
        }
    }

    #[test]
    fn streamed_messages_out_of_place() {
        let start = Bytes::from(Enc::default().u8(b'S').u32(1).u8(1).0);
        let stop = Bytes::from(Enc::default().u8(b'E').0);
        let commit = Bytes::from(Enc::default().u8(b'c').u32(1).u8(0).u64(1).u64(2).i64(3).0);
        let abort = Bytes::from(Enc::default().u8(b'A').u32(1).u32(1).0);
        let begin = Bytes::from(Enc::default().u8(b'B').u64(1).i64(2).u32(3).0);
        for (buf, in_stream) in [
            (&start, true),
            (&stop, false),
            (&commit, true),
            (&abort, true),
            (&begin, true),
        ] {
            assert!(
                matches!(
                    decode_streamed(buf, in_stream),
                    Err(DecodeError::OutOfPlace(_))
                ),
                "{buf:?} in_stream={in_stream}"
            );
        }
        assert_eq!(
            decode_streamed(&Bytes::new(), true),
            Err(DecodeError::Empty)
        );
        assert_eq!(
            decode_streamed(&Bytes::from_static(b"Z"), true),
            Err(DecodeError::UnknownMessage(b'Z'))
        );
        // An insert inside a block without its xid is cut short.
        let bare = Bytes::from(Enc::default().u8(b'I').u32(1).u8(b'N').i16(0).0);
        assert!(decode_streamed(&bare, true).is_err());
    }

    #[test]
    fn fuzz_streamed_messages() {
        let tags = b"SEcARYIUDTMOBCz";
        let mut rng = Rng(0xC0FFEE);
        for _ in 0..20_000 {
            let len = rng.below(64);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if let Some(first) = buf.first_mut() {
                *first = tags[rng.below(tags.len())];
            }
            probe::reset();
            let _ = decode_streamed(&Bytes::from(buf.clone()), rng.below(2) == 1);
            assert!(probe::largest() <= 64 * 1024, "{buf:?}");
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(pg_ts_to_unix_usec(0), 946_684_800_000_000);
        assert_eq!(pg_ts_to_unix_usec(i64::MAX), i64::MAX);
    }
}

/// A test-only allocator wrapper that records, per thread, the largest
/// single allocation: the decoder must never allocate what a message merely
/// claims.
#[cfg(test)]
mod probe {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    pub fn reset() {
        LARGEST.with(|l| l.set(0));
    }

    pub fn largest() -> usize {
        LARGEST.with(|l| l.get())
    }

    struct Probe;

    unsafe impl GlobalAlloc for Probe {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static GLOBAL: Probe = Probe;
}
