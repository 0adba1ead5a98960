-- synchdb views and privileges (runs after the functions exist).

-- Every connector of this database, running or not. Built over the shared
-- memory copy returned by synchdb_state_rows(); the password is never part of it.
CREATE VIEW synchdb_state_view AS
SELECT c.name::text                                                   AS name,
       lower(c.data ->> 'connector')                                  AS connector_type,
       coalesce(s.pid, -1)                                            AS pid,
       coalesce(s.stage, '')                                          AS stage,
       coalesce(s.state, 'stopped')                                   AS state,
       coalesce(s.err, 'no error')                                    AS err,
       coalesce(s.last_dbz_offset, 'offset file not flushed yet')     AS last_dbz_offset
  FROM synchdb_conninfo c
  LEFT JOIN synchdb_state_rows() s ON s.name = c.name
 ORDER BY c.name;
GRANT SELECT ON synchdb_state_view TO PUBLIC;

-- Per-connector statistics (since the server started or the last
-- synchdb_reset_stats), one row per connector of this database.
CREATE VIEW synchdb_stats_view AS
SELECT c.name::text                                           AS name,
       coalesce(s.ddls, 0)                                    AS ddls,
       coalesce(s.inserts + s.updates + s.deletes + s.truncates, 0) AS dmls,
       coalesce(s.inserts, 0)                                 AS inserts,
       coalesce(s.updates, 0)                                 AS updates,
       coalesce(s.deletes, 0)                                 AS deletes,
       coalesce(s.truncates, 0)                               AS truncates,
       coalesce(s.transactions, 0)                            AS transactions,
       coalesce(s.bad_changes, 0)                             AS bad_changes,
       coalesce(s.ddls + s.inserts + s.updates + s.deletes + s.truncates, 0) AS total_changes,
       coalesce(s.tables_copied, 0)                           AS tables_copied,
       coalesce(s.rows_copied, 0)                             AS rows_copied,
       to_timestamp(nullif(s.first_src_ts, 0) / 1e6)          AS first_src_ts,
       to_timestamp(nullif(s.last_src_ts, 0) / 1e6)           AS last_src_ts,
       to_timestamp(nullif(s.first_apply_ts, 0) / 1e6)        AS first_apply_ts,
       to_timestamp(nullif(s.last_apply_ts, 0) / 1e6)         AS last_apply_ts,
       coalesce(s.lag_bytes, 0)                               AS lag_bytes,
       (nullif(s.last_apply_ts, 0) - nullif(s.last_src_ts, 0)) / 1e6 AS lag_seconds
  FROM synchdb_conninfo c
  LEFT JOIN synchdb_stats_rows() s ON s.name = c.name
 ORDER BY c.name;
GRANT SELECT ON synchdb_stats_view TO PUBLIC;

-- The connector definitions without the password, readable by everyone.
CREATE VIEW synchdb_conninfo_view AS
SELECT name, isactive, data - 'pwd' AS data
  FROM synchdb_conninfo;
GRANT SELECT ON synchdb_conninfo_view TO PUBLIC;

-- Controlling connectors is for superusers (and roles they grant it to).
REVOKE EXECUTE ON FUNCTION synchdb_add_conninfo(text, text, integer, text, text, text, text, text, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_del_conninfo(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_add_extra_conninfo(text, text, text, text, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_del_extra_conninfo(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_start_engine_bgw(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_stop_engine_bgw(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_restart_connector(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_pause_engine(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_resume_engine(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_set_offset(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_reset_stats(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_set_password(text, text) FROM PUBLIC;

-- The switch-over (README, "Switch-over"): whether the replica has caught up
-- with the source, with LSNs typed as such.
CREATE FUNCTION synchdb_switchover_check(name text)
RETURNS TABLE (source_lsn pg_lsn, applied_lsn pg_lsn, lag_bytes bigint,
               tables_not_ready int, state text, caught_up boolean)
LANGUAGE sql STRICT VOLATILE
AS $$
  SELECT r.source_lsn::pg_lsn, r.applied_lsn::pg_lsn, r.lag_bytes,
         r.tables_not_ready, r.state, r.caught_up
    FROM public.synchdb_switchover_rows($1) r
$$;
REVOKE EXECUTE ON FUNCTION synchdb_switchover_rows(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_switchover_check(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_sync_sequences(text) FROM PUBLIC;

-- Object mappings (README, "Object mapping"): each replicated source column
-- and what it became in the destination, as SynchDB's synchdb_att_view.
CREATE VIEW synchdb_att_view AS
SELECT a.name,
       lower(c.data ->> 'connector')                          AS type,
       pa.attnum,
       a.ext_tbname,
       ts.dst_schema || '.' || ts.dst_table                   AS pg_tbname,
       a.ext_attname,
       pa.attname::text                                       AS pg_attname,
       a.ext_atttypename,
       pg_catalog.format_type(pa.atttypid, pa.atttypmod)      AS pg_atttypename,
       (SELECT m.dstobj FROM public.synchdb_objmap m
         WHERE m.name = a.name AND m.objtype = 'transform' AND m.enabled
           AND m.srcobj = a.ext_colobj)                        AS transform
  FROM public.synchdb_attribute a
  JOIN public.synchdb_conninfo c ON c.name = a.name
  JOIN public.synchdb_table_state ts
    ON ts.name = a.name AND ts.src_schema = a.src_schema AND ts.src_table = a.src_table
  LEFT JOIN pg_catalog.pg_attribute pa
    ON pa.attrelid = pg_catalog.to_regclass(pg_catalog.quote_ident(ts.dst_schema) || '.' ||
                                           pg_catalog.quote_ident(ts.dst_table))
   AND pa.attname = a.pg_attname AND pa.attnum > 0 AND NOT pa.attisdropped
 ORDER BY a.name, a.ext_tbname, a.position;
GRANT SELECT ON synchdb_att_view TO PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_add_objmap(text, text, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_del_objmap(text, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION synchdb_reload_objmap(text) FROM PUBLIC;
