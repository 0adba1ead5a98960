-- synchdb statistics that survive a server restart, SynchDB's statistics
-- views, and the live progress of the initial copy (README, "Statistics and
-- progress").

-- The counters of each connector as of the last save by its worker (every
-- few seconds while it runs, and when it stops); loaded into shared memory
-- when the worker first starts after a server restart. Timestamps are
-- microseconds since the Unix epoch, 0 when not set.
CREATE TABLE synchdb_stats (
    name              text PRIMARY KEY REFERENCES synchdb_conninfo (name)
                          ON DELETE CASCADE ON UPDATE CASCADE,
    ddls              bigint NOT NULL DEFAULT 0,
    inserts           bigint NOT NULL DEFAULT 0,
    updates           bigint NOT NULL DEFAULT 0,
    deletes           bigint NOT NULL DEFAULT 0,
    truncates         bigint NOT NULL DEFAULT 0,
    transactions      bigint NOT NULL DEFAULT 0,
    bad_changes       bigint NOT NULL DEFAULT 0,
    tables_copied     bigint NOT NULL DEFAULT 0,
    rows_copied       bigint NOT NULL DEFAULT 0,
    batches           bigint NOT NULL DEFAULT 0,
    first_src_ts      bigint NOT NULL DEFAULT 0,
    last_src_ts       bigint NOT NULL DEFAULT 0,
    first_apply_ts    bigint NOT NULL DEFAULT 0,
    last_apply_ts     bigint NOT NULL DEFAULT 0,
    batch_begin_ts    bigint NOT NULL DEFAULT 0,
    snapshot_begin_ts bigint NOT NULL DEFAULT 0,
    snapshot_end_ts   bigint NOT NULL DEFAULT 0,
    saved_at          timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON synchdb_stats FROM PUBLIC;
-- Statistics are no secret (synchdb_stats_view is everyone's too).
GRANT SELECT ON synchdb_stats TO PUBLIC;

-- SynchDB's statistics function: a set of records, read with a column
-- definition list as SynchDB's views do.
CREATE FUNCTION synchdb_get_stats() RETURNS SETOF record
LANGUAGE sql STABLE
AS $$ SELECT * FROM public.synchdb_stats_all_rows() $$;

-- SynchDB's three statistics views, with its column names and types
-- (timestamps: bigint milliseconds since the Unix epoch, 0 when not set).
CREATE VIEW synchdb_genstats AS
SELECT name, bad_events, total_events, batches_done, average_batch_size,
       first_src_ts, first_pg_ts, last_src_ts, last_pg_ts
  FROM synchdb_get_stats() AS (
       name text, ddls bigint, dmls bigint, creates bigint, updates bigint,
       deletes bigint, txs bigint, truncates bigint, bad_events bigint,
       total_events bigint, batches_done bigint, average_batch_size bigint,
       first_src_ts bigint, first_pg_ts bigint, last_src_ts bigint,
       last_pg_ts bigint, tables bigint, rows bigint,
       snapshot_begin_ts bigint, snapshot_end_ts bigint);
GRANT SELECT ON synchdb_genstats TO PUBLIC;

CREATE VIEW synchdb_snapstats AS
SELECT name, tables, rows, snapshot_begin_ts, snapshot_end_ts
  FROM synchdb_get_stats() AS (
       name text, ddls bigint, dmls bigint, creates bigint, updates bigint,
       deletes bigint, txs bigint, truncates bigint, bad_events bigint,
       total_events bigint, batches_done bigint, average_batch_size bigint,
       first_src_ts bigint, first_pg_ts bigint, last_src_ts bigint,
       last_pg_ts bigint, tables bigint, rows bigint,
       snapshot_begin_ts bigint, snapshot_end_ts bigint);
GRANT SELECT ON synchdb_snapstats TO PUBLIC;

CREATE VIEW synchdb_cdcstats AS
SELECT name, ddls, dmls, creates, updates, deletes, txs, truncates
  FROM synchdb_get_stats() AS (
       name text, ddls bigint, dmls bigint, creates bigint, updates bigint,
       deletes bigint, txs bigint, truncates bigint, bad_events bigint,
       total_events bigint, batches_done bigint, average_batch_size bigint,
       first_src_ts bigint, first_pg_ts bigint, last_src_ts bigint,
       last_pg_ts bigint, tables bigint, rows bigint,
       snapshot_begin_ts bigint, snapshot_end_ts bigint);
GRANT SELECT ON synchdb_cdcstats TO PUBLIC;

-- The initial copy while it runs (and the last one since the server
-- started), per table: rows and bytes copied so far (bytes of COPY data
-- received), the estimates read from the source when the copy started
-- (reltuples scaled to the table's current size; its size on disk), rate
-- and ETA. Updated by the copy at least every 100 ms.
CREATE VIEW synchdb_snapshot_progress AS
SELECT p.name,
       p.src_schema,
       p.src_table,
       p.state,
       p.rows_copied,
       p.rows_estimated,
       p.bytes_copied,
       p.bytes_estimated,
       CASE WHEN p.state = 'done' THEN 100.0
            ELSE round(least(100.0, 100.0 * p.rows_copied / nullif(p.rows_estimated, 0)), 1)
       END                                                    AS percent_done,
       round(p.rows_per_sec)::bigint                          AS rows_per_sec,
       round(p.bytes_per_sec)::bigint                         AS bytes_per_sec,
       make_interval(secs => round(p.eta_secs::numeric, 1)::double precision) AS eta,
       to_timestamp(p.started_us / 1e6)                       AS started_at,
       to_timestamp(p.finished_us / 1e6)                      AS finished_at
  FROM public.synchdb_snapshot_progress_rows() p;
GRANT SELECT ON synchdb_snapshot_progress TO PUBLIC;

-- The same in total, one row per connector.
CREATE VIEW synchdb_snapshot_progress_total AS
SELECT p.name,
       p.state,
       p.tables_total,
       p.tables_pending,
       p.tables_copying,
       p.tables_done,
       p.rows_copied,
       p.rows_estimated,
       p.bytes_copied,
       p.bytes_estimated,
       CASE WHEN p.state = 'done' THEN 100.0
            ELSE round(least(100.0, 100.0 * p.rows_copied / nullif(p.rows_estimated, 0)), 1)
       END                                                    AS percent_done,
       round(p.rows_per_sec)::bigint                          AS rows_per_sec,
       round(p.bytes_per_sec)::bigint                         AS bytes_per_sec,
       make_interval(secs => round(p.eta_secs::numeric, 1)::double precision) AS eta,
       to_timestamp(p.started_us / 1e6)                       AS started_at,
       to_timestamp(p.finished_us / 1e6)                      AS finished_at
  FROM public.synchdb_snapshot_progress_total_rows() p;
GRANT SELECT ON synchdb_snapshot_progress_total TO PUBLIC;
