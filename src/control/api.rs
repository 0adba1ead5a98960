//! The SQL surface: `synchdb_add_conninfo`, `synchdb_del_conninfo`,
//! `synchdb_start_engine_bgw`, `synchdb_stop_engine_bgw` and the set-returning
//! function behind `synchdb_state_view`. Validates input, turns every failure
//! into an ERROR with a real SQLSTATE, and starts/stops connector workers.

use crate::control::conninfo::{self, ConfigError, ConnInfo, Mode};
use crate::control::shmem::{self, Claim};
use pgrx::bgworkers::{BackgroundWorkerBuilder, BackgroundWorkerStatus};
use pgrx::prelude::*;
use pgrx::JsonB;
use std::time::{Duration, Instant};

/// Raises an ERROR (or the given level) with SQLSTATE, detail and hint.
pub fn raise(code: PgSqlErrorCode, msg: String, detail: Option<String>, hint: Option<&str>) -> ! {
    // The failing statement may carry a password: the log gets the message only.
    crate::control::secrets::hide_statement();
    let mut r = pgrx::pg_sys::panic::ErrorReport::new(code, msg, "synchdb");
    if let Some(d) = detail {
        r = r.set_detail(d);
    }
    if let Some(h) = hint {
        r = r.set_hint(h);
    }
    r.report(PgLogLevel::ERROR);
    unreachable!("ERROR report returned")
}

fn config_error(e: ConfigError) -> ! {
    let (code, hint) = match &e {
        ConfigError::NameTooLong(..) => (PgSqlErrorCode::ERRCODE_NAME_TOO_LONG, None),
        ConfigError::Unsupported(_) => (
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Some("Only 'postgres' sources are supported."),
        ),
        ConfigError::BadMode(_) => (
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Some("Valid modes are initial, when_needed, initial_only, no_data, schemasync, never and always."),
        ),
        ConfigError::ModeNotForPostgres { hint, .. } => {
            (PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, Some(*hint))
        }
        ConfigError::BadTable { .. } => (
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Some("Give 'null' for every table of the schema, or a comma-separated list of schema.table entries."),
        ),
        ConfigError::BadRegex { .. } => (
            PgSqlErrorCode::ERRCODE_INVALID_REGULAR_EXPRESSION,
            Some("An entry that is not a plain schema.table name is a regular expression matched against the whole schema.table name (README, \"Table lists\")."),
        ),
        ConfigError::TableFile { missing: true, .. } => (
            PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
            Some("The path after file: is read by the server's operating system user; give an absolute path."),
        ),
        ConfigError::TableFile { .. } => (
            PgSqlErrorCode::ERRCODE_IO_ERROR,
            Some("The path after file: is read by the server's operating system user; give an absolute path."),
        ),
        ConfigError::BadTableFile { .. } => (
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Some("A table list file is a JSON object such as {\"table_list\": [\"public.orders\"], \"snapshot_table_list\": [\"public.orders\"]}."),
        ),
        ConfigError::BadStored(_) => (
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Some("Fix the row in synchdb_conninfo or delete and add the connector again."),
        ),
        ConfigError::BadSslMode(_) => (
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Some("Valid sslmode values are disable, allow, prefer, require, verify-ca and verify-full."),
        ),
        ConfigError::SslNeedsRoot(_) => (
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Some("Give the path of a PEM file with the CA certificate(s) that signed the source's certificate."),
        ),
        _ => (PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, None),
    };
    raise(code, e.to_string(), None, hint)
}

/// A `file:` table list is read by the server: only for roles that may
/// read server files (as `pg_read_file`).
fn check_list_file_privilege(info: &ConnInfo) {
    let uses_file = [&info.table, &info.snapshottable]
        .iter()
        .any(|v| crate::control::tablelist::file_path(v).is_some());
    if !uses_file {
        return;
    }
    let allowed = unsafe {
        pg_sys::superuser()
            || pg_sys::has_privs_of_role(
                pg_sys::GetUserId(),
                pg_sys::Oid::from(pg_sys::ROLE_PG_READ_SERVER_FILES),
            )
    };
    if !allowed {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied to read a table list file".into(),
            None,
            Some("Only superusers and roles with privileges of pg_read_server_files may use file: table lists."),
        );
    }
}

