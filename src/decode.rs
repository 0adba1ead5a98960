//! placeholder
pub type Lsn = u64;
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    Null,
    Unchanged,
    Text(bytes::Bytes),
    Binary(bytes::Bytes),
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
    pub replica_identity: u8,
    pub columns: Vec<RelColumn>,
}
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
        content: bytes::Bytes,
    },
}
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("x")]
    X,
}
pub fn decode(_buf: &[u8]) -> Result<Message, DecodeError> {
    Err(DecodeError::X)
}
pub const PG_EPOCH_OFFSET_USEC: i64 = 946_684_800_000_000;
pub fn pg_ts_to_unix_usec(ts: i64) -> i64 {
    ts + PG_EPOCH_OFFSET_USEC
}
