//! Background workers: the launcher that brings active connectors back after
//! a server (re)start, the short-lived per-database starter it spawns, and the
//! entry point of a connector worker, which sets up signals, shared memory
//! and the database connection and then hands over to `engine`.

use crate::control::conninfo::{self, ConnInfo, Mode};
use crate::control::shmem::{self, Stage, State, WorkerSlot};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;
use std::time::Duration;

/// Registers the launcher from `_PG_init`. It is restarted by the postmaster
/// after a crash, so connectors come back after crash recovery too.
pub fn register_launcher() {
    BackgroundWorkerBuilder::new("synchdb launcher")
        .set_type("synchdb launcher")
        .set_library("synchdb")
        .set_function("synchdb_launcher_main")
        .enable_shmem_access(None)
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn synchdb_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = crate::control::gucs::launcher_database();
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    let dbs: Vec<pg_sys::Oid> = BackgroundWorker::transaction(|| {
        Spi::connect(|client| {
            let mut out = Vec::new();
            if let Ok(rows) = client.select(
                "SELECT oid FROM pg_catalog.pg_database WHERE datallowconn AND NOT datistemplate ORDER BY oid",
                None,
                &[],
            ) {
                for row in rows {
                    if let Ok(Some(oid)) = row.get::<pg_sys::Oid>(1) {
                        out.push(oid);
                    }
                }
            }
            out
        })
    });
    for dboid in dbs {
        let builder = BackgroundWorkerBuilder::new("synchdb starter")
            .set_type("synchdb starter")
            .set_library("synchdb")
            .set_function("synchdb_starter_main")
            .enable_shmem_access(None)
            .enable_spi_access()
            .set_restart_time(None)
            .set_argument(Some(pg_sys::Datum::from(dboid)))
            .set_notify_pid(unsafe { pg_sys::MyProcPid });
        match builder.load_dynamic() {
            Ok(handle) => {
                let _ = handle.wait_for_shutdown();
            }
            Err(_) => {
                pgrx::warning!(
                    "synchdb launcher: out of background worker slots, active connectors of database {} not started",
                    u32::from(dboid)
                );
            }
        }
    }
    // Stay resident so that the postmaster restarts us after a crash.
    while BackgroundWorker::wait_latch(Some(Duration::from_secs(3600))) {}
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn synchdb_starter_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let dboid = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(dboid), None);
    let connectors: Vec<(String, String)> = BackgroundWorker::transaction(|| {
        let has_ext = Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'synchdb')",
        );
        if !matches!(has_ext, Ok(Some(true))) {
            return Vec::new();
        }
        Spi::connect(|client| {
            let mut out = Vec::new();
            if let Ok(rows) = client.select(
                "SELECT c.name, coalesce(r.mode, 'initial')
                   FROM public.synchdb_conninfo c
                   LEFT JOIN public.synchdb_runtime r USING (name)
                  WHERE c.isactive ORDER BY c.name",
                None,
                &[],
            ) {
                for row in rows {
                    if let (Ok(Some(n)), Ok(Some(m))) = (row.get::<String>(1), row.get::<String>(2))
                    {
                        out.push((n, m));
                    }
                }
            }
            out
        })
    });
    for (name, mode) in connectors {
        let mode = Mode::parse(&mode).unwrap_or(Mode::Initial);
        match crate::control::api::start_worker(dboid, &name, mode) {
            Ok(_) | Err(crate::control::api::StartError::AlreadyRunning(_)) => {
                pgrx::log!(
                    "synchdb: started connector \"{name}\" (mode {})",
                    mode.as_str()
                );
            }
            Err(_) => pgrx::warning!(
                "synchdb: could not start connector \"{name}\": out of worker or connector slots"
            ),
        }
    }
}

/// What a connector worker knows about itself.
pub struct WorkerContext {
    pub name: String,
    pub mode: Mode,
    pub slot: WorkerSlot,
}

static mut MY_SLOT: Option<WorkerSlot> = None;

#[pg_guard]
unsafe extern "C-unwind" fn on_worker_exit(_code: i32, _arg: pg_sys::Datum) {
    unsafe {
        if let Some(slot) = MY_SLOT {
            slot.detach();
        }
    }
}

/// Parses the worker's `bgw_extra`: `slot:mode:name`.
fn parse_extra(extra: &str) -> Option<(usize, Mode, String)> {
    let mut it = extra.splitn(3, ':');
    let idx = it.next()?.parse().ok()?;
    let mode = Mode::parse(it.next()?).ok()?;
    let name = it.next()?.to_string();
    Some((idx, mode, name))
}