fn spi_error(e: pgrx::spi::Error) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("synchdb catalog access failed: {e}"),
        None,
        None,
    )
}

pub fn my_database() -> pg_sys::Oid {
    unsafe { pg_sys::MyDatabaseId }
}

pub(crate) fn unknown_connector(name: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("connector \"{name}\" does not exist"),
        None,
        Some("See SELECT name FROM synchdb_conninfo_view for the defined connectors."),
    )
}

/// Reads a connector definition; `None` when there is no such connector.
pub fn load_conninfo(name: &str) -> Option<(bool, ConnInfo)> {
    let row = Spi::get_two_with_args::<bool, JsonB>(
        "SELECT isactive, data FROM public.synchdb_conninfo WHERE name = $1",
        &[name.into()],
    );
    match row {
        Ok((Some(active), Some(data))) => match ConnInfo::from_json(&data.0) {
            Ok(info) => Some((active, crate::control::secrets::fill_password(name, info))),
            Err(e) => config_error(e),
        },
        Ok(_) => None,
        Err(pgrx::spi::Error::InvalidPosition) => None,
        Err(e) => spi_error(e),
    }
}

#[allow(clippy::too_many_arguments)]
#[pg_extern]
fn synchdb_add_conninfo(
    name: Option<&str>,
    hostname: Option<&str>,
    port: Option<i32>,
    user: Option<&str>,
    pwd: Option<&str>,
    srcdb: Option<&str>,
    srcschema: Option<&str>,
    table: Option<&str>,
    snapshottable: Option<&str>,
    connector: Option<&str>,
) -> i32 {
    // The statement carries the password: whatever fails, it is not logged.
    crate::control::secrets::hide_statement();
    let name = name.unwrap_or_default();
    if let Err(e) = conninfo::check_name(name) {
        config_error(e);
    }
    let null_word = |v: Option<&str>| {
        if conninfo::is_null_word(v) {
            "null".to_string()
        } else {
            v.unwrap_or_default().trim().to_string()
        }
    };
    let info = ConnInfo {
        hostname: hostname.unwrap_or_default().trim().to_string(),
        port: port.unwrap_or(0),
        user: user.unwrap_or_default().to_string(),
        pwd: pwd.unwrap_or_default().to_string(),
        srcdb: srcdb.unwrap_or_default().to_string(),
        srcschema: srcschema.unwrap_or_default().trim().to_string(),
        table: null_word(table),
        snapshottable: null_word(snapshottable),
        connector: connector.unwrap_or_default().trim().to_ascii_lowercase(),
        publication: String::new(),
        passfile: String::new(),
        sslmode: String::new(),
        sslrootcert: String::new(),
        sslcert: String::new(),
        sslkey: String::new(),
        allow_cleartext_password: false,
        apply_as_table_owner: false,
    };
    check_list_file_privilege(&info);
    if let Err(e) = info.validate() {
        config_error(e);
    }
    if load_conninfo(name).is_some() {
        raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("connector \"{name}\" already exists"),
            None,
            Some("Choose another name, or remove it first with synchdb_del_conninfo."),
        );
    }
    let data = match serde_json::to_value(&info) {
        Ok(v) => v,
        Err(e) => raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            e.to_string(),
            None,
            None,
        ),
    };
    if let Err(e) = Spi::run_with_args(
        "INSERT INTO public.synchdb_conninfo (name, isactive, data) VALUES ($1, false, $2)",
        &[name.into(), JsonB(data).into()],
    ) {
        spi_error(e);
    }
    let object = crate::control::conninfo::unique_object_name(
        name,
        unsafe { pg_sys::GetSystemIdentifier() },
        my_database().to_u32(),
    );
    if let Err(e) = Spi::run_with_args(
        "INSERT INTO public.synchdb_objects (name, object_name) VALUES ($1, $2)",
        &[name.into(), object.as_str().into()],
    ) {
        spi_error(e);
    }
    0
}

