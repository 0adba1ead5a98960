//! The replication-protocol client: a walsender session on the source
//! (TLS as the connector's sslmode says, through `crate::source::tls`; startup with
//! `replication=database`; SCRAM-SHA-256, with channel binding
//! (SCRAM-SHA-256-PLUS) over TLS, MD5 or password authentication, the
//! password never sent in cleartext over an unencrypted connection unless
//! allowed), simple queries on it (`CREATE_REPLICATION_SLOT ...
//! EXPORT_SNAPSHOT`), and `START_REPLICATION` with the pgoutput options the
//! server's version accepts. Once streaming, a task on the worker's runtime
//! reads the socket, hands `XLogData` and keepalives to the worker through a
//! bounded channel, and sends standby status updates with the position the
//! worker has made durable. Messages are framed here (with a size limit),
//! never trusted for their claimed length; message building and the SCRAM
//! exchange come from `postgres-protocol`.

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::frontend;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

/// The largest backend message accepted (a pgoutput message carries at
/// most one row; a row is at most about 1 GB of values plus framing).
const MAX_MESSAGE: usize = (1 << 30) + (64 << 20);

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplError {
    #[error("{0}")]
    Io(String),
    #[error("server error: {message} (SQLSTATE {code})")]
    Server { message: String, code: String },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("{0}")]
    CleartextRefused(crate::source::tls::CleartextRefused),
}

impl ReplError {
    /// Whether a plain connection failed in a way TLS may fix (sslmode
    /// allow tries TLS next): pg_hba.conf turned it away (SQLSTATE class
    /// 28), or the server asked for a cleartext password.
    fn rejects_plain(&self) -> bool {
        match self {
            ReplError::Server { code, .. } => code.starts_with("28"),
            ReplError::CleartextRefused(_) => true,
            _ => false,
        }
    }
}

fn io(e: std::io::Error) -> ReplError {
    if crate::source::tls::is_cleartext_refusal(&e) {
        return ReplError::CleartextRefused(crate::source::tls::CleartextRefused);
    }
    ReplError::Io(e.to_string())
}

/// Where and how to open a replication session. The password is only
/// used for authentication and never printed.
#[derive(Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub dbname: String,
    pub application_name: String,
    /// Session settings (`-c name=value ...`).
    pub options: String,
    /// sslmode and the PEM files (read at each connection).
    pub tls: crate::source::tls::Options,
    /// A walsender session (`replication=database`); false opens a normal
    /// session (the snapshot reader's).
    pub replication: bool,
}

/// One frame of the backend protocol: type byte and body.
type Frame = (u8, Bytes);

/// The length a message's 5-byte header (type byte, length) claims,
/// refused outside 4 ..= MAX_MESSAGE.
fn claimed_length(head: &[u8; 5]) -> Result<usize, ReplError> {
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    usize::try_from(len)
        .ok()
        .filter(|l| (4..=MAX_MESSAGE).contains(l))
        .ok_or_else(|| {
            ReplError::Protocol(format!("message '{}' claims length {len}", head[0] as char))
        })
}

/// Takes one complete message off the front of `buf`, if there is one.
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ReplError> {
    let Some(head) = buf.first_chunk::<5>() else {
        return Ok(None);
    };
    let len = claimed_length(head)?;
    if buf.len() < 1 + len {
        // Room for more of it, grown as the data arrives (a claimed length
        // reserves at most 1 MB ahead of what was received).
        buf.reserve((1 + len - buf.len()).min(1 << 20));
        return Ok(None);
    }
    let mut frame = buf.split_to(1 + len).freeze();
    let tag = frame[0];
    frame.advance(5);
    Ok(Some((tag, frame)))
}

/// Bytes asked of the socket at once while a COPY's data arrives.
const COPY_READ: usize = 256 * 1024;

/// What one pass of `scan_copy_out` over received bytes found.
#[derive(Debug, Default)]
pub struct CopyScan {
    /// Bytes of complete messages consumed from the front.
    pub consumed: usize,
    /// CopyData messages whose payloads were appended.
    pub rows: u64,
    /// Their payloads' bytes as received.
    pub bytes: u64,
    /// The server's error, when it sent one.
    pub error: Option<ReplError>,
    /// CopyDone seen.
    pub copy_done: bool,
    /// CommandComplete seen.
    pub complete: bool,
    /// ReadyForQuery seen: the statement is over.
    pub ready: bool,
    /// When the pass stopped at an incomplete message (the first byte not
    /// consumed): its size in all (0 when even its header is incomplete).
    pub need: usize,
}

/// Walks the complete messages at the front of `buf`, received while a
/// COPY sends its data, handing the payloads of CopyData messages to
/// `append` (with `out`) in place (no message is split off or allocated),
/// until `out` holds `limit` bytes, a message is incomplete, or
/// ReadyForQuery. Claimed lengths are checked as in `take_frame`.
pub fn scan_copy_out(
    buf: &[u8],
    out: &mut BytesMut,
    limit: usize,
    append: &mut dyn FnMut(&[u8], &mut BytesMut),
) -> Result<CopyScan, ReplError> {
    let mut scan = CopyScan::default();
    let mut at = 0usize;
    while out.len() < limit {
        let Some(head) = buf.get(at..).and_then(|b| b.first_chunk::<5>()) else {
            break;
        };
        let tag = head[0];
        let len = claimed_length(head)?;
        let Some(body) = buf.get(at + 5..at + 1 + len) else {
            scan.need = 1 + len;
            break;
        };
        match tag {
            b'd' => {
                append(body, out);
                scan.rows += 1;
                scan.bytes += body.len() as u64;
            }
            b'E' if scan.error.is_none() => scan.error = Some(parse_error(body)),
            b'c' => scan.copy_done = true,
            b'C' => scan.complete = true,
            b'Z' => {
                scan.ready = true;
                at += 1 + len;
                break;
            }
            // Notices, parameter status, notifications.
            _ => {}
        }
        at += 1 + len;
    }
    scan.consumed = at;
    Ok(scan)
}

/// The message and SQLSTATE of an ErrorResponse body.
pub fn parse_error(body: &[u8]) -> ReplError {
    let mut message = String::new();
    let mut code = String::new();
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match field {
            b'M' => message = value,
            b'C' => code = value,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    ReplError::Server { message, code }
}

fn be_u64(b: &[u8], at: usize) -> Result<u64, ReplError> {
    b.get(at..at + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| ReplError::Protocol("truncated replication message".into()))
}

struct Conn {
    stream: crate::source::tls::Stream,
    buf: BytesMut,
    out: BytesMut,
}

impl Conn {
    async fn flush_out(&mut self) -> Result<(), ReplError> {
        let out = self.out.split();
        self.stream.write_all(&out).await.map_err(io)
    }

    async fn frame(&mut self) -> Result<Frame, ReplError> {
        loop {
            if let Some(f) = take_frame(&mut self.buf)? {
                return Ok(f);
            }
            self.buf.reserve(8192);
            let n = self.stream.read_buf(&mut self.buf).await.map_err(io)?;
            if n == 0 {
                return Err(ReplError::Io("the source closed the connection".into()));
            }
        }
    }
}

/// A replication session before streaming.
pub struct Session {
    conn: Conn,
    /// `server_version_num` of the server, from its `server_version`
    /// parameter status at startup.
    server_version: Option<i32>,
}

impl Session {
    /// Connects and authenticates (10 s limit).
    pub async fn connect(cfg: &Config) -> Result<Session, ReplError> {
        tokio::time::timeout(Duration::from_secs(10), Session::connect_inner(cfg))
            .await
            .map_err(|_| ReplError::Io("timed out connecting to the source".into()))?
    }

    async fn connect_inner(cfg: &Config) -> Result<Session, ReplError> {
        let connector =
            crate::source::tls::Connector::new(&cfg.tls, &cfg.host).map_err(ReplError::Io)?;
        let attempts = connector.attempts();
        let mut last = ReplError::Io("no connection attempt was made".into());
        for (i, attempt) in attempts.iter().enumerate() {
            let stream = connector
                .open(&cfg.host, cfg.port, *attempt)
                .await
                .map_err(ReplError::Io)?;
            match Session::startup(cfg, stream).await {
                Ok(s) => return Ok(s),
                // sslmode allow: the plain connection was turned away; TLS next.
                Err(e) if i + 1 < attempts.len() && e.rejects_plain() => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// The startup message and authentication on an open stream.
    async fn startup(
        cfg: &Config,
        stream: crate::source::tls::Stream,
    ) -> Result<Session, ReplError> {
        let mut conn = Conn {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
            out: BytesMut::new(),
        };
        let mut params: Vec<(&str, &str)> = vec![
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            ("client_encoding", "UTF8"),
            ("application_name", cfg.application_name.as_str()),
        ];
        if cfg.replication {
            params.push(("replication", "database"));
        }
        if !cfg.options.is_empty() {
            params.push(("options", cfg.options.as_str()));
        }
        frontend::startup_message(params, &mut conn.out).map_err(io)?;
        conn.flush_out().await?;
        let mut scram: Option<ScramSha256> = None;
        // SCRAM started and the server's signature checked (SASL final).
        let mut scram_verified = false;
        let mut server_version = None;
        loop {
            let (tag, body) = conn.frame().await?;
            match tag {
                b'R' => {
                    let code = body
                        .get(..4)
                        .and_then(|s| <[u8; 4]>::try_from(s).ok())
                        .map(i32::from_be_bytes)
                        .ok_or_else(|| {
                            ReplError::Protocol("short authentication request".into())
                        })?;
                    let data = &body[4..];
                    match code {
                        0 => {
                            if scram.is_some() && !scram_verified {
                                return Err(ReplError::Protocol(
                                    "the source did not prove it knows the password \
                                     (authentication ended before its SCRAM signature)"
                                        .into(),
                                ));
                            }
                        }
                        3 => {
                            // The stream's guard refuses this already; kept
                            // here so no other path can send it: only to a
                            // source whose certificate is verified, unless
                            // allowed.
                            if !conn.stream.verified() && !cfg.tls.allow_cleartext_password {
                                return Err(ReplError::CleartextRefused(
                                    crate::source::tls::CleartextRefused,
                                ));
                            }
                            frontend::password_message(cfg.password.as_bytes(), &mut conn.out)
                                .map_err(io)?;
                        }
                        5 => {
                            let salt = <[u8; 4]>::try_from(data.get(..4).unwrap_or(&[]))
                                .map_err(|_| ReplError::Protocol("short MD5 salt".into()))?;
                            let hash = md5_hash(cfg.user.as_bytes(), cfg.password.as_bytes(), salt);
                            frontend::password_message(hash.as_bytes(), &mut conn.out)
                                .map_err(io)?;
                        }
                        10 => {
                            let offers =
                                |name: &str| data.split(|b| *b == 0).any(|m| m == name.as_bytes());
                            let (mechanism, binding) = sasl_choice(
                                conn.stream.is_tls(),
                                conn.stream.end_point(),
                                offers(SCRAM_SHA_256_PLUS),
                                offers(SCRAM_SHA_256),
                            )?;
                            let s = ScramSha256::new(cfg.password.as_bytes(), binding);
                            frontend::sasl_initial_response(mechanism, s.message(), &mut conn.out)
                                .map_err(io)?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                ReplError::Protocol("SASL continue without a SASL start".into())
                            })?;
                            s.update(data)
                                .map_err(|e| ReplError::Protocol(e.to_string()))?;
                            frontend::sasl_response(s.message(), &mut conn.out).map_err(io)?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                ReplError::Protocol("SASL final without a SASL start".into())
                            })?;
                            s.finish(data)
                                .map_err(|e| ReplError::Protocol(e.to_string()))?;
                            scram_verified = true;
                        }
                        other => {
                            return Err(ReplError::Protocol(format!(
                                "the source asks for an unsupported authentication method ({other})"
                            )))
                        }
                    }
                    if !conn.out.is_empty() {
                        conn.flush_out().await?;
                    }
                }
                b'E' => return Err(parse_error(&body)),
                b'S' => {
                    let mut parts = body.split(|b| *b == 0);
                    if parts.next() == Some(b"server_version".as_slice()) {
                        server_version = parts
                            .next()
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .and_then(parse_server_version);
                    }
                }
                b'Z' => {
                    return Ok(Session {
                        conn,
                        server_version,
                    })
                }
                _ => {}
            }
        }
    }

    /// The server's version as `server_version_num` (e.g. 150004), when it
    /// said at startup.
    pub fn server_version(&self) -> Option<i32> {
        self.server_version
    }

    /// Runs one statement; returns its rows as text (NULL as `None`).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ReplError> {
        frontend::query(sql, &mut self.conn.out).map_err(io)?;
        self.conn.flush_out().await?;
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            let (tag, body) = self.conn.frame().await?;
            match tag {
                b'D' => rows.push(parse_data_row(&body)?),
                b'E' => failure = Some(parse_error(&body)),
                b'Z' => {
                    return match failure {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                _ => {}
            }
        }
    }

    /// Sends `sql`, ending in a `COPY ... TO STDOUT` (statements before it
    /// may come in the same message), and waits for the server to start
    /// sending its data (then `copy_data` reads it). The server's error if
    /// it refused.
    pub async fn start_copy_out(&mut self, sql: &str) -> Result<(), ReplError> {
        frontend::query(sql, &mut self.conn.out).map_err(io)?;
        self.conn.flush_out().await?;
        loop {
            let (tag, body) = self.conn.frame().await?;
            match tag {
                b'H' => return Ok(()),
                b'E' => {
                    // The server's error, also when it then closes.
                    let e = parse_error(&body);
                    while let Ok((tag, _)) = self.conn.frame().await {
                        if tag == b'Z' {
                            break;
                        }
                    }
                    return Err(e);
                }
                b'Z' => {
                    return Err(ReplError::Protocol(
                        "the statement sent no COPY data".into(),
                    ))
                }
                b'G' | b'W' | b'd' => {
                    return Err(ReplError::Protocol(format!(
                        "unexpected message '{}' before the COPY's data",
                        tag as char
                    )))
                }
                _ => {}
            }
        }
    }

    /// Reads the data of the COPY `start_copy_out` started, handing the
    /// payloads of its CopyData messages (each appended by `append`) to
    /// `sink`, concatenated in chunks of about `chunk` bytes, with how many
    /// messages and payload bytes each holds. Returns
    /// false when `sink` refused a chunk (the session is then in the middle
    /// of the COPY and can only be dropped); the server's error if it ended
    /// the COPY with one.
    pub async fn copy_data(
        &mut self,
        chunk: usize,
        append: &mut dyn FnMut(&[u8], &mut BytesMut),
        sink: &mut dyn FnMut(Bytes, u64, u64) -> bool,
    ) -> Result<bool, ReplError> {
        let mut out = BytesMut::with_capacity(chunk + 8192);
        let (mut rows, mut bytes) = (0u64, 0u64);
        let mut failure = None;
        let (mut copy_done, mut complete) = (false, false);
        loop {
            let scan = scan_copy_out(&self.conn.buf, &mut out, chunk, append)?;
            self.conn.buf.advance(scan.consumed);
            rows += scan.rows;
            bytes += scan.bytes;
            copy_done |= scan.copy_done;
            complete |= scan.complete;
            if failure.is_none() {
                failure = scan.error;
            }
            if scan.ready {
                if let Some(e) = failure {
                    return Err(e);
                }
                // All the data, and the server saying so.
                if !(copy_done && complete) {
                    return Err(ReplError::Protocol(
                        "the COPY ended without CopyDone and CommandComplete".into(),
                    ));
                }
                return Ok(out.is_empty() || sink(out.split().freeze(), rows, bytes));
            }
            if out.len() >= chunk {
                if !sink(out.split().freeze(), rows, bytes) {
                    return Ok(false);
                }
                (rows, bytes) = (0, 0);
                out.reserve(chunk + 8192);
                continue;
            }
            // The next message is not complete: room for more of it (a
            // claimed length reserves at most 1 MB ahead), read.
            let missing = scan.need.saturating_sub(self.conn.buf.len()).min(1 << 20);
            self.conn.buf.reserve(missing.max(COPY_READ));
            let n = self
                .conn
                .stream
                .read_buf(&mut self.conn.buf)
                .await
                .map_err(io)?;
            if n == 0 {
                return Err(failure
                    .unwrap_or_else(|| ReplError::Io("the source closed the connection".into())));
            }
        }
    }

    /// Starts streaming from `slot` at `start` with the given pgoutput
    /// options (the text inside the parentheses).
    pub async fn start(
        mut self,
        slot: &str,
        start: u64,
        plugin_options: &str,
        buffer: usize,
    ) -> Result<Stream, ReplError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({plugin_options})",
            quote_ident(slot),
            crate::lsn::format_lsn(start)
        );
        frontend::query(&sql, &mut self.conn.out).map_err(io)?;
        self.conn.flush_out().await?;
        loop {
            let (tag, body) = self.conn.frame().await?;
            match tag {
                b'W' => break,
                b'E' => return Err(parse_error(&body)),
                b'Z' => {
                    return Err(ReplError::Protocol(
                        "START_REPLICATION ended without streaming".into(),
                    ))
                }
                _ => {}
            }
        }
        let shared = Arc::new(Shared {
            last_wal_end: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            notify: Notify::new(),
        });
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let task = tokio::spawn(stream_task(self.conn, tx, shared.clone()));
        Ok(Stream { rx, shared, task })
    }
}

/// Which SCRAM mechanism to use, as libpq: with TLS and the server's
/// offer, SCRAM-SHA-256-PLUS bound to the server certificate
/// (tls-server-end-point); with TLS but no offer, plain SCRAM saying the
/// client could bind ('y', so a downgrade is detected); without TLS, 'n'.
/// Over TLS never 'n' (a man in the middle could relay it): TLS without
/// binding data is an error.
fn sasl_choice(
    tls: bool,
    end_point: Option<&[u8]>,
    offers_plus: bool,
    offers_plain: bool,
) -> Result<(&'static str, ChannelBinding), ReplError> {
    match end_point {
        Some(h) if offers_plus => Ok((
            SCRAM_SHA_256_PLUS,
            ChannelBinding::tls_server_end_point(h.to_vec()),
        )),
        Some(_) if offers_plain => Ok((SCRAM_SHA_256, ChannelBinding::unrequested())),
        None if tls => Err(ReplError::Protocol(
            "no channel binding data for the TLS connection".into(),
        )),
        None if offers_plain => Ok((SCRAM_SHA_256, ChannelBinding::unsupported())),
        _ => Err(ReplError::Protocol(
            "the source offers no supported SASL mechanism".into(),
        )),
    }
}

/// `server_version_num` from the `server_version` parameter ("15.4",
/// "16beta1", "13.12 (Debian 13.12-1)", "9.6.24"); None when unreadable.
pub fn parse_server_version(v: &str) -> Option<i32> {
    let num = |s: &str| -> Option<i32> {
        let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    };
    let mut parts = v.trim().split('.');
    let major = num(parts.next()?)?;
    let minor = parts.next().and_then(num).unwrap_or(0);
    if major >= 10 {
        Some(major.checked_mul(10000)?.checked_add(minor)?)
    } else {
        let patch = parts.next().and_then(num).unwrap_or(0);
        Some(major * 10000 + minor * 100 + patch)
    }
}

