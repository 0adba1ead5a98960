-- Attributes of a composite type ($1 type oid): name, kind, format_type,
-- element type name, dimensions, element type oid, extension name.
SELECT a.attname::text,
       CASE WHEN e.extname IS NOT NULL THEN 'extension'
            WHEN en.nspname IN ('pg_catalog', 'information_schema') THEN 'builtin'
            ELSE 'user' END,
       pg_catalog.format_type(a.atttypid, a.atttypmod),
       et.typname::text,
       CASE WHEN t.typcategory = 'A' AND t.typelem <> 0 THEN greatest(a.attndims, 1) ELSE 0 END::int,
       et.oid,
       e.extname::text
  FROM pg_catalog.pg_type ct
  JOIN pg_catalog.pg_attribute a ON a.attrelid = ct.typrelid
  JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
  JOIN pg_catalog.pg_type et
    ON et.oid = CASE WHEN t.typcategory = 'A' AND t.typelem <> 0 THEN t.typelem ELSE t.oid END
  JOIN pg_catalog.pg_namespace en ON en.oid = et.typnamespace
  LEFT JOIN pg_catalog.pg_depend dep ON dep.classid = 'pg_catalog.pg_type'::regclass
        AND dep.objid = et.oid AND dep.deptype = 'e'
  LEFT JOIN pg_catalog.pg_extension e ON e.oid = dep.refobjid
 WHERE ct.oid = $1 AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum
