-- One source type ($1 oid): whether it is user-defined, and what defines it.
-- Columns: kind, name, typtype, domain base type, domain typmod,
--          domain NOT NULL, range subtype.
SELECT CASE WHEN e.extname IS NOT NULL THEN 'extension'
            WHEN n.nspname IN ('pg_catalog', 'information_schema') THEN 'builtin'
            ELSE 'user' END,
       t.typname::text,
       t.typtype,
       t.typbasetype,
       t.typtypmod,
       t.typnotnull,
       coalesce(r.rngsubtype, 0::oid)
  FROM pg_catalog.pg_type t
  JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
  LEFT JOIN pg_catalog.pg_range r ON r.rngtypid = t.oid
  LEFT JOIN pg_catalog.pg_depend dep ON dep.classid = 'pg_catalog.pg_type'::regclass
        AND dep.objid = t.oid AND dep.deptype = 'e'
  LEFT JOIN pg_catalog.pg_extension e ON e.oid = dep.refobjid
 WHERE t.oid = $1