/// TLS to the source, with the arguments of the original SynchDB (README,
/// "TLS"): stored in the connector's data under libpq's names (`sslmode`,
/// `sslcert`, `sslrootcert`); read at the connector's next start. The two
/// passwords are not stored: PEM CA bundles have none, and client keys must
/// be unencrypted.
#[pg_extern]
fn synchdb_add_extra_conninfo(
    name: Option<&str>,
    sslmode: Option<&str>,
    ssl_keystore: Option<&str>,
    ssl_keystore_pass: Option<&str>,
    ssl_truststore: Option<&str>,
    ssl_truststore_pass: Option<&str>,
) -> i32 {
    // The statement carries passphrases: whatever fails, it is not logged.
    crate::control::secrets::hide_statement();
    let name = name.unwrap_or_default();
    let Some((_, mut info)) = load_conninfo(name) else {
        unknown_connector(name)
    };
    let given = |v: Option<&str>| {
        if conninfo::is_null_word(v) {
            String::new()
        } else {
            v.unwrap_or_default().trim().to_string()
        }
    };
    let mode = match crate::source::tls::SslMode::parse(&given(sslmode)) {
        Some(m) => m,
        None => config_error(ConfigError::BadSslMode(
            sslmode.unwrap_or_default().to_string(),
        )),
    };
    info.sslmode = mode.as_str().to_string();
    info.sslcert = given(ssl_keystore);
    info.sslrootcert = given(ssl_truststore);
    if let Err(e) = info.tls() {
        config_error(e);
    }
    if !conninfo::is_null_word(ssl_keystore_pass) {
        pgrx::notice!(
            "ssl_keystore_pass is not used: synchdb reads PEM files, and the client key must be unencrypted"
        );
    }
    if !conninfo::is_null_word(ssl_truststore_pass) {
        pgrx::notice!("ssl_truststore_pass is not used: a PEM CA bundle has no password");
    }
    // Only these keys change: the password loaded above may come from
    // synchdb_secrets and must not be written into data.
    if let Err(e) = Spi::run_with_args(
        "UPDATE public.synchdb_conninfo
            SET data = data || jsonb_build_object('sslmode', $2::text, 'sslcert', $3::text,
                                                  'sslrootcert', $4::text)
          WHERE name = $1",
        &[
            name.into(),
            info.sslmode.as_str().into(),
            info.sslcert.as_str().into(),
            info.sslrootcert.as_str().into(),
        ],
    ) {
        spi_error(e);
    }
    if shmem::get(my_database(), name).is_some_and(|s| s.pid > 0) {
        pgrx::notice!(
            "connector \"{name}\" is running; the TLS settings take effect when it starts again (synchdb_restart_connector)"
        );
    }
    0
}

/// Forgets a connector's TLS settings (`sslmode`, `sslrootcert`, `sslcert`,
/// `sslkey`): it connects with libpq's default, `prefer`, from its next start.
#[pg_extern]
fn synchdb_del_extra_conninfo(name: &str) -> i32 {
    if load_conninfo(name).is_none() {
        unknown_connector(name);
    }
    if let Err(e) = Spi::run_with_args(
        "UPDATE public.synchdb_conninfo
            SET data = data - 'sslmode' - 'sslrootcert' - 'sslcert' - 'sslkey'
          WHERE name = $1",
        &[name.into()],
    ) {
        spi_error(e);
    }
    0
}

#[pg_extern]
fn synchdb_del_conninfo(name: &str) -> i32 {
    let Some((_, info)) = load_conninfo(name) else {
        unknown_connector(name)
    };
    stop_worker(name, Duration::from_secs(30));
    crate::control::worker::drop_source_objects(name, &info);
    crate::control::worker::drop_local_origin(name);
    if let Err(e) = Spi::run_with_args(
        "DELETE FROM public.synchdb_conninfo WHERE name = $1",
        &[name.into()],
    ) {
        spi_error(e);
    }
    shmem::free(my_database(), name);
    0
}

