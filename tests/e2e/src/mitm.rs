//! A tampering proxy between the connector and a real source: it forwards
//! every connection to the source and can rewrite what the source sends —
//! catalog query results (DataRow values), snapshot COPY rows, pgoutput
//! messages in the replication stream, or a frame with an absurd length —
//! standing in for a compromised source or an attacker on an unencrypted
//! path. Connections that switch to TLS are forwarded untouched.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// A rewrite of a payload; `None` leaves it as it is.
pub type Rewrite = Arc<dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync>;

/// What the proxy changes in what the source sends.
#[derive(Default, Clone)]
pub struct Tamper {
    /// Whole DataRow values replaced (from, to), on normal connections.
    pub values: Vec<(String, String)>,
    /// Snapshot COPY rows (CopyData on normal connections).
    pub copy_rows: Option<Rewrite>,
    /// pgoutput messages (the data of XLogData on replication connections).
    pub xlog: Option<Rewrite>,
    /// Replace the first CopyData of a normal connection by a frame that
    /// claims to be 2 GB long (and then closes).
    pub absurd_copy_frame: bool,
}

pub struct Proxy {
    port: u16,
    tamper: Arc<Mutex<Tamper>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on a free port and forwards to 127.0.0.1:`upstream`.
    pub fn new(upstream: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("proxy listens");
        let port = listener.local_addr().expect("proxy address").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let tamper = Arc::new(Mutex::new(Tamper::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (tamper.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let t = t.clone();
                        std::thread::spawn(move || serve(client, upstream, t));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Proxy { port, tamper, stop }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Changes what the proxy does to connections (and to open ones).
    pub fn set(&self, f: impl FnOnce(&mut Tamper)) {
        if let Ok(mut t) = self.tamper.lock() {
            f(&mut t);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read_exact(s: &mut TcpStream, n: usize) -> Option<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).ok()?;
    Some(b)
}

/// One startup-phase packet (untagged: length then body).
fn read_untagged(s: &mut TcpStream) -> Option<Vec<u8>> {
    let len = read_exact(s, 4)?;
    let n = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let body = read_exact(s, n.checked_sub(4)?)?;
    let mut out = len;
    out.extend(body);
    Some(out)
}

enum Startup {
    Plain { replication: bool },
    Tls,
}

fn serve(mut client: TcpStream, upstream: u16, tamper: Arc<Mutex<Tamper>>) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let (tx, rx) = mpsc::channel::<Startup>();
    // Client to server: the startup packets are looked at, the rest copied.
    std::thread::spawn(move || {
        let Some(first) = read_untagged(&mut c2) else {
            return;
        };
        let code = first
            .get(4..8)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        let _ = s2.write_all(&first);
        let startup = if code == Some(80_877_103) {
            // SSLRequest: the server's one-byte answer decides; then comes
            // either a TLS handshake (a record starts with 0x16) or, refused,
            // the startup packet in plain text.
            let _ = tx.send(Startup::Tls);
            let mut peek = [0u8; 1];
            match c2.peek(&mut peek) {
                Ok(1) if peek[0] != 0x16 => read_untagged(&mut c2).inspect(|p| {
                    let _ = s2.write_all(p);
                }),
                _ => None,
            }
        } else {
            Some(first)
        };
        if let Some(p) = startup {
            let replication = String::from_utf8_lossy(&p).contains("replication");
            let _ = tx.send(Startup::Plain { replication });
        }
        let _ = std::io::copy(&mut c2, &mut s2);
        let _ = s2.shutdown(Shutdown::Write);
    });
    let replication = match rx.recv() {
        Ok(Startup::Plain { replication }) => replication,
        Ok(Startup::Tls) => {
            let Some(answer) = read_exact(&mut server, 1) else {
                return;
            };
            let _ = client.write_all(&answer);
            if answer == b"S" {
                let _ = std::io::copy(&mut server, &mut client);
                return;
            }
            // Refused: the client goes on in plain text with its startup packet.
            match rx.recv() {
                Ok(Startup::Plain { replication }) => replication,
                _ => return,
            }
        }
        Err(_) => return,
    };
    pump(&mut server, &mut client, replication, &tamper);
    let _ = client.shutdown(Shutdown::Both);
}

fn pump(server: &mut TcpStream, client: &mut TcpStream, replication: bool, tamper: &Mutex<Tamper>) {
    loop {
        let Some(head) = read_exact(server, 5) else {
            return;
        };
        let tag = head[0];
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let Some(body) = len.checked_sub(4).and_then(|n| read_exact(server, n)) else {
            return;
        };
        let t = match tamper.lock() {
            Ok(t) => t.clone(),
            Err(_) => return,
        };
        let body = match tag {
            b'D' if !replication && !t.values.is_empty() => rewrite_row(&body, &t.values),
            b'd' if !replication => {
                if t.absurd_copy_frame {
                    let mut frame = vec![b'd'];
                    frame.extend_from_slice(&0x7fff_fff0u32.to_be_bytes());
                    frame.extend_from_slice(b"not two gigabytes");
                    let _ = client.write_all(&frame);
                    return;
                }
                match &t.copy_rows {
                    Some(f) => f(&body).unwrap_or(body),
                    None => body,
                }
            }
            b'd' if replication && body.first() == Some(&b'w') && body.len() >= 25 => {
                match &t.xlog {
                    Some(f) => match f(&body[25..]) {
                        Some(new) => {
                            let mut b = body[..25].to_vec();
                            b.extend(new);
                            b
                        }
                        None => body,
                    },
                    None => body,
                }
            }
            _ => body,
        };
        let mut frame = vec![tag];
        frame.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        frame.extend(body);
        if client.write_all(&frame).is_err() {
            return;
        }
    }
}

/// A DataRow with whole values replaced.
fn rewrite_row(body: &[u8], values: &[(String, String)]) -> Vec<u8> {
    let Some(n) = body.get(..2).map(|b| i16::from_be_bytes([b[0], b[1]])) else {
        return body.to_vec();
    };
    let mut out = body[..2].to_vec();
    let mut at = 2usize;
    for _ in 0..n {
        let Some(l) = body.get(at..at + 4) else {
            return body.to_vec();
        };
        let l = i32::from_be_bytes([l[0], l[1], l[2], l[3]]);
        at += 4;
        if l < 0 {
            out.extend_from_slice(&l.to_be_bytes());
            continue;
        }
        let Some(v) = body.get(at..at + l as usize) else {
            return body.to_vec();
        };
        at += l as usize;
        let text = String::from_utf8_lossy(v);
        let v: Vec<u8> = match values.iter().find(|(from, _)| *from == text) {
            Some((_, to)) => to.as_bytes().to_vec(),
            None => v.to_vec(),
        };
        out.extend_from_slice(&(v.len() as i32).to_be_bytes());
        out.extend(v);
    }
    out
}
