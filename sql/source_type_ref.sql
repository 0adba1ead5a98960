-- How to name a type ($1 oid, $2 typmod) in the destination: kind,
-- format_type text, element type name, array dimensions, extension name.
SELECT CASE WHEN e.extname IS NOT NULL THEN 'extension'
            WHEN en.nspname IN ('pg_catalog', 'information_schema') THEN 'builtin'
            ELSE 'user' END,
       pg_catalog.format_type(t.oid, $2),
       et.typname::text,
       CASE WHEN t.typcategory = 'A' AND t.typelem <> 0 THEN 1 ELSE 0 END,
       e.extname::text
  FROM pg_catalog.pg_type t
  JOIN pg_catalog.pg_type et
    ON et.oid = CASE WHEN t.typcategory = 'A' AND t.typelem <> 0 THEN t.typelem ELSE t.oid END
  JOIN pg_catalog.pg_namespace en ON en.oid = et.typnamespace
  LEFT JOIN pg_catalog.pg_depend dep ON dep.classid = 'pg_catalog.pg_type'::regclass
        AND dep.objid = et.oid AND dep.deptype = 'e'
  LEFT JOIN pg_catalog.pg_extension e ON e.oid = dep.refobjid
 WHERE t.oid = $1