#[pg_extern]
fn synchdb_start_engine_bgw(name: &str, mode: default!(&str, "'initial'")) -> i32 {
    start_connector(name, mode)
}

/// Stops the connector if it runs, then starts it in `mode`.
#[pg_extern]
fn synchdb_restart_connector(name: &str, mode: default!(&str, "'initial'")) -> i32 {
    if let Err(e) = Mode::parse(mode) {
        config_error(e);
    }
    if load_conninfo(name).is_none() {
        unknown_connector(name);
    }
    stop_worker(name, Duration::from_secs(60));
    start_connector(name, mode)
}

fn not_running(name: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("connector \"{name}\" is not running"),
        None,
        Some("Start it with synchdb_start_engine_bgw."),
    )
}

/// Waits (briefly) until the worker reports `state`.
fn wait_for_state(name: &str, state: shmem::State, timeout: Duration) -> bool {
    let started = Instant::now();
    loop {
        match shmem::get(my_database(), name) {
            Some(s) if s.state == state => return true,
            Some(s) if s.pid < 0 => return false,
            None => return false,
            _ => {}
        }
        if started.elapsed() > timeout {
            return false;
        }
        nap();
    }
}

fn nap() {
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            50,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}

/// Pauses a running connector between two transactions.
#[pg_extern]
fn synchdb_pause_engine(name: &str) -> i32 {
    if load_conninfo(name).is_none() {
        unknown_connector(name);
    }
    if !shmem::send_request(my_database(), name, shmem::Request::Pause, None) {
        not_running(name);
    }
    if !wait_for_state(name, shmem::State::Paused, Duration::from_secs(30)) {
        pgrx::warning!(
            "connector \"{name}\" has not paused yet; it pauses after its current transaction"
        );
    }
    0
}

/// Resumes a paused connector (from the offset set while paused, if any).
#[pg_extern]
fn synchdb_resume_engine(name: &str) -> i32 {
    if load_conninfo(name).is_none() {
        unknown_connector(name);
    }
    if !shmem::send_request(my_database(), name, shmem::Request::Resume, None) {
        not_running(name);
    }
    0
}

/// Sets the position the connector resumes streaming from; only while paused.
#[pg_extern]
fn synchdb_set_offset(name: &str, lsn: &str) -> i32 {
    if load_conninfo(name).is_none() {
        unknown_connector(name);
    }
    // X/Y, an integer, or the JSON of last_dbz_offset (its "lsn").
    let value = match crate::control::compat::parse_offset(lsn) {
        Ok(v) if v > 0 => v,
        other => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!(
                "invalid offset \"{}\"",
                lsn.trim().chars().take(200).collect::<String>()
            ),
            other.err(),
            Some("Give an LSN as X/Y (e.g. 0/1A2B3C4), as an integer, or the JSON shown in last_dbz_offset of synchdb_state_view (its \"lsn\" is used)."),
        ),
    };
    match shmem::get(my_database(), name) {
        // Paused for a schema review: nothing streams yet, and the copy
        // that follows the resume sets each table's position.
        Some(s)
            if s.pid > 0
                && s.state == shmem::State::Paused
                && s.stage == shmem::Stage::SchemaSync =>
        {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("connector \"{name}\" is paused in schema sync"),
                None,
                Some("Resume it with synchdb_resume_engine: it copies the tables and then streams; set an offset once it streams."),
            )
        }
        Some(s) if s.pid > 0 && s.state == shmem::State::Paused => {}
        Some(s) if s.pid > 0 => raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("connector \"{name}\" is not paused"),
            None,
            Some("Pause it first with synchdb_pause_engine."),
        ),
        _ => not_running(name),
    }
    if !shmem::send_request(my_database(), name, shmem::Request::SetOffset, Some(value)) {
        not_running(name);
    }
    shmem::forget_positions(my_database(), name);
    0
}

