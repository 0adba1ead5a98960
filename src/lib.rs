//! synchdb: a PostgreSQL extension that replicates a live source PostgreSQL
//! database into this one (consistent snapshot, then pgoutput change data
//! capture applied through SPI). This file is the entry point: `_PG_init` is a
//! short checklist, and the module list says who owns what.

use pgrx::prelude::*;

pub mod apply;
pub mod control;
pub mod engine;
pub mod lsn;
pub mod source;

use control::{api, gucs, shmem, worker};

pgrx::pg_module_magic!();

extension_sql_file!("../sql/catalog.sql", name = "catalog", bootstrap);
extension_sql_file!(
    "../sql/stats.sql",
    name = "stats",
    requires = [
        control::stats::synchdb_stats_all_rows,
        control::progress::synchdb_snapshot_progress_rows,
        control::progress::synchdb_snapshot_progress_total_rows
    ]
);
extension_sql_file!("../sql/views.sql", name = "views", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    if unsafe { !pg_sys::process_shared_preload_libraries_in_progress } {
        api::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "synchdb must be loaded via shared_preload_libraries".into(),
            None,
            Some("Add synchdb to shared_preload_libraries in postgresql.conf and restart the server."),
        );
    }
    gucs::init();
    shmem::init();
    control::progress::init();
    if gucs::auto_launcher() {
        worker::register_launcher();
    }
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'synchdb'"]
    }
}
