//! The snapshot's reader: a second source connection inside the exported
//! snapshot, on a thread of its own, that runs each table's `COPY ... TO
//! STDOUT` and hands the rows to the worker's thread in large chunks. The
//! receiving, message parsing and batching of a copy then run beside the
//! load into the destination (on another core) instead of between its
//! parts; the worker's thread only copies each chunk into COPY FROM. A
//! copy is asked for before the destination table is prepared (the
//! request does not wait), so the source starts sending meanwhile.
//!
//! The thread never calls into PostgreSQL (no pgrx), and every signal is
//! blocked in it from its first instruction, so PostgreSQL's handlers only
//! ever run on the main thread. It holds the same snapshot as the worker's
//! own snapshot connection, so the rows are the same; before each COPY it
//! takes the table's lock with NOWAIT (a DDL queued behind the worker's
//! lock would otherwise wedge both). Anything that keeps it from starting
//! a copy — no free connection on the source, the lock, an error — makes
//! the worker copy that table, and the ones after it, on its own snapshot
//! connection as before; an error in the middle of a copy fails the copy
//! as an error of the inline path would. Any other lock the reader's COPY
//! waits for (an index's, a TOAST table's) is given up after
//! `lock_timeout` (1 s): PostgreSQL cannot see a wait between the worker's
//! two connections, so none may last.
//!
//! What is read ahead of the load is bounded in bytes
//! (`synchdb.snapshot_batch_bytes`, or one chunk when it is smaller or a
//! single row is larger).

use super::*;
use crate::control::worker::stopping;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};

/// Bytes of rows handed over at once.
const CHUNK: usize = 256 * 1024;
/// How long the worker waits, when done with the reader, for its thread to
/// end its transaction and close its connection.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How often a wait for the reader checks whether the worker is stopping.
const POLL: Duration = Duration::from_millis(250);

/// What the reader says about one copy, in order: `Started` or
/// `Unavailable`, then `Rows` until `End` or `Failed`.
enum Piece {
    Started,
    Unavailable(String),
    /// Rows as the destination reads them, with how many and their bytes
    /// as received.
    Rows {
        data: Bytes,
        rows: u64,
        bytes: u64,
    },
    End,
    Failed(String),
}

struct Request {
    /// The table, schema-qualified and quoted, to lock before the copy.
    table: String,
    sql: String,
    /// Binary format: per column, whether it is `char(n)`.
    trim: Option<Vec<bool>>,
    out: Sender<Piece>,
    budget: Arc<Budget>,
}

/// The bytes handed over and not yet taken by the load.
struct Budget {
    /// Bytes in flight at most (one chunk is always let through).
    limit: usize,
    /// (bytes in flight, the taking side is gone)
    state: Mutex<(usize, bool)>,
    changed: Condvar,
}

impl Budget {
    fn new(limit: usize) -> Budget {
        Budget {
            limit,
            state: Mutex::new((0, false)),
            changed: Condvar::new(),
        }
    }

    /// Waits until `n` more bytes may be handed over (always when nothing
    /// is in flight); false when the taking side is gone.
    fn acquire(&self, n: usize) -> bool {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !g.1 && g.0 > 0 && g.0.saturating_add(n) > self.limit {
            g = self.changed.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if g.1 {
            return false;
        }
        g.0 += n;
        true
    }

    fn release(&self, n: usize) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = g.0.saturating_sub(n);
        self.changed.notify_all();
    }

    fn close(&self) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        g.1 = true;
        self.changed.notify_all();
    }
}

/// The worker's handle on the reader; dropping it ends the reader's
/// transaction and connection, waiting a little for the thread to close it
/// (so the connection is free for what comes next).
pub(super) struct Reader {
    requests: Option<Sender<Request>>,
    ended: Option<Receiver<()>>,
    /// Set by a feed whose copy the reader could not start.
    dead: Arc<AtomicBool>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(ended) = self.ended.take() {
            let _ = ended.recv_timeout(CLOSE_WAIT);
        }
    }
}

impl Reader {
    /// A reader that copies nothing.
    fn none() -> Reader {
        Reader {
            requests: None,
            ended: None,
            dead: Arc::default(),
        }
    }

