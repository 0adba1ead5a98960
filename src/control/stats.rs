//! Connector statistics that survive a server restart, and SynchDB's views
//! of them (`synchdb_genstats`, `synchdb_snapstats`, `synchdb_cdcstats` over
//! `synchdb_get_stats()`). The live counters stay in the connector's
//! shared-memory slot (`shmem`), updated at each commit without any I/O; the
//! worker copies them into `synchdb_stats` (one row per connector) every
//! few seconds between transactions and when it stops, and loads that row
//! into its slot when it first starts after a server restart. A crash
//! (kill -9, power loss) loses at most the counts of those last seconds.
//! `synchdb_reset_stats` zeroes both copies. Readers take the slot when it
//! holds the loaded counters, else the persisted row.

use crate::apply::pgtxn;
use crate::control::shmem::{self, Stats, WorkerSlot};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// How often a running worker writes its counters to `synchdb_stats`.
const PERSIST_EVERY: Duration = Duration::from_secs(5);

/// The persisted counters, in the order of `synchdb_stats`' columns.
/// Timestamps are microseconds since the Unix epoch, 0 when not set.
const COLUMNS: [&str; 17] = [
    "ddls",
    "inserts",
    "updates",
    "deletes",
    "truncates",
    "transactions",
    "bad_changes",
    "tables_copied",
    "rows_copied",
    "batches",
    "first_src_ts",
    "last_src_ts",
    "first_apply_ts",
    "last_apply_ts",
    "batch_begin_ts",
    "snapshot_begin_ts",
    "snapshot_end_ts",
];

pub fn now_usec() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The persisted counters of `s`.
fn to_columns(s: &Stats) -> [i64; 17] {
    [
        signed(s.ddls),
        signed(s.inserts),
        signed(s.updates),
        signed(s.deletes),
        signed(s.truncates),
        signed(s.transactions),
        signed(s.bad_changes),
        signed(s.tables_copied),
        signed(s.rows_copied),
        signed(s.batches),
        s.first_src_ts,
        s.last_src_ts,
        s.first_apply_ts,
        s.last_apply_ts,
        s.batch_begin_ts,
        s.snapshot_begin_ts,
        s.snapshot_end_ts,
    ]
}

/// `base` with the persisted counters `v` (a negative count, which only a
/// hand edit makes, reads as 0); what is not persisted (positions, the
/// batch in progress) is kept from `base`.
fn from_columns(v: &[i64; 17], base: Stats) -> Stats {
    Stats {
        ddls: unsigned(v[0]),
        inserts: unsigned(v[1]),
        updates: unsigned(v[2]),
        deletes: unsigned(v[3]),
        truncates: unsigned(v[4]),
        transactions: unsigned(v[5]),
        bad_changes: unsigned(v[6]),
        tables_copied: unsigned(v[7]),
        rows_copied: unsigned(v[8]),
        batches: unsigned(v[9]),
        first_src_ts: v[10].max(0),
        last_src_ts: v[11].max(0),
        first_apply_ts: v[12].max(0),
        last_apply_ts: v[13].max(0),
        batch_begin_ts: v[14].max(0),
        snapshot_begin_ts: v[15].max(0),
        snapshot_end_ts: v[16].max(0),
        ..base
    }
}

fn column_list() -> String {
    COLUMNS.join(", ")
}

fn insert_sql() -> String {
    let params: Vec<String> = (2..=COLUMNS.len() + 1).map(|i| format!("${i}")).collect();
    format!(
        "INSERT INTO public.synchdb_stats (name, {}) VALUES ($1, {}) ON CONFLICT (name) DO NOTHING",
        column_list(),
        params.join(", ")
    )
}

fn update_sql() -> String {
    let sets: Vec<String> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c} = ${}", i + 2))
        .collect();
    format!(
        "UPDATE public.synchdb_stats SET {}, saved_at = now() WHERE name = $1",
        sets.join(", ")
    )
}

