//! Mode `schemasync`: after the destination tables are built (empty, with
//! the object mappings applied by the usual table creation), the worker
//! waits with stage `schema sync` and state `paused` so that the operator
//! can review `synchdb_att_view` and adjust mappings. Nothing is read from
//! the source meanwhile: no slot or publication is made for the review, so
//! the source retains no WAL for it (a slot the connector already had stays
//! and keeps its position). `synchdb_resume_engine` ends the review: the
//! connector's start mode becomes `initial` (so a server restart after the
//! resume does not review again) and the worker starts over in `initial`,
//! which copies the reviewed tables (their state is 'schema' or 'copy')
//! under a fresh exported snapshot and streams from its consistent point
//! on; a restart before the resume comes back paused in `schema sync`.

use super::*;

/// Waits for the resume (`Err(Stop::Reviewed)`), a stop (`Ok`), or the
/// connector being dropped (`Ok`).
pub(super) fn hold_for_review(
    ctx: &WorkerContext,
    rt: &tokio::runtime::Runtime,
) -> Result<(), Stop> {
    let slot = ctx.slot;
    slot.set_stage(Stage::SchemaSync);
    slot.set_state(State::Paused);
    slot.set_err("no error");
    // Lets the runtime close the source connections dropped before.
    block(rt, async {
        tokio::time::sleep(Duration::from_millis(20)).await
    })?;
    pgrx::log!(
        "synchdb: connector \"{}\" built its tables and waits in schema sync; review them, then run SELECT synchdb_resume_engine('{}')",
        ctx.name,
        ctx.name.replace('\'', "''")
    );
    let mut last_check = Instant::now();
    loop {
        if !sleep_or_stop(Duration::from_millis(200)) {
            return Ok(());
        }
        let (req, _) = slot.take_request();
        match req {
            Request::Resume => break,
            // Already paused; an offset is refused while in schema sync.
            Request::Pause | Request::SetOffset | Request::None => {}
        }
        if last_check.elapsed() > Duration::from_secs(5) {
            last_check = Instant::now();
            if !still_defined(&ctx.name) {
                return Ok(());
            }
        }
    }
    let name = ctx.name.clone();
    pgtxn::run(|| {
        Spi::run_with_args(
            "UPDATE public.synchdb_runtime SET mode = 'initial'
              WHERE name = $1 AND mode = 'schemasync'",
            &[name.as_str().into()],
        )
    })
    .map_err(Stop::Fatal)?
    .map_err(|e| Stop::Fatal(format!("recording the end of the schema review: {e}")))?;
    pgrx::log!(
        "synchdb: connector \"{}\" resumed after schema sync; copying the tables, then streaming",
        ctx.name
    );
    Err(Stop::Reviewed)
}
