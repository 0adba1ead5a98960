//! How big the tables to copy are, read on the source when a copy starts
//! (for `control::progress`): rows from `reltuples` scaled to the table's
//! current size, as the planner does, or from its size and row width when
//! it was never vacuumed or analyzed; bytes from `pg_table_size`. A
//! partitioned or inherited table counts its whole tree (the copy reads it).

use tokio_postgres::Client;

const ESTIMATE: &str = "
WITH RECURSIVE tree(relid) AS (
    SELECT $1::oid
    UNION ALL
    SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.relid),
leaf AS (
    SELECT c.reltuples::float8 AS reltuples, c.relpages::float8 AS relpages,
           pg_catalog.pg_relation_size(c.oid)::float8 AS heap,
           coalesce(pg_catalog.pg_table_size(c.oid), 0)::float8 AS size,
           (SELECT coalesce(sum(CASE WHEN a.attlen > 0 THEN a.attlen ELSE 32 END), 0)
              FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)::float8 AS width,
           current_setting('block_size')::float8 AS bs
      FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.relid
     WHERE c.relkind IN ('r', 'm'))
SELECT coalesce(sum(CASE WHEN relpages > 0 AND reltuples >= 0
                         THEN reltuples / relpages * ceil(heap / bs)
                         ELSE ceil(heap / bs) * floor((bs - 24) / (width + 28))
                    END), 0)::int8,
       coalesce(sum(size), 0)::int8
  FROM leaf";

/// (rows, bytes) of table `oid` and its descendants.
pub async fn estimate(client: &Client, oid: u32) -> Result<(u64, u64), tokio_postgres::Error> {
    let row = client.query_one(ESTIMATE, &[&oid]).await?;
    let rows: i64 = row.try_get(0)?;
    let bytes: i64 = row.try_get(1)?;
    Ok((
        u64::try_from(rows).unwrap_or(0),
        u64::try_from(bytes).unwrap_or(0),
    ))
}
