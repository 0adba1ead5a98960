-- One source type ($1 oid): whether it is user-defined, and what defines it.
-- Columns: kind, name, typtype, domain base type, domain typmod,
--          domain NOT NULL, range subtype, a range's multirange type name,
--          a multirange's range type. pg_range is read through to_jsonb so
--          that sources older than PostgreSQL 14 (no multiranges) work too.
SELECT CASE WHEN e.extname IS NOT NULL THEN 'extension'
            WHEN n.nspname IN ('pg_catalog', 'information_schema') THEN 'builtin'
            ELSE 'user' END,
       t.typname::text,
       t.typtype,
       t.typbasetype,
       t.typtypmod,
       t.typnotnull,
       coalesce(r.rngsubtype, 0::oid),
       (SELECT mt.typname::text FROM pg_catalog.pg_type mt
         WHERE mt.oid = (to_jsonb(r) ->> 'rngmultitypid')::oid),
       coalesce((SELECT r2.rngtypid FROM pg_catalog.pg_range r2
                  WHERE (to_jsonb(r2) ->> 'rngmultitypid')::oid = t.oid), 0::oid)
  FROM pg_catalog.pg_type t
  JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
  LEFT JOIN pg_catalog.pg_range r ON r.rngtypid = t.oid
  LEFT JOIN pg_catalog.pg_depend dep ON dep.classid = 'pg_catalog.pg_type'::regclass
        AND dep.objid = t.oid AND dep.deptype = 'e'
  LEFT JOIN pg_catalog.pg_extension e ON e.oid = dep.refobjid
 WHERE t.oid = $1
