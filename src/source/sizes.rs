//! How big the tables to copy are, read on the source when a copy starts
//! (for `control::progress`): rows from `reltuples` scaled to the table's
//! current size, as the planner does, or from its size and row width when
//! it was never vacuumed or analyzed; bytes from `pg_table_size`. A
//! partitioned or inherited table counts its whole tree (the copy reads it).

use tokio_postgres::Client;

const ESTIMATE: &str = "
WITH RECURSIVE tree(root, relid) AS (
    SELECT r, r FROM unnest($1::oid[]) r
    UNION ALL
    SELECT tree.root, i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.relid),
leaf AS (
    SELECT tree.root, c.reltuples::float8 AS reltuples, c.relpages::float8 AS relpages,
           pg_catalog.pg_relation_size(c.oid)::float8 AS heap,
           coalesce(pg_catalog.pg_table_size(c.oid), 0)::float8 AS size,
           (SELECT coalesce(sum(CASE WHEN a.attlen > 0 THEN a.attlen ELSE 32 END), 0)
              FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)::float8 AS width,
           current_setting('block_size')::float8 AS bs
      FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.relid
     WHERE c.relkind IN ('r', 'm'))
SELECT r.root,
       coalesce(sum(CASE WHEN relpages > 0 AND reltuples >= 0
                         THEN reltuples / relpages * ceil(heap / bs)
                         ELSE ceil(heap / bs) * floor((bs - 24) / (width + 28))
                    END), 0)::int8,
       coalesce(sum(size), 0)::int8
  FROM unnest($1::oid[]) AS r(root) LEFT JOIN leaf USING (root)
 GROUP BY r.root";

/// (rows, bytes) of each table of `oids` with its descendants, in one
/// query; in the order of `oids`.
pub async fn estimate(
    client: &Client,
    oids: &[u32],
) -> Result<Vec<(u64, u64)>, tokio_postgres::Error> {
    let list: Vec<u32> = oids.to_vec();
    let rows = client.query(ESTIMATE, &[&list]).await?;
    let mut found = std::collections::HashMap::new();
    for row in rows {
        let oid: u32 = row.try_get(0)?;
        let n: i64 = row.try_get(1)?;
        let bytes: i64 = row.try_get(2)?;
        found.insert(
            oid,
            (
                u64::try_from(n).unwrap_or(0),
                u64::try_from(bytes).unwrap_or(0),
            ),
        );
    }
    Ok(oids
        .iter()
        .map(|o| found.get(o).copied().unwrap_or((0, 0)))
        .collect())
}