fn start_connector(name: &str, mode: &str) -> i32 {
    let mode = match Mode::parse(mode) {
        Ok(m) => m,
        Err(e) => config_error(e),
    };
    let Some((_, info)) = load_conninfo(name) else {
        unknown_connector(name)
    };
    if let Err(e) = info.validate() {
        config_error(e);
    }
    if let Err(e) = Spi::run_with_args(
        "INSERT INTO public.synchdb_runtime (name, mode, started_at) VALUES ($1, $2, now())
         ON CONFLICT (name) DO UPDATE SET mode = EXCLUDED.mode, started_at = now()",
        &[name.into(), mode.as_str().into()],
    ) {
        spi_error(e);
    }
    if let Err(e) = Spi::run_with_args(
        "UPDATE public.synchdb_conninfo SET isactive = true WHERE name = $1",
        &[name.into()],
    ) {
        spi_error(e);
    }
    match start_worker(my_database(), name, mode) {
        Ok(_) => 0,
        Err(StartError::AlreadyRunning(pid)) => raise(
            PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
            format!("connector \"{name}\" is already running"),
            Some(format!("Its worker has PID {pid}.")),
            Some("Stop it first with synchdb_stop_engine_bgw, or use synchdb_restart_connector."),
        ),
        Err(StartError::NoSlot) => raise(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            "out of synchdb connector slots".into(),
            None,
            Some("You might need to increase synchdb.max_connectors (SynchDB: synchdb.max_connector_workers)."),
        ),
        Err(StartError::NoWorker) => raise(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            "out of background worker slots".into(),
            Some(format!(
                "Could not register a worker for connector \"{name}\"."
            )),
            Some("You might need to increase max_worker_processes."),
        ),
    }
}

#[pg_extern]
fn synchdb_stop_engine_bgw(name: &str) -> i32 {
    if load_conninfo(name).is_none() {
        unknown_connector(name);
    }
    if let Err(e) = Spi::run_with_args(
        "UPDATE public.synchdb_conninfo SET isactive = false WHERE name = $1",
        &[name.into()],
    ) {
        spi_error(e);
    }
    if !stop_worker(name, Duration::from_secs(60)) {
        pgrx::notice!("connector \"{name}\" is not running");
    }
    0
}

#[pg_extern]
fn synchdb_state_rows() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(pid, i32),
        name!(stage, String),
        name!(state, String),
        name!(err, String),
        name!(last_dbz_offset, String),
    ),
> {
    let rows = shmem::snapshot(my_database())
        .into_iter()
        .map(|s| {
            (
                s.name,
                s.pid,
                s.stage.as_str().to_string(),
                s.state.as_str().to_string(),
                s.err,
                s.offset,
            )
        })
        .collect::<Vec<_>>();
    TableIterator::new(rows)
}

#[pg_extern]
#[allow(clippy::type_complexity)]
fn synchdb_stats_rows() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(ddls, i64),
        name!(inserts, i64),
        name!(updates, i64),
        name!(deletes, i64),
        name!(truncates, i64),
        name!(transactions, i64),
        name!(bad_changes, i64),
        name!(tables_copied, i64),
        name!(rows_copied, i64),
        name!(first_src_ts, i64),
        name!(last_src_ts, i64),
        name!(first_apply_ts, i64),
        name!(last_apply_ts, i64),
        name!(lag_bytes, i64),
    ),
> {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let rows = crate::control::stats::current(my_database())
        .into_iter()
        .map(|(name, s)| {
            let lag = if s.applied_lsn > 0 {
                s.received_lsn.saturating_sub(s.applied_lsn)
            } else {
                0
            };
            (
                name,
                n(s.ddls),
                n(s.inserts),
                n(s.updates),
                n(s.deletes),
                n(s.truncates),
                n(s.transactions),
                n(s.bad_changes),
                n(s.tables_copied),
                n(s.rows_copied),
                s.first_src_ts,
                s.last_src_ts,
                s.first_apply_ts,
                s.last_apply_ts,
                n(lag),
            )
        })
        .collect::<Vec<_>>();
    TableIterator::new(rows)
}

