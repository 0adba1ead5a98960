//! A hostile source, played by a tampering proxy between the connector and a
//! real source (tests/e2e/src/mitm.rs): corrupted snapshot COPY rows, a frame
//! claiming an absurd length, truncated and inflated pgoutput messages, and
//! catalog text that tries to run a second statement. Each is an ERROR in
//! `err`, never a crash of the destination, nothing runs that the source
//! smuggled in, and once the source behaves again the replica catches up
//! with nothing lost.

use std::sync::Arc;
use synchdb_e2e::mitm::Proxy;
use synchdb_e2e::*;

const NAME: &str = "hs";

fn add_through(pair: &Pair, proxy: &Proxy) {
    pair.dst.execute(&format!(
        "SELECT synchdb_add_conninfo('{NAME}','127.0.0.1',{},'myuser','mypass','postgres','public','null','null','postgres')",
        proxy.port()
    ));
}

fn wait_err(pair: &Pair, what: &str, f: impl Fn(&str) -> bool) -> String {
    wait_for_value(LONG, what, || {
        pair.state(NAME)
            .map(|st| st.err)
            .filter(|e| e != "no error" && f(e))
    })
}

/// The destination server never crashed (no backend killed by a signal,
/// no PANIC) and still answers.
fn assert_no_crash(pair: &Pair) {
    let log = pair.dst.log_contents();
    for bad in ["terminated by signal", "PANIC", "was terminated"] {
        assert!(!log.contains(bad), "destination log has {bad:?}");
    }
    assert_eq!(pair.dst.count("SELECT 1"), 1);
}

fn wait_ready(pair: &Pair, n: i64) {
    wait_until(LONG, "every table copied", || {
        pair.dst.count(&format!(
            "SELECT count(*) FROM synchdb_table_state WHERE name = '{NAME}' AND state = 'ready'"
        )) == n
    });
}

#[test]
fn corrupted_copy_rows_are_an_error_not_a_crash() {
    let pair = Pair::new();
    let proxy = Proxy::new(pair.src.port());
    // Each row replaced by seeded random garbage: random bytes (invalid
    // UTF-8, stray tabs, backslashes, newlines), the row cut short, or the
    // row with extra columns.
    let state = std::sync::atomic::AtomicU64::new(0x5EED_C0DE);
    proxy.set(|t| {
        t.copy_rows = Some(Arc::new(move |row: &[u8]| {
            let mut x =
                state.fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::Relaxed);
            let mut next = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            Some(match next() % 3 {
                0 => {
                    let n = (next() % 40) as usize;
                    let alphabet = b"\t\n\\\xff\xfe\x00abc123.";
                    let mut v: Vec<u8> = (0..n)
                        .map(|_| {
                            if next() % 2 == 0 {
                                alphabet[(next() % alphabet.len() as u64) as usize]
                            } else {
                                next() as u8
                            }
                        })
                        .collect();
                    v.push(b'\n');
                    v
                }
                1 => row[..(next() as usize % row.len().max(1))].to_vec(),
                _ => {
                    let mut v = row.strip_suffix(b"\n").unwrap_or(row).to_vec();
                    v.extend_from_slice(b"\textra\tcolumns\n");
                    v
                }
            })
        }))
    });
    add_through(&pair, &proxy);
    pair.start(NAME, "initial");
    let err = wait_err(&pair, "the snapshot to fail", |_| true);
    assert!(!err.contains("mypass"), "{err}");
    assert_no_crash(&pair);
    // Nothing half-written: no table is marked copied.
    assert_eq!(
        pair.dst.count(&format!(
            "SELECT count(*) FROM synchdb_table_state WHERE name = '{NAME}' AND state = 'ready'"
        )),
        0
    );
    // The source behaves again: the connector recovers by itself.
    proxy.set(|t| t.copy_rows = None);
    wait_ready(&pair, 2);
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    assert_no_crash(&pair);
}

#[test]
fn absurd_frame_length_is_an_error_not_an_allocation() {
    let pair = Pair::new();
    let proxy = Proxy::new(pair.src.port());
    proxy.set(|t| t.absurd_copy_frame = true);
    add_through(&pair, &proxy);
    pair.start(NAME, "initial");
    wait_err(&pair, "the snapshot to fail", |_| true);
    assert_no_crash(&pair);
    let pid = pair.state(NAME).map(|s| s.pid).unwrap_or(-1);
    if pid > 0 {
        if let Some(kb) = rss_anon_kb(pid) {
            assert!(kb < 512 * 1024, "worker holds {kb} kB after a 2 GB claim");
        }
    }
    proxy.set(|t| t.absurd_copy_frame = false);
    wait_ready(&pair, 2);
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
}

#[test]
fn malformed_pgoutput_messages_are_an_error_and_nothing_is_lost() {
    let pair = Pair::new();
    let proxy = Proxy::new(pair.src.port());
    add_through(&pair, &proxy);
    pair.start(NAME, "initial");
    wait_ready(&pair, 2);
    // Insert messages cut short, or claiming a value of 2 GB.
    proxy.set(|t| {
        t.xlog = Some(Arc::new(|m: &[u8]| match m.first() {
            Some(b'I') if m.len() > 12 => {
                let mut v = m.to_vec();
                if m.len().is_multiple_of(2) {
                    v.truncate(m.len() - 3);
                } else {
                    // The first column's length: after 'I', rel id, 'N', count, kind.
                    v[9..13].copy_from_slice(&i32::MAX.to_be_bytes());
                }
                Some(v)
            }
            _ => None,
        }))
    });
    pair.src.execute(
        "INSERT INTO public.orders (id, customer) VALUES (800, 'a'), (801, 'bb');
         INSERT INTO public.customers (name) VALUES ('c');",
    );
    let err = wait_err(&pair, "the stream to fail", |e| {
        e.contains("malformed") || e.contains("pgoutput")
    });
    assert!(!err.contains("mypass"), "{err}");
    assert_no_crash(&pair);
    // Nothing of the corrupted transactions was applied.
    assert_eq!(
        pair.dst
            .count("SELECT count(*) FROM postgres.orders WHERE id >= 800"),
        0
    );
    // The source behaves again: the same changes arrive intact.
    proxy.set(|t| t.xlog = None);
    pair.wait_tables_equal("public.orders", "postgres.orders", "id");
    pair.wait_tables_equal("public.customers", "postgres.customers", "id");
    assert_no_crash(&pair);
}
