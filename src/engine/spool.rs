//! The spool of streamed in-progress transactions (pgoutput protocol 2,
//! sources from PostgreSQL 14 on).
//!
//! With `streaming 'on'` the source sends a large transaction's changes in
//! blocks (Stream Start .. Stream Stop) while it is still running; blocks of
//! several transactions interleave with each other and with ordinary
//! transactions, and a streamed transaction may still abort, whole or one
//! subtransaction at a time. As PostgreSQL's own apply worker does before 16,
//! each streamed transaction's messages are written, as received, to a file
//! of its own (one per top-level xid) in the connector's spool directory
//! `pg_synchdb/spool/<database oid>_<connector name in hex>/` under the destination's data
//! directory; nothing of it is kept in memory but the offsets where its
//! subtransactions begin. A subtransaction's abort truncates the file back to
//! where that subtransaction's first change was written (its nested
//! subtransactions and later ones started after it, so they go too); the
//! top-level abort deletes the file. At Stream Commit the engine replays the
//! file in ONE destination transaction through the applier, exactly as if
//! the changes had come between BEGIN and COMMIT: the origin position, the
//! flush tracking, exactly-once and the skip strategy do not know the
//! difference. Until then nothing of a streamed transaction is applied and
//! no position is confirmed for it.
//!
//! The files need no fsync: after a crash or restart the source sends every
//! transaction not applied from its start again (first block flagged), so
//! the directory is emptied when the spool opens, and removed when it is
//! dropped. Pure std, no pgrx.

use bytes::Bytes;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// The largest record read back (a pgoutput message carries at most one
/// row, about 1 GB of values plus framing, as the replication client
/// accepts).
const MAX_RECORD: usize = (1 << 30) + (64 << 20);

/// Record header: payload length (u32) and the message's WAL start (u64).
const HEADER: u64 = 12;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool's files could not be written or read.
    #[error("spool of streamed transactions: {0}")]
    Io(String),
    /// The source's Stream messages do not make sense together.
    #[error("streamed transactions: {0}")]
    Protocol(String),
}

/// One streamed transaction not yet committed or aborted.
#[derive(Debug, Default)]
struct Txn {
    /// Bytes in its file.
    len: u64,
    /// Subtransactions with changes, in the order their first change came,
    /// with the file length before it.
    subxacts: Vec<(u32, u64)>,
}

/// The streamed transactions of one replication session.
pub struct Spool {
    dir: PathBuf,
    txns: HashMap<u32, Txn>,
    /// The block being received: its top-level xid and file.
    open: Option<(u32, BufWriter<File>)>,
}

fn io(path: &Path, what: &str, e: std::io::Error) -> SpoolError {
    SpoolError::Io(format!("{what} \"{}\": {e}", path.display()))
}

/// The spool directory of a connector of the database `dboid` (names are
/// unique per database), relative to the data directory (the working
/// directory of every backend and background worker).
pub fn connector_dir(dboid: u32, connector: &str) -> PathBuf {
    let hex: String = connector.bytes().map(|b| format!("{b:02x}")).collect();
    Path::new("pg_synchdb")
        .join("spool")
        .join(format!("{dboid}_{hex}"))
}