/// A replication identifier, double-quoted.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A string literal of the replication grammar.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, ReplError> {
    let short = || ReplError::Protocol("truncated data row".into());
    let n = i16::from_be_bytes(
        <[u8; 2]>::try_from(body.get(..2).ok_or_else(short)?).map_err(|_| short())?,
    );
    let mut at = 2usize;
    let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for _ in 0..n {
        let len = i32::from_be_bytes(
            <[u8; 4]>::try_from(body.get(at..at + 4).ok_or_else(short)?).map_err(|_| short())?,
        );
        at += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let end = at + usize::try_from(len).map_err(|_| short())?;
        let v = body.get(at..end).ok_or_else(short)?;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
        at = end;
    }
    Ok(out)
}

/// What the stream delivers.
#[derive(Debug)]
pub enum Event {
    /// One pgoutput message.
    XLogData {
        wal_start: u64,
        wal_end: u64,
        data: Bytes,
    },
    /// The server's keepalive: everything before `wal_end` has been sent.
    KeepAlive { wal_end: u64 },
}

struct Shared {
    last_wal_end: AtomicU64,
    applied: AtomicU64,
    notify: Notify,
}

/// A running replication stream.
pub struct Stream {
    rx: mpsc::Receiver<Result<Event, ReplError>>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream {
    /// The next event; `None` when the server ended the stream.
    pub async fn recv(&mut self) -> Result<Option<Event>, ReplError> {
        match self.rx.recv().await {
            Some(Ok(ev)) => Ok(Some(ev)),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }

    /// Whether an event is already buffered (`recv` would not wait).
    pub fn has_buffered(&self) -> bool {
        !self.rx.is_empty()
    }

    /// Reports `lsn` as applied and durable here (never moves back).
    pub fn update_applied_lsn(&self, lsn: u64) {
        if self.shared.applied.fetch_max(lsn, Ordering::Relaxed) < lsn {
            self.shared.notify.notify_one();
        }
    }

    /// The furthest WAL end the server has announced.
    pub fn last_wal_end(&self) -> u64 {
        self.shared.last_wal_end.load(Ordering::Relaxed)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now_pg_micros() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    unix - PG_EPOCH_OFFSET_US
}

fn status_update(applied: u64, reply: bool, out: &mut BytesMut) -> Result<(), ReplError> {
    let mut body = Vec::with_capacity(34);
    body.push(b'r');
    for _ in 0..3 {
        body.extend_from_slice(&applied.to_be_bytes());
    }
    body.extend_from_slice(&now_pg_micros().to_be_bytes());
    body.push(u8::from(reply));
    frontend::CopyData::new(&body[..]).map_err(io)?.write(out);
    Ok(())
}

/// One CopyData payload of the stream.
pub fn parse_copy_data(body: Bytes) -> Result<Option<(Event, bool)>, ReplError> {
    match body.first() {
        Some(b'w') => {
            let wal_start = be_u64(&body, 1)?;
            let wal_end = be_u64(&body, 9)?;
            if body.len() < 25 {
                return Err(ReplError::Protocol("truncated XLogData".into()));
            }
            Ok(Some((
                Event::XLogData {
                    wal_start,
                    wal_end,
                    data: body.slice(25..),
                },
                false,
            )))
        }
        Some(b'k') => {
            let wal_end = be_u64(&body, 1)?;
            let reply = *body
                .get(17)
                .ok_or_else(|| ReplError::Protocol("truncated keepalive".into()))?
                != 0;
            Ok(Some((Event::KeepAlive { wal_end }, reply)))
        }
        Some(_) => Ok(None),
        None => Err(ReplError::Protocol("empty CopyData".into())),
    }
}

async fn stream_task(
    mut conn: Conn,
    tx: mpsc::Sender<Result<Event, ReplError>>,
    shared: Arc<Shared>,
) {
    let r = stream_loop(&mut conn, &tx, &shared).await;
    if let Err(e) = r {
        let _ = tx.send(Err(e)).await;
    }
}

async fn stream_loop(
    conn: &mut Conn,
    tx: &mpsc::Sender<Result<Event, ReplError>>,
    shared: &Shared,
) -> Result<(), ReplError> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent_applied = 0u64;
    loop {
        while let Some((tag, body)) = take_frame(&mut conn.buf)? {
            match tag {
                b'd' => {
                    let Some((ev, reply)) = parse_copy_data(body)? else {
                        continue;
                    };
                    let end = match &ev {
                        Event::XLogData { wal_end, .. } | Event::KeepAlive { wal_end } => *wal_end,
                    };
                    shared.last_wal_end.fetch_max(end, Ordering::Relaxed);
                    if reply {
                        let applied = shared.applied.load(Ordering::Relaxed);
                        status_update(applied, false, &mut conn.out)?;
                        conn.flush_out().await?;
                        sent_applied = applied;
                    }
                    // While the worker is busy (or paused) and the channel
                    // full, keep telling the server we are alive.
                    let permit = loop {
                        tokio::select! {
                            p = tx.reserve() => break p,
                            _ = tick.tick() => {
                                let applied = shared.applied.load(Ordering::Relaxed);
                                status_update(applied, false, &mut conn.out)?;
                                conn.flush_out().await?;
                                sent_applied = applied;
                            }
                        }
                    };
                    match permit {
                        Ok(p) => p.send(Ok(ev)),
                        Err(_) => return Ok(()),
                    }
                }
                b'E' => return Err(parse_error(&body)),
                // CopyDone: the server ends the stream.
                b'c' => return Ok(()),
                _ => {}
            }
        }
        if conn.buf.capacity() > 16 << 20 && conn.buf.len() < 1 << 20 {
            // After a huge message: do not keep its buffer for the rest of
            // the stream.
            conn.buf = BytesMut::from(&conn.buf[..]);
        }
        conn.buf.reserve(64 * 1024);
        tokio::select! {
            r = conn.stream.read_buf(&mut conn.buf) => {
                if r.map_err(io)? == 0 {
                    return Err(ReplError::Io("the source closed the replication connection".into()));
                }
            }
            _ = tick.tick() => {
                let applied = shared.applied.load(Ordering::Relaxed);
                status_update(applied, false, &mut conn.out)?;
                conn.flush_out().await?;
                sent_applied = applied;
            }
            _ = shared.notify.notified() => {
                let applied = shared.applied.load(Ordering::Relaxed);
                if applied != sent_applied {
                    status_update(applied, false, &mut conn.out)?;
                    conn.flush_out().await?;
                    sent_applied = applied;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert_eq!(parse_server_version("15.4"), Some(150004));
        assert_eq!(
            parse_server_version("13.12 (Debian 13.12-1.pgdg120+1)"),
            Some(130012)
        );
        assert_eq!(parse_server_version("16beta1"), Some(160000));
        assert_eq!(parse_server_version("18.0"), Some(180000));
        assert_eq!(parse_server_version("10.23"), Some(100023));
        assert_eq!(parse_server_version("9.6.24"), Some(90624));
        assert_eq!(parse_server_version(""), None);
        assert_eq!(parse_server_version("x.y"), None);
        assert_eq!(parse_server_version("99999999999.1"), None);
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(i32::try_from(body.len() + 4).unwrap_or(0)).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_split_anywhere() {
        let mut all = frame(b'Z', b"I");
        all.extend(frame(b'd', b"kabcdefgh12345678\x01"));
        for cut in 0..all.len() {
            let mut buf = BytesMut::from(&all[..cut]);
            let mut got = Vec::new();
            while let Some(f) = take_frame(&mut buf).expect("valid") {
                got.push(f);
            }
            buf.extend_from_slice(&all[cut..]);
            while let Some(f) = take_frame(&mut buf).expect("valid") {
                got.push(f);
            }
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(got[0].0, b'Z');
            assert_eq!(&got[1].1[..], b"kabcdefgh12345678\x01");
        }
    }

    #[test]
    fn absurd_lengths_are_refused_without_allocating() {
        for len in [-1i32, 0, 3, i32::MAX] {
            let mut buf = BytesMut::from(&[b'd'][..]);
            buf.extend_from_slice(&len.to_be_bytes());
            assert!(take_frame(&mut buf).is_err(), "length {len}");
            assert!(buf.capacity() < 1 << 20);
        }
    }

    /// A connection to a fake server on this machine, without TLS.
    fn plain_config(port: u16, password: &str, replication: bool) -> Config {
        Config {
            host: "127.0.0.1".into(),
            port,
            user: "u".into(),
            password: password.into(),
            dbname: "d".into(),
            application_name: "t".into(),
            options: String::new(),
            tls: crate::source::tls::Options {
                mode: crate::source::tls::SslMode::Disable,
                ..Default::default()
            },
            replication,
        }
    }

    /// A fake server: trusts the startup, then answers the one query with
    /// `reply`, written `piece` bytes at a time, then closes. Returns what
    /// `start_copy_out` + `copy_data` made of it: the chunks concatenated,
    /// the messages and payload bytes counted.
    fn fake_copy(reply: Vec<u8>, piece: usize) -> Result<(Vec<u8>, u64, u64), ReplError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await; // startup
                s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0])
                    .await
                    .expect("ok");
                s.write_all(&frame(b'Z', b"I")).await.expect("ready");
                let _ = s.read(&mut buf).await; // the query
                for p in reply.chunks(piece.max(1)) {
                    if s.write_all(p).await.is_err() {
                        return;
                    }
                    s.flush().await.ok();
                    tokio::task::yield_now().await;
                }
            });
            let cfg = plain_config(port, "", false);
            let mut session = Session::connect(&cfg).await.expect("connects");
            let mut got = Vec::new();
            let (mut rows, mut bytes) = (0, 0);
            let r = async {
                session.start_copy_out("COPY t TO STDOUT").await?;
                let mut append = |m: &[u8], out: &mut BytesMut| out.extend_from_slice(m);
                let mut sink = |b: Bytes, r: u64, n: u64| {
                    got.extend_from_slice(&b);
                    rows += r;
                    bytes += n;
                    true
                };
                session.copy_data(16, &mut append, &mut sink).await
            }
            .await;
            server.abort();
            r.map(|done| {
                assert!(done);
                (got, rows, bytes)
            })
        })
    }

    fn copy_reply(rows: &[&[u8]], tail: &[Vec<u8>]) -> Vec<u8> {
        let mut v = frame(b'H', &[0, 0, 0]);
        for r in rows {
            v.extend(frame(b'd', r));
        }
        for t in tail {
            v.extend_from_slice(t);
        }
        v
    }

    fn copy_end() -> Vec<Vec<u8>> {
        vec![
            frame(b'c', b""),
            frame(b'C', b"COPY 3\0"),
            frame(b'Z', b"I"),
        ]
    }

    #[test]
    fn copy_out_data_arrives_whole_however_it_is_split() {
        let rows: [&[u8]; 3] = [
            b"1\ta\n",
            b"",
            b"22\tbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\n",
        ];
        let mut with_noise = copy_end();
        with_noise.insert(0, frame(b'N', b"SNOTICE\0Mhello\0\0"));
        for piece in [1, 2, 5, 7, 64, 4096] {
            let (got, n, bytes) =
                fake_copy(copy_reply(&rows, &with_noise), piece).expect("copy succeeds");
            assert_eq!(got, rows.concat(), "piece {piece}");
            assert_eq!(n, 3);
            assert_eq!(bytes, rows.concat().len() as u64);
        }
    }

    #[test]
    fn copy_out_errors_are_the_servers() {
        let err = frame(b'E', b"SERROR\0C57014\0Mcanceling statement\0\0");
        // In the middle of the data.
        let e = fake_copy(copy_reply(&[b"1\n"], &[err.clone(), frame(b'Z', b"I")]), 3)
            .expect_err("fails");
        assert!(e.to_string().contains("canceling statement"), "{e}");
        // Then the connection closes (FATAL): still the server's message.
        let e =
            fake_copy(copy_reply(&[b"1\n"], std::slice::from_ref(&err)), 4096).expect_err("fails");
        assert!(e.to_string().contains("canceling statement"), "{e}");
        // Before the data.
        let mut before = err.clone();
        before.extend(frame(b'Z', b"I"));
        let e = fake_copy(before, 4096).expect_err("fails");
        assert!(e.to_string().contains("57014"), "{e}");
    }

    #[test]
    fn copy_out_protocol_violations_are_refused() {
        // Ready without CopyDone / CommandComplete: the data may be cut short.
        let e = fake_copy(copy_reply(&[b"1\n"], &[frame(b'Z', b"I")]), 4096).expect_err("cut");
        assert!(e.to_string().contains("without CopyDone"), "{e}");
        // Data before CopyOutResponse; CopyIn / CopyBoth instead of it.
        for tag in [b'd', b'G', b'W'] {
            let e = fake_copy(frame(tag, b"x"), 4096).expect_err("refused");
            assert!(e.to_string().contains("before the COPY"), "{e}");
        }
        // An absurd length.
        let mut bad = frame(b'H', &[0, 0, 0]);
        bad.extend_from_slice(&[b'd', 0x7f, 0xff, 0xff, 0xff]);
        let e = fake_copy(bad, 4096).expect_err("refused");
        assert!(e.to_string().contains("claims length"), "{e}");
        // The connection closing in the middle.
        let e = fake_copy(copy_reply(&[b"1\n"], &[]), 4096).expect_err("closed");
        assert!(e.to_string().contains("closed the connection"), "{e}");
    }

    #[test]
    fn copy_data_kinds() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&5u64.to_be_bytes());
        w.extend_from_slice(&9u64.to_be_bytes());
        w.extend_from_slice(&0i64.to_be_bytes());
        w.extend_from_slice(b"Bxyz");
        match parse_copy_data(Bytes::from(w)) {
            Ok(Some((
                Event::XLogData {
                    wal_start: 5,
                    wal_end: 9,
                    data,
                },
                false,
            ))) => assert_eq!(&data[..], b"Bxyz"),
            other => panic!("{other:?}"),
        }
        let mut k = vec![b'k'];
        k.extend_from_slice(&7u64.to_be_bytes());
        k.extend_from_slice(&0i64.to_be_bytes());
        k.push(1);
        assert!(matches!(
            parse_copy_data(Bytes::from(k)),
            Ok(Some((Event::KeepAlive { wal_end: 7 }, true)))
        ));
        // Truncated messages are errors, never panics.
        let mut w = vec![b'w'];
        w.extend_from_slice(&[0u8; 30]);
        for cut in 1..25 {
            assert!(
                parse_copy_data(Bytes::from(w[..cut].to_vec())).is_err(),
                "cut {cut}"
            );
        }
        assert!(parse_copy_data(Bytes::from_static(b"k\0\0")).is_err());
        assert!(parse_copy_data(Bytes::new()).is_err());
    }

    #[test]
    fn error_fields() {
        let e = parse_error(b"SERROR\0C42704\0Mno such slot\0\0");
        assert_eq!(e.to_string(), "server error: no such slot (SQLSTATE 42704)");
        // Unterminated fields do not panic.
        let _ = parse_error(b"Mabc");
        let _ = parse_error(b"");
    }

    #[test]
    fn data_rows() {
        let mut b = 2i16.to_be_bytes().to_vec();
        b.extend_from_slice(&3i32.to_be_bytes());
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            parse_data_row(&b).expect("row"),
            vec![Some("abc".to_string()), None]
        );
        assert!(parse_data_row(&b[..5]).is_err());
        let mut huge = 1i16.to_be_bytes().to_vec();
        huge.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(parse_data_row(&huge).is_err());
    }

    #[test]
    fn sasl_mechanism_choice() {
        let h = [7u8; 32];
        let m = |e: Option<&[u8]>, plus, plain| {
            sasl_choice(e.is_some(), e, plus, plain)
                .map(|(m, _)| m)
                .ok()
        };
        assert_eq!(m(Some(&h[..]), true, true), Some(SCRAM_SHA_256_PLUS));
        assert_eq!(m(Some(&h[..]), false, true), Some(SCRAM_SHA_256));
        assert_eq!(m(None, true, true), Some(SCRAM_SHA_256));
        assert_eq!(m(None, true, false), None);
        assert_eq!(m(None, false, false), None);
        // Over TLS, never "the client cannot bind" ('n').
        assert!(sasl_choice(true, None, true, true).is_err());
        assert!(sasl_choice(true, None, false, true).is_err());
        // The gs2 header the client-first message carries.
        let gs2 = |tls, e: Option<&[u8]>, plus| {
            let (_, b) = sasl_choice(tls, e, plus, true).expect("mechanism");
            let s = ScramSha256::new(b"pw", b);
            String::from_utf8_lossy(&s.message()[..2]).into_owned()
        };
        assert_eq!(gs2(true, Some(&h[..]), true), "p=");
        assert_eq!(gs2(true, Some(&h[..]), false), "y,");
        assert_eq!(gs2(false, None, true), "n,");
        assert!(ReplError::Server {
            message: "no pg_hba.conf entry".into(),
            code: "28000".into()
        }
        .rejects_plain());
        assert!(ReplError::CleartextRefused(crate::source::tls::CleartextRefused).rejects_plain());
        assert!(!ReplError::Io("refused".into()).rejects_plain());
    }

    /// A fake source that starts SCRAM, then says AuthenticationOk without
    /// its SASL final (no server signature): refused.
    #[test]
    fn authentication_ok_without_the_scram_signature_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await; // startup
                let mut sasl = vec![b'R'];
                let body = [&10i32.to_be_bytes()[..], b"SCRAM-SHA-256\0\0"].concat();
                sasl.extend_from_slice(&i32::try_from(body.len() + 4).unwrap_or(0).to_be_bytes());
                sasl.extend_from_slice(&body);
                s.write_all(&sasl).await.expect("sasl");
                let _ = s.read(&mut buf).await; // client-first
                s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0])
                    .await
                    .expect("ok");
                s.write_all(&[b'Z', 0, 0, 0, 5, b'I']).await.expect("ready");
                let _ = s.read(&mut buf).await;
            });
            let cfg = plain_config(port, "secret-pw", true);
            let e = Session::connect(&cfg).await.err().expect("refused");
            let msg = e.to_string();
            assert!(msg.contains("did not prove it knows the password"), "{msg}");
            assert!(!msg.contains("secret-pw"));
            server.abort();
        });
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("a'b"), "'a''b'");
    }
}
