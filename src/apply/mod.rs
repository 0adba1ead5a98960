//! The destination side of a connector, on the worker's main thread: the
//! relation map and change application (`applier`), the executor path for
//! row changes (`direct`), SQL text and prepared statements (`sqlgen`),
//! schema creation and following (`schema`), secondary indexes after a copy
//! (`indexes`), object mappings (`mapping`), relation cache invalidations
//! (`relcache`), text from the source that becomes DDL (`untrusted`),
//! writing as the table's owner (`usercontext`) and transactions with
//! ERRORs caught (`pgtxn`).

pub mod applier;
pub mod direct;
pub mod indexes;
pub mod mapping;
pub mod pgtxn;
pub mod relcache;
pub mod schema;
pub mod sqlgen;
pub mod untrusted;
pub mod usercontext;