impl Spool {
    /// Opens the spool in `dir`, removing what an earlier session left there
    /// (the source sends those transactions again from their start).
    pub fn open(dir: PathBuf) -> Result<Spool, SpoolError> {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&dir, "removing stale spool directory", e)),
        }
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, "creating spool directory", e))?;
        Ok(Spool {
            dir,
            txns: HashMap::new(),
            open: None,
        })
    }

    fn path(&self, xid: u32) -> PathBuf {
        self.dir.join(format!("{xid}.changes"))
    }

    /// Inside a Stream Start .. Stream Stop block.
    pub fn in_block(&self) -> bool {
        self.open.is_some()
    }

    /// No streamed transaction is pending (none started and not ended).
    pub fn is_empty(&self) -> bool {
        self.txns.is_empty() && self.open.is_none()
    }

    /// Stream Start: the following messages belong to `xid`.
    pub fn start(&mut self, xid: u32, first: bool) -> Result<(), SpoolError> {
        if let Some((open, _)) = &self.open {
            return Err(SpoolError::Protocol(format!(
                "Stream Start of transaction {xid} inside the block of {open}"
            )));
        }
        let path = self.path(xid);
        let file = if first {
            // A transaction streamed again from its start replaces what was
            // spooled of it.
            self.txns.insert(xid, Txn::default());
            File::create(&path).map_err(|e| io(&path, "creating", e))?
        } else {
            if !self.txns.contains_key(&xid) {
                return Err(SpoolError::Protocol(format!(
                    "a later block of transaction {xid} whose first block never came"
                )));
            }
            OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|e| io(&path, "opening", e))?
        };
        self.open = Some((xid, BufWriter::with_capacity(64 * 1024, file)));
        Ok(())
    }

    /// Writes one message of the current block: `raw` as received (it is
    /// decoded again, inside a block, when replayed), `subxid` the
    /// (sub)transaction it names.
    pub fn write(
        &mut self,
        subxid: Option<u32>,
        wal_start: u64,
        raw: &[u8],
    ) -> Result<(), SpoolError> {
        let Some((xid, w)) = self.open.as_mut() else {
            return Err(SpoolError::Protocol(
                "a streamed change outside a streamed block".into(),
            ));
        };
        let xid = *xid;
        let len = u32::try_from(raw.len())
            .ok()
            .filter(|n| (*n as usize) <= MAX_RECORD)
            .ok_or_else(|| SpoolError::Protocol(format!("a message of {} bytes", raw.len())))?;
        let txn = self.txns.entry(xid).or_default();
        if let Some(sub) = subxid.filter(|s| *s != xid) {
            if txn.subxacts.last().map(|(s, _)| *s) != Some(sub)
                && !txn.subxacts.iter().any(|(s, _)| *s == sub)
            {
                txn.subxacts.push((sub, txn.len));
            }
        }
        w.write_all(&len.to_be_bytes())
            .and_then(|_| w.write_all(&wal_start.to_be_bytes()))
            .and_then(|_| w.write_all(raw))
            .map_err(|e| io(&self.dir.join(format!("{xid}.changes")), "writing", e))?;
        txn.len += HEADER + u64::from(len);
        Ok(())
    }

    /// Stream Stop: the block is written out (not synced).
    pub fn stop(&mut self) -> Result<(), SpoolError> {
        let Some((xid, mut w)) = self.open.take() else {
            return Err(SpoolError::Protocol(
                "Stream Stop outside a streamed block".into(),
            ));
        };
        w.flush().map_err(|e| io(&self.path(xid), "writing", e))
    }

    /// Stream Abort: the whole transaction (`subxid == xid`) or one
    /// subtransaction and everything spooled after its first change.
    pub fn abort(&mut self, xid: u32, subxid: u32) -> Result<(), SpoolError> {
        if self.open.is_some() {
            return Err(SpoolError::Protocol(
                "Stream Abort inside a streamed block".into(),
            ));
        }
        let path = self.path(xid);
        if xid == subxid {
            if self.txns.remove(&xid).is_some() {
                remove(&path)?;
            }
            return Ok(());
        }
        // A subtransaction without changes spooled (or already gone with a
        // parent) leaves nothing to undo.
        let Some(txn) = self.txns.get_mut(&xid) else {
            return Ok(());
        };
        let Some(i) = txn.subxacts.iter().rposition(|(s, _)| *s == subxid) else {
            return Ok(());
        };
        let offset = txn.subxacts[i].1;
        txn.subxacts.truncate(i);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(offset))
            .map_err(|e| io(&path, "truncating", e))?;
        txn.len = offset;
        Ok(())
    }

    /// Stream Commit: the transaction's messages in order, read back one at
    /// a time. The file stays until `finish`.
    pub fn replay(&mut self, xid: u32) -> Result<Replay, SpoolError> {
        if self.open.is_some() {
            return Err(SpoolError::Protocol(
                "Stream Commit inside a streamed block".into(),
            ));
        }
        let Some(txn) = self.txns.get(&xid) else {
            return Err(SpoolError::Protocol(format!(
                "Stream Commit of transaction {xid}, which was never streamed"
            )));
        };
        let path = self.path(xid);
        let file = File::open(&path).map_err(|e| io(&path, "opening", e))?;
        Ok(Replay {
            reader: BufReader::with_capacity(64 * 1024, file),
            left: txn.len,
            path,
        })
    }

    /// Forgets a transaction whose commit was applied (or failed: the
    /// session ends then and the source sends it again).
    pub fn finish(&mut self, xid: u32) -> Result<(), SpoolError> {
        if self.txns.remove(&xid).is_some() {
            remove(&self.path(xid))?;
        }
        Ok(())
    }

    /// Transactions spooled and not yet committed or aborted.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.txns.len()
    }
}