fn reset_sql() -> String {
    let sets: Vec<String> = COLUMNS.iter().map(|c| format!("{c} = 0")).collect();
    format!(
        "INSERT INTO public.synchdb_stats (name) VALUES ($1)
         ON CONFLICT (name) DO UPDATE SET {}, saved_at = now()",
        sets.join(", ")
    )
}

fn args<'a>(name: &'a str, v: &[i64; 17]) -> Vec<DatumWithOid<'a>> {
    let mut out: Vec<DatumWithOid<'a>> = vec![name.into()];
    out.extend(v.iter().map(|x| DatumWithOid::from(*x)));
    out
}

/// The persisted counters of every connector of this database.
fn read_persisted() -> Vec<(String, [i64; 17])> {
    let sql = format!("SELECT name, {} FROM public.synchdb_stats", column_list());
    let r: Result<Vec<(String, [i64; 17])>, pgrx::spi::SpiError> = Spi::connect(|client| {
        let mut out = Vec::new();
        for row in client.select(&sql, None, &[])? {
            let Some(name) = row.get::<String>(1)? else {
                continue;
            };
            let mut v = [0i64; 17];
            for (i, slot) in v.iter_mut().enumerate() {
                *slot = row.get::<i64>(i + 2)?.unwrap_or(0);
            }
            out.push((name, v));
        }
        Ok(out)
    });
    r.unwrap_or_default()
}