/// The session settings every process writing a connector's rows runs
/// under (the connector's worker and its copy workers); false when they
/// could not be applied.
pub fn apply_session_settings() -> bool {
    let settings = crate::apply::pgtxn::run(|| {
        Spi::run(
            "SET session_replication_role = replica; SET search_path = ''; SET synchronous_commit = off; SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; SET jit = off; SET datestyle = 'ISO'; SET intervalstyle = 'postgres'; SET lc_monetary = 'C'; SET standard_conforming_strings = on",
        )
    });
    matches!(settings, Ok(Ok(())))
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn synchdb_engine_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let dboid = pg_sys::Oid::from(arg.value() as u32);
    let Some((idx, mode, name)) = parse_extra(BackgroundWorker::get_extra()) else {
        pgrx::log!("synchdb: connector worker started with malformed arguments");
        return;
    };
    let Some(slot) = WorkerSlot::attach(idx) else {
        pgrx::log!("synchdb: connector \"{name}\" has no shared memory slot");
        return;
    };
    unsafe {
        MY_SLOT = Some(slot);
        pg_sys::before_shmem_exit(Some(on_worker_exit), pg_sys::Datum::from(0));
    }
    if shmem::find(dboid, &name) != Some(idx) {
        pgrx::log!("synchdb: connector \"{name}\" slot mismatch");
        return;
    }
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(dboid), None);
    slot.set_state(State::Initializing);
    slot.set_err("no error");
    // Destination triggers and foreign keys behave as for native replication;
    // every name the worker uses is schema-qualified. Rows are found through
    // the key's index whenever there is one (as native apply does): a plan
    // made when a small table looked cheaper to scan would stay a scan as
    // the table fills with dead row versions; with no index a scan costs
    // "disabled" (1e10), which would make every execution compile itself
    // with JIT (seconds per change): jit is off. Text from the source is read
    // under the same settings it was written with (see source::PINNED_OPTIONS).
    if !apply_session_settings() {
        slot.set_err(&format!(
            "connector \"{name}\": could not apply session settings"
        ));
        return;
    }
    let ctx = WorkerContext { name, mode, slot };
    crate::control::stats::load(slot, &ctx.name);
    crate::engine::run(&ctx);
    crate::control::stats::persist();
    slot.set_state(State::Stopped);
    let _ = Stage::None;
}

/// The name of connector `name`'s slot and publication on the source and
/// of its replication origin here, chosen when the connector was added
/// (`synchdb_objects`). A connector without a recorded name (created before
/// names were recorded) keeps the name those versions used.
pub fn object_name(name: &str) -> String {
    match Spi::get_one_with_args::<String>(
        "SELECT object_name FROM public.synchdb_objects WHERE name = $1",
        &[name.into()],
    ) {
        Ok(Some(n)) => n,
        _ => conninfo::source_object_name(name),
    }
}

/// Drops the connector's replication slot and publication on the source
/// (from `synchdb_del_conninfo`). A source that cannot be reached gets a
/// WARNING naming what is left behind; the connector is deleted anyway.
pub fn drop_source_objects(name: &str, info: &ConnInfo) {
    let object = object_name(name);
    match crate::source::catalog::drop_objects(info, &object) {
        Ok(()) => {}
        Err(e) => pgrx::warning!(
            "could not drop replication slot and publication \"{object}\" on the source: {e}; drop them by hand on the source with SELECT pg_drop_replication_slot('{object}'); DROP PUBLICATION \"{object}\";"
        ),
    }
}

/// Drops the local replication origin that tracks the connector's progress.
pub fn drop_local_origin(name: &str) {
    let origin = object_name(name);
    let _ = Spi::run_with_args(
        "SELECT pg_catalog.pg_replication_origin_drop($1)
          WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = $1)",
        &[origin.as_str().into()],
    );
}

static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

thread_local! {
    static LAST_PM_CHECK: std::cell::Cell<Option<std::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// Whether the worker was asked to stop (SIGTERM) or the postmaster died.
/// Sticky: pgrx's own check resets its flag when read.
pub fn stopping() -> bool {
    use std::sync::atomic::Ordering;
    if BackgroundWorker::sigterm_received() {
        STOPPING.store(true, Ordering::SeqCst);
    }
    // A zero-timeout wait that exits the process if the postmaster died;
    // it costs a system call, so at most every 50 ms (this is asked for
    // every replication message).
    let due = LAST_PM_CHECK.with(|c| {
        let now = std::time::Instant::now();
        let due = c
            .get()
            .is_none_or(|t| now.duration_since(t) >= Duration::from_millis(50));
        if due {
            c.set(Some(now));
        }
        due
    });
    if due {
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                0,
                pg_sys::PG_WAIT_EXTENSION,
            );
        }
    }
    STOPPING.load(Ordering::SeqCst)
}

/// Waits on the latch for up to `d`; false when the worker must stop.
pub fn sleep(d: Duration) -> bool {
    if stopping() {
        return false;
    }
    let alive = BackgroundWorker::wait_latch(Some(d));
    if !alive {
        STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    !stopping()
}