fn remove(path: &Path) -> Result<(), SpoolError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path, "removing", e)),
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.open = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The messages of one committed streamed transaction, read back in order.
pub struct Replay {
    reader: BufReader<File>,
    /// Bytes of the transaction not yet read (the file may hold no more).
    left: u64,
    path: PathBuf,
}

impl Iterator for Replay {
    /// (WAL start, message as received).
    type Item = Result<(u64, Bytes), SpoolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        Some(self.read_one())
    }
}

impl Replay {
    fn read_one(&mut self) -> Result<(u64, Bytes), SpoolError> {
        let short = |path: &Path| {
            SpoolError::Io(format!(
                "\"{}\" ends inside a record (the spool was changed under the connector)",
                path.display()
            ))
        };
        if self.left < HEADER {
            return Err(short(&self.path));
        }
        let mut head = [0u8; HEADER as usize];
        self.reader
            .read_exact(&mut head)
            .map_err(|e| io(&self.path, "reading", e))?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let mut at = [0u8; 8];
        at.copy_from_slice(&head[4..]);
        let wal_start = u64::from_be_bytes(at);
        if len as usize > MAX_RECORD || self.left - HEADER < u64::from(len) {
            return Err(short(&self.path));
        }
        let mut buf = vec![0u8; len as usize];
        self.reader
            .read_exact(&mut buf)
            .map_err(|e| io(&self.path, "reading", e))?;
        self.left -= HEADER + u64::from(len);
        Ok((wal_start, Bytes::from(buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("synchdb-spool-{}-{name}", std::process::id()))
    }

    fn replayed(s: &mut Spool, xid: u32) -> Vec<(u64, Vec<u8>)> {
        let rows = s.replay(xid).unwrap_or_else(|e| panic!("replay: {e}"));
        rows.map(|r| r.map(|(l, b)| (l, b.to_vec())))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_else(|e| panic!("replay: {e}"))
    }

    fn ok(r: Result<(), SpoolError>) {
        if let Err(e) = r {
            panic!("{e}");
        }
    }

    #[test]
    fn interleaved_transactions_replay_in_order() {
        let d = dir("interleave");
        let mut s = Spool::open(d.clone()).unwrap_or_else(|e| panic!("{e}"));
        ok(s.start(10, true));
        ok(s.write(Some(10), 1, b"a1"));
        ok(s.stop());
        ok(s.start(20, true));
        ok(s.write(Some(20), 2, b"b1"));
        ok(s.stop());
        ok(s.start(10, false));
        ok(s.write(Some(10), 3, b"a2"));
        ok(s.write(None, 4, b""));
        ok(s.stop());
        assert_eq!(s.pending(), 2);
        assert_eq!(
            replayed(&mut s, 10),
            vec![(1, b"a1".to_vec()), (3, b"a2".to_vec()), (4, vec![])]
        );
        ok(s.finish(10));
        ok(s.abort(20, 20));
        assert!(s.is_empty());
        assert_eq!(std::fs::read_dir(&d).map(|r| r.count()).unwrap_or(99), 0);
        drop(s);
        assert!(!d.exists());
    }

    #[test]
    fn subtransaction_abort_truncates() {
        let d = dir("subxact");
        let mut s = Spool::open(d).unwrap_or_else(|e| panic!("{e}"));
        ok(s.start(10, true));
        ok(s.write(Some(10), 1, b"top"));
        ok(s.write(Some(11), 2, b"sub1"));
        ok(s.stop());
        ok(s.start(10, false));
        ok(s.write(Some(12), 3, b"sub2 nested"));
        ok(s.write(Some(11), 4, b"sub1 again"));
        ok(s.stop());
        // sub2 aborts: it and what came after go.
        ok(s.abort(10, 12));
        assert_eq!(
            replayed(&mut s, 10),
            vec![(1, b"top".to_vec()), (2, b"sub1".to_vec())]
        );
        ok(s.start(10, false));
        ok(s.write(Some(13), 5, b"sub3"));
        ok(s.write(Some(10), 6, b"top again"));
        ok(s.stop());
        // An unknown subtransaction aborting changes nothing.
        ok(s.abort(10, 99));
        // sub1 aborts: sub3 (later) goes with it.
        ok(s.abort(10, 11));
        assert_eq!(replayed(&mut s, 10), vec![(1, b"top".to_vec())]);
        // sub3 was already cut off.
        ok(s.abort(10, 13));
        assert_eq!(replayed(&mut s, 10), vec![(1, b"top".to_vec())]);
        ok(s.start(10, false));
        ok(s.write(Some(14), 7, b"sub4"));
        ok(s.stop());
        assert_eq!(
            replayed(&mut s, 10),
            vec![(1, b"top".to_vec()), (7, b"sub4".to_vec())]
        );
    }

    #[test]
    fn first_block_again_replaces_and_stale_files_go() {
        let d = dir("restart");
        {
            let mut s = Spool::open(d.clone()).unwrap_or_else(|e| panic!("{e}"));
            ok(s.start(10, true));
            ok(s.write(Some(10), 1, b"old"));
            ok(s.stop());
            ok(s.start(10, true));
            ok(s.write(Some(10), 2, b"new"));
            ok(s.stop());
            assert_eq!(replayed(&mut s, 10), vec![(2, b"new".to_vec())]);
            // A worker killed leaves files behind (no Drop).
            std::mem::forget(s);
        }
        assert!(d.join("10.changes").exists());
        let s = Spool::open(d.clone()).unwrap_or_else(|e| panic!("{e}"));
        assert!(!d.join("10.changes").exists());
        assert!(s.is_empty());
    }

    #[test]
    fn protocol_errors() {
        let d = dir("protocol");
        let mut s = Spool::open(d).unwrap_or_else(|e| panic!("{e}"));
        let proto = |r: Result<(), SpoolError>| matches!(r, Err(SpoolError::Protocol(_)));
        assert!(proto(s.start(5, false)), "later block without a first");
        assert!(proto(s.write(Some(5), 1, b"x")), "change outside a block");
        assert!(proto(s.stop()), "stop outside a block");
        assert!(matches!(s.replay(5), Err(SpoolError::Protocol(_))));
        ok(s.start(5, true));
        assert!(proto(s.start(6, true)), "nested start");
        assert!(proto(s.abort(5, 5)), "abort inside a block");
        assert!(matches!(s.replay(5), Err(SpoolError::Protocol(_))));
        ok(s.stop());
        // Unknown transactions abort quietly (nothing of them was spooled).
        ok(s.abort(77, 77));
        ok(s.abort(77, 78));
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_panic() {
        let d = dir("damaged");
        let mut s = Spool::open(d.clone()).unwrap_or_else(|e| panic!("{e}"));
        ok(s.start(10, true));
        ok(s.write(Some(10), 1, b"abcdef"));
        ok(s.write(Some(10), 2, b"ghijkl"));
        ok(s.stop());
        let path = d.join("10.changes");
        let full = std::fs::read(&path).unwrap_or_default();
        for cut in 0..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap_or_else(|e| panic!("{e}"));
            let r: Result<Vec<_>, _> = match s.replay(10) {
                Ok(r) => r.collect(),
                Err(e) => Err(e),
            };
            assert!(r.is_err(), "cut at {cut}");
        }
        // A length beyond what the transaction holds.
        let mut bad = full.clone();
        bad[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        std::fs::write(&path, &bad).unwrap_or_else(|e| panic!("{e}"));
        let r: Result<Vec<_>, _> = match s.replay(10) {
            Ok(r) => r.collect(),
            Err(e) => Err(e),
        };
        assert!(matches!(r, Err(SpoolError::Io(_))));
    }

    #[test]
    fn connector_dir_is_hex() {
        assert_eq!(
            connector_dir(5, "a/../b"),
            Path::new("pg_synchdb/spool/5_612f2e2e2f62")
        );
    }
}
