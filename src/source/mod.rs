//! The source side of a connector, plain Rust on the worker's tokio runtime
//! (nothing here calls into PostgreSQL): normal connections with their
//! version dialects, catalog queries, publication and slot management and
//! snapshot COPY (`catalog`), the replication-protocol client (`replication`,
//! also the snapshot reader's COPY), TLS for both kinds of connection
//! (`tls`), pgoutput decoding (`decode`) and the rewriting of binary COPY
//! data on its way (`binary_copy`).

pub mod binary_copy;
pub mod catalog;
pub mod decode;
pub mod replication;
pub mod selection;
pub mod sizes;
pub mod tls;