/// The statistics of every connector of database `dboid` (this one): the
/// live slot once it holds the loaded counters, else the persisted row,
/// else zeros.
pub fn current(dboid: pg_sys::Oid) -> Vec<(String, Stats)> {
    let live = shmem::stats(dboid);
    let mut out: Vec<(String, Stats)> = Vec::new();
    for (name, v) in read_persisted() {
        let slot = live.iter().find(|(n, _)| *n == name).map(|(_, s)| *s);
        out.push(match slot {
            Some(s) if s.loaded => (name, s),
            // Not loaded yet: the persisted counters, with the positions.
            Some(s) => (name, from_columns(&v, s)),
            None => (name, from_columns(&v, Stats::default())),
        });
    }
    for (name, s) in live {
        if !out.iter().any(|(n, _)| *n == name) {
            out.push((name, s));
        }
    }
    // Connectors that never ran: zeros (readable by everyone, as the view).
    let defined: Vec<String> = Spi::connect(|client| {
        let mut names = Vec::new();
        for row in client.select("SELECT name FROM public.synchdb_conninfo_view", None, &[])? {
            if let Some(n) = row.get::<String>(1)? {
                names.push(n);
            }
        }
        Ok::<_, pgrx::spi::SpiError>(names)
    })
    .unwrap_or_default();
    for name in defined {
        if !out.iter().any(|(n, _)| *n == name) {
            out.push((name, Stats::default()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Zeroes connector `name`'s statistics, persisted and live. The row is
/// locked first: a worker persisting at the same time either wrote before
/// (and is overwritten) or finds it locked and skips that round.
pub fn reset(dboid: pg_sys::Oid, name: &str) {
    if let Err(e) = Spi::run_with_args(&reset_sql(), &[name.into()]) {
        pgrx::error!("resetting the statistics of connector \"{name}\": {e}");
    }
    let _ = shmem::reset_stats(dboid, name);
}

struct Persisting {
    slot: WorkerSlot,
    name: String,
    last: Instant,
    saved: Option<[i64; 17]>,
}

thread_local! {
    static WORKER: RefCell<Option<Persisting>> = const { RefCell::new(None) };
}

/// In the worker, before its first attempt: loads the persisted counters
/// into the slot unless it holds them already (the worker ran before since
/// the server started), and makes sure the row exists. Outside a
/// transaction.
pub fn load(slot: WorkerSlot, name: &str) {
    let empty = to_columns(&Stats::default());
    let r = pgtxn::run(|| {
        Spi::run_with_args(&insert_sql(), &args(name, &empty))?;
        let sql = format!(
            "SELECT {} FROM public.synchdb_stats WHERE name = $1",
            column_list()
        );
        Spi::connect(|client| {
            let mut v = [0i64; 17];
            if let Some(row) = client.select(&sql, Some(1), &[name.into()])?.next() {
                for (i, slot) in v.iter_mut().enumerate() {
                    *slot = row.get::<i64>(i + 1)?.unwrap_or(0);
                }
            }
            Ok::<_, pgrx::spi::SpiError>(v)
        })
    });
    match r {
        Ok(Ok(v)) => slot.stats(|s| {
            if !s.loaded {
                *s = from_columns(&v, *s);
                s.loaded = true;
            }
        }),
        Ok(Err(e)) => pgrx::log!("synchdb: connector \"{name}\": reading its statistics: {e}"),
        Err(e) => pgrx::log!("synchdb: connector \"{name}\": reading its statistics: {e}"),
    }
    WORKER.with(|w| {
        *w.borrow_mut() = Some(Persisting {
            slot,
            name: name.to_string(),
            last: Instant::now(),
            saved: None,
        })
    });
}

/// In the worker, outside a transaction: writes the counters when they
/// changed and the last write is [`PERSIST_EVERY`] old.
pub fn maybe_persist() {
    let due = WORKER.with(|w| {
        w.borrow()
            .as_ref()
            .is_some_and(|p| p.last.elapsed() >= PERSIST_EVERY)
    });
    if due {
        persist();
    }
}

/// In the worker, outside a transaction: writes the counters now (when they
/// changed since the last write).
pub fn persist() {
    let Some((slot, name, saved)) = WORKER.with(|w| {
        w.borrow_mut().as_mut().map(|p| {
            p.last = Instant::now();
            (p.slot, p.name.clone(), p.saved)
        })
    }) else {
        return;
    };
    let mut live = Stats::default();
    slot.stats(|s| live = *s);
    if !live.loaded || saved == Some(to_columns(&live)) {
        return;
    }
    let r = pgtxn::run(|| -> Result<Option<[i64; 17]>, pgrx::spi::SpiError> {
        // Locked by a reset in progress: its zeroes win, try again later.
        let mine = Spi::get_one_with_args::<bool>(
            "SELECT true FROM public.synchdb_stats WHERE name = $1 FOR UPDATE SKIP LOCKED",
            &[name.as_str().into()],
        )?;
        // Read under the row lock: a reset that follows waits for this
        // write, then zeroes the slot too.
        let mut now = Stats::default();
        slot.stats(|s| now = *s);
        let v = to_columns(&now);
        if mine == Some(true) {
            Spi::run_with_args(&update_sql(), &args(&name, &v))?;
            return Ok(Some(v));
        }
        let exists = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM public.synchdb_stats WHERE name = $1)",
            &[name.as_str().into()],
        )?;
        if exists == Some(true) {
            return Ok(None);
        }
        Spi::run_with_args(&insert_sql(), &args(&name, &v))?;
        Ok(Some(v))
    });
    match r {
        Ok(Ok(Some(v))) => WORKER.with(|w| {
            if let Some(p) = w.borrow_mut().as_mut() {
                p.saved = Some(v);
            }
        }),
        Ok(Ok(None)) => {}
        // The connector was deleted, or the extension dropped: nothing to keep.
        Ok(Err(e)) => pgrx::debug1!("synchdb: connector \"{name}\": saving its statistics: {e}"),
        Err(e) => pgrx::debug1!("synchdb: connector \"{name}\": saving its statistics: {e}"),
    }
}

fn ms(us: i64) -> i64 {
    us / 1000
}

/// The rows of `synchdb_get_stats()`: SynchDB's columns, names, types and
/// units (bigint milliseconds since the Unix epoch, 0 when not set). A
/// batch is one local commit (one or more source transactions); pgoutput
/// carries one source time per transaction, its commit time, so a batch's
/// first and last source times are both that of its last transaction.
#[pg_extern]
#[allow(clippy::type_complexity)]
pub fn synchdb_stats_all_rows() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(ddls, i64),
        name!(dmls, i64),
        name!(creates, i64),
        name!(updates, i64),
        name!(deletes, i64),
        name!(txs, i64),
        name!(truncates, i64),
        name!(bad_events, i64),
        name!(total_events, i64),
        name!(batches_done, i64),
        name!(average_batch_size, i64),
        name!(first_src_ts, i64),
        name!(first_pg_ts, i64),
        name!(last_src_ts, i64),
        name!(last_pg_ts, i64),
        name!(tables, i64),
        name!(rows, i64),
        name!(snapshot_begin_ts, i64),
        name!(snapshot_end_ts, i64),
    ),
> {
    let rows = current(unsafe { pg_sys::MyDatabaseId })
        .into_iter()
        .map(|(name, s)| {
            let dmls = s
                .inserts
                .saturating_add(s.updates)
                .saturating_add(s.deletes)
                .saturating_add(s.truncates);
            let total = dmls.saturating_add(s.ddls);
            let avg = total.checked_div(s.batches).unwrap_or(0);
            (
                name,
                signed(s.ddls),
                signed(dmls),
                signed(s.inserts),
                signed(s.updates),
                signed(s.deletes),
                signed(s.transactions),
                signed(s.truncates),
                signed(s.bad_changes),
                signed(total),
                signed(s.batches),
                signed(avg),
                ms(s.last_src_ts),
                ms(s.batch_begin_ts),
                ms(s.last_src_ts),
                ms(s.last_apply_ts),
                signed(s.tables_copied),
                signed(s.rows_copied),
                ms(s.snapshot_begin_ts),
                ms(s.snapshot_end_ts),
            )
        })
        .collect::<Vec<_>>();
    TableIterator::new(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_round_trip() {
        let s = Stats {
            ddls: 1,
            inserts: 2,
            updates: 3,
            deletes: 4,
            truncates: 5,
            transactions: 6,
            bad_changes: 7,
            tables_copied: 8,
            rows_copied: 9,
            batches: 10,
            first_src_ts: 11,
            last_src_ts: 12,
            first_apply_ts: 13,
            last_apply_ts: 14,
            batch_begin_ts: 15,
            snapshot_begin_ts: 16,
            snapshot_end_ts: 17,
            received_lsn: 99,
            applied_lsn: 98,
            batch_open_ts: 97,
            loaded: true,
        };
        let v = to_columns(&s);
        assert_eq!(v, core::array::from_fn(|i| i as i64 + 1));
        let base = Stats {
            received_lsn: 5,
            ..Stats::default()
        };
        let back = from_columns(&v, base);
        assert_eq!(to_columns(&back), v);
        // Positions are not persisted: they come from the live slot.
        assert_eq!(back.received_lsn, 5);
        assert!(!back.loaded);
    }

    #[test]
    fn hand_edited_negatives_read_as_zero() {
        let mut v = [0i64; 17];
        v[0] = -3;
        v[10] = -1;
        let s = from_columns(&v, Stats::default());
        assert_eq!(s.ddls, 0);
        assert_eq!(s.first_src_ts, 0);
        // Too large for bigint: capped, not wrapped.
        assert_eq!(signed(u64::MAX), i64::MAX);
    }

    #[test]
    fn sql_lists_every_column_once() {
        assert_eq!(insert_sql().matches('$').count(), COLUMNS.len() + 1);
        assert!(insert_sql().contains("$18"));
        assert!(update_sql().contains("snapshot_end_ts = $18"));
        assert_eq!(reset_sql().matches("= 0").count(), COLUMNS.len());
    }
}