    /// Starts the reader's thread, which connects and imports `snapshot`
    /// while the worker goes on (the first copy's first read waits for it). Not `enabled`:
    /// a reader that copies nothing (every table on the snapshot connection).
    pub(super) fn start(info: &ConnInfo, snapshot: &str, enabled: bool) -> Reader {
        if !enabled {
            // synchdb.snapshot_reader = off.
            return Reader::none();
        }
        let (tx, rx) = mpsc::channel::<Request>();
        let (ended_tx, ended) = mpsc::channel::<()>();
        let info = info.clone();
        let snapshot = snapshot.to_string();
        // The new thread inherits the signal mask of the one creating it:
        // block everything around the spawn, so no signal can reach it
        // before it runs.
        let spawned = with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("synchdb reader".into())
                .spawn(move || {
                    serve(info, snapshot, rx);
                    let _ = ended_tx.send(());
                })
        });
        match spawned {
            Ok(_) => Reader {
                requests: Some(tx),
                ended: Some(ended),
                dead: Arc::default(),
            },
            Err(e) => {
                pgrx::log!("synchdb: snapshot reader not started ({e}); copying on the snapshot connection");
                Reader::none()
            }
        }
    }

    /// Asks the reader to copy `sql` (a COPY ... TO STDOUT of `table`;
    /// `trim` when in the binary format, which columns are `char(n)`), and
    /// returns at once: the source starts the COPY while the worker
    /// prepares the destination table. `None` when there is no reader (the
    /// caller copies the table itself); whether the reader could start is
    /// known at the feed's first `next`.
    pub(super) fn copy(
        &mut self,
        table: &TableRef,
        sql: &str,
        trim: Option<Vec<bool>>,
    ) -> Option<ReaderFeed> {
        if self.dead.load(Ordering::Relaxed) {
            self.requests = None;
        }
        let requests = self.requests.as_ref()?;
        let (out, rx) = mpsc::channel();
        let budget = Arc::new(Budget::new(gucs::snapshot_batch_bytes()));
        let sent = requests.send(Request {
            table: sqlgen::qualified(&table.schema, &table.table),
            sql: sql.to_string(),
            trim,
            out,
            budget: budget.clone(),
        });
        if sent.is_err() {
            self.requests = None;
            return None;
        }
        Some(ReaderFeed {
            rx,
            budget,
            started: false,
            ended: false,
            dead: self.dead.clone(),
        })
    }
}

/// What a reader's feed has next.
pub(super) enum Next {
    Rows(Bytes),
    End,
    /// The reader could not start this copy (why): copy it on the snapshot
    /// connection. The reader copies nothing more.
    NotStarted(String),
}

/// The rows of one copy as the reader hands them over.
pub(super) struct ReaderFeed {
    rx: Receiver<Piece>,
    budget: Arc<Budget>,
    started: bool,
    ended: bool,
    /// Shared with the `Reader`: set when a copy could not start.
    dead: Arc<AtomicBool>,
}

impl Drop for ReaderFeed {
    fn drop(&mut self) {
        // A reader waiting to hand over more gives up.
        self.budget.close();
    }
}

impl ReaderFeed {
    /// The next chunk; `on_batch(rows, bytes)` is told of each.
    pub(super) fn next(&mut self, on_batch: &mut dyn FnMut(u64, u64)) -> Result<Next, String> {
        if self.ended {
            return Ok(Next::End);
        }
        loop {
            if stopping() {
                return Err("the connector is stopping".into());
            }
            let piece = match self.rx.recv_timeout(POLL) {
                Ok(p) => p,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) if !self.started => {
                    // The thread ended before this copy (after a copy that
                    // could not start).
                    self.dead.store(true, Ordering::Relaxed);
                    return Ok(Next::NotStarted("the reader has ended".into()));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("the snapshot reader ended in the middle of a copy".into())
                }
            };
            match piece {
                Piece::Started if !self.started => self.started = true,
                Piece::Unavailable(why) if !self.started => {
                    self.dead.store(true, Ordering::Relaxed);
                    return Ok(Next::NotStarted(why));
                }
                Piece::Rows { data, rows, bytes } if self.started => {
                    self.budget.release(data.len());
                    on_batch(rows, bytes);
                    return Ok(Next::Rows(data));
                }
                Piece::End if self.started => {
                    self.ended = true;
                    return Ok(Next::End);
                }
                Piece::Failed(e) if self.started => return Err(e),
                _ => return Err("the snapshot reader broke its protocol".into()),
            }
        }
    }
}

fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    let old = source::block_signals();
    let r = f();
    // SAFETY: restores the calling thread's own previous mask.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    r
}

/// The reader's thread: no pgrx from here on.
fn serve(info: ConnInfo, snapshot: String, requests: Receiver<Request>) {
    let unavailable = |why: String| {
        // Tell whoever asks first why there is no reader.
        if let Ok(req) = requests.recv() {
            let _ = req.out.send(Piece::Unavailable(why));
        }
    };
    let rt = match source::runtime() {
        Ok(rt) => rt,
        Err(e) => return unavailable(e.to_string()),
    };
    let mut cfg = super::stream::replication_config(&info);
    cfg.replication = false;
    let opened = rt.block_on(async {
        let mut session = replication::Session::connect(&cfg).await?;
        session
            .simple_query(&format!(
                "SET idle_in_transaction_session_timeout = 0; SET lock_timeout = '1s'; {}",
                source::begin_in_snapshot(&snapshot)
            ))
            .await?;
        Ok::<_, replication::ReplError>(session)
    });
    let mut session = match opened {
        Ok(s) => s,
        Err(e) => return unavailable(e.to_string()),
    };
    while let Ok(req) = requests.recv() {
        // The lock and the COPY in one message (one round trip).
        let started = rt.block_on(session.start_copy_out(&format!(
            "LOCK TABLE {} IN ACCESS SHARE MODE NOWAIT; {}",
            req.table, req.sql
        )));
        if let Err(e) = started {
            // The transaction is aborted: this reader is done.
            let _ = req.out.send(Piece::Unavailable(e.to_string()));
            return;
        }
        if req.out.send(Piece::Started).is_err() {
            return;
        }
        // Waits while the load is AHEAD behind; the source waits on TCP
        // meanwhile.
        let budget = req.budget.clone();
        let mut sink = |data: Bytes, rows: u64, bytes: u64| {
            budget.acquire(data.len()) && req.out.send(Piece::Rows { data, rows, bytes }).is_ok()
        };
        let mut trimmer =
            crate::source::binary_copy::BlankTrimmer::new(req.trim.unwrap_or_default());
        let mut append = |msg: &[u8], out: &mut bytes::BytesMut| trimmer.append(msg, out);
        match rt.block_on(session.copy_data(CHUNK, &mut append, &mut sink)) {
            Ok(true) => {
                if req.out.send(Piece::End).is_err() {
                    return;
                }
            }
            Ok(false) => return,
            Err(e) => {
                let _ = req.out.send(Piece::Failed(e.to_string()));
                return;
            }
        }
    }
    // The worker is done with the snapshot: end the transaction.
    let _ = rt.block_on(session.simple_query("COMMIT"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_bounds_bytes_ahead_but_always_lets_one_chunk_through() {
        const AHEAD: usize = 2 * 1024 * 1024;
        let b = Arc::new(Budget::new(AHEAD));
        // A chunk larger than the whole budget passes when nothing is ahead.
        assert!(b.acquire(AHEAD * 3));
        // The next waits until the load takes it.
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.acquire(CHUNK))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        b.release(AHEAD * 3);
        assert!(waiter.join().expect("waiter"));
        // Up to AHEAD in flight without waiting.
        let mut n = CHUNK;
        while n + CHUNK <= AHEAD {
            assert!(b.acquire(CHUNK));
            n += CHUNK;
        }
        // The load going away ends a wait with false.
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.acquire(CHUNK))
        };
        std::thread::sleep(Duration::from_millis(50));
        b.close();
        assert!(!waiter.join().expect("waiter"));
        assert!(!b.acquire(1));
    }
}
