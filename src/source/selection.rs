//! Resolving a table list with patterns (`control::tablelist`) against the
//! source: which of its tables a Debezium-style include list selects now.
//! Run at every start and by the publication watch while streaming, so
//! tables created later that match join the capture.

use crate::control::conninfo::TableRef;
use crate::control::tablelist::Selection;
use crate::source::catalog::SourceError;
use tokio_postgres::Client;

/// The tables `sel` selects on the source: its names (checked later by
/// `list_tables`) and every ordinary or partitioned table, outside the
/// system schemas, whose `schema.table` a pattern matches. Partitions are
/// left out: they replicate through their root, as with a whole schema.
pub async fn resolve(client: &Client, sel: &Selection) -> Result<Vec<TableRef>, SourceError> {
    if !sel.has_patterns() {
        return Ok(sel.names.clone());
    }
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r','p') AND NOT c.relispartition
                AND c.relpersistence = 'p'
                AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
              ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(SourceError::from_pg)?;
    let existing: Vec<TableRef> = rows
        .iter()
        .map(|r| TableRef {
            schema: r.get(0),
            table: r.get(1),
        })
        .collect();
    Ok(sel.resolve(&existing))
}
