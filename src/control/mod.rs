//! The control side of synchdb, everything a DBA drives from SQL: the
//! functions and views (`api`), the connector definition and its validation
//! (`conninfo`), the `synchdb.*` settings (`gucs`), shared memory with one slot
//! per connector (`shmem`), the background workers that run connectors
//! (`worker`), where source passwords come from (`secrets`) and the
//! switch-over helpers (`switchover`). Nothing here talks pgoutput; the
//! connector's work itself is in `engine`, `source` and `apply`.

pub mod api;
pub mod compat;
pub mod conninfo;
pub mod gucs;
pub mod objmap;
pub mod progress;
pub mod secrets;
pub mod shmem;
pub mod stats;
pub mod switchover;
pub mod tablelist;
pub mod worker;