/// The name of the connector's replication slot and publication on the
/// source (and of its replication origin here): unique per destination
/// cluster and database, so several destinations can replicate one source.
#[pg_extern]
fn synchdb_object_name(name: &str) -> String {
    if load_conninfo(name).is_none() {
        unknown_connector(name);
    }
    crate::control::worker::object_name(name)
}

/// Zeroes a connector's statistics.
#[pg_extern]
fn synchdb_reset_stats(name: &str) -> i32 {
    if load_conninfo(name).is_none() {
        unknown_connector(name);
    }
    // Persisted and live (a connector that never ran since the server
    // started has only the persisted copy).
    crate::control::stats::reset(my_database(), name);
    0
}

/// Why a worker could not be started.
pub enum StartError {
    AlreadyRunning(i32),
    NoSlot,
    NoWorker,
}

/// Registers the connector's background worker and waits until the
/// postmaster started it. Used by `synchdb_start_engine_bgw` and by the
/// start-up path that brings active connectors back after a restart.
pub fn start_worker(dboid: pg_sys::Oid, name: &str, mode: Mode) -> Result<i32, StartError> {
    let idx = match shmem::claim_for_start(dboid, name) {
        Claim::Claimed(i) => i,
        Claim::AlreadyRunning(pid) => return Err(StartError::AlreadyRunning(pid)),
        Claim::NoFreeSlot => return Err(StartError::NoSlot),
    };
    let extra = format!("{idx}:{}:{name}", mode.as_str());
    let builder = BackgroundWorkerBuilder::new(&format!("synchdb connector {name}"))
        .set_type("synchdb connector")
        .set_library("synchdb")
        .set_function("synchdb_engine_main")
        .enable_shmem_access(None)
        .enable_spi_access()
        .set_restart_time(None)
        .set_argument(Some(pg_sys::Datum::from(dboid)))
        .set_extra(&extra)
        .set_notify_pid(unsafe { pg_sys::MyProcPid });
    let handle = match builder.load_dynamic() {
        Ok(h) => h,
        Err(_) => {
            shmem::release_claim(idx);
            return Err(StartError::NoWorker);
        }
    };
    match handle.wait_for_startup() {
        Ok(pid) => {
            shmem::set_pid_if_starting(idx, pid);
            Ok(pid)
        }
        Err(BackgroundWorkerStatus::Stopped) => {
            // It ran and ended already (e.g. a configuration error it recorded).
            shmem::release_claim(idx);
            Ok(-1)
        }
        Err(_) => {
            shmem::release_claim(idx);
            Err(StartError::NoWorker)
        }
    }
}

/// Asks a running worker to exit (SIGTERM) and waits until it has. Returns
/// false when it was not running.
pub fn stop_worker(name: &str, timeout: Duration) -> bool {
    let dboid = my_database();
    let Some(slot) = shmem::get(dboid, name) else {
        return false;
    };
    if slot.pid < 0 {
        return false;
    }
    let started = Instant::now();
    let mut signalled = 0;
    loop {
        let Some(s) = shmem::get(dboid, name) else {
            return true;
        };
        if s.pid < 0 {
            return true;
        }
        if s.pid > 0 && s.pid != signalled {
            unsafe {
                libc::kill(s.pid, libc::SIGTERM);
            }
            signalled = s.pid;
        }
        if started.elapsed() > timeout {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
                format!(
                    "connector \"{name}\" did not stop within {}s",
                    timeout.as_secs()
                ),
                Some(format!("Its worker has PID {}.", s.pid)),
                Some("Try again, or terminate the process with pg_terminate_backend."),
            );
        }
        nap();
    }
}
