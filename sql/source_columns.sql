-- Columns of one source table ($1 schema, $2 table), with how the destination
-- must name each column's type:
--   kind 'builtin'   -> format_type text (col 1)
--   kind 'user'      -> a user-defined type re-created in the destination schema
--   kind 'extension' -> a type owned by an extension (name in col 7)
-- Arrays are described through their element type and dimension count.
WITH cols AS (
    SELECT a.attrelid, a.attnum, a.attname::text AS attname, a.atttypid, a.atttypmod, a.attnotnull,
           CASE WHEN a.attgenerated = 's'
                THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END AS generated,
           CASE WHEN t.typcategory = 'A' AND t.typelem <> 0 THEN t.typelem ELSE t.oid END AS elem,
           CASE WHEN t.typcategory = 'A' AND t.typelem <> 0 THEN greatest(a.attndims, 1) ELSE 0 END AS dims
      FROM pg_catalog.pg_attribute a
      JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
      LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE a.attrelid = (SELECT c.oid FROM pg_catalog.pg_class c
                           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname = $1 AND c.relname = $2)
       AND a.attnum > 0 AND NOT a.attisdropped
)
SELECT c.attname,
       pg_catalog.format_type(c.atttypid, c.atttypmod),
       c.attnotnull,
       c.generated,
       CASE WHEN e.extname IS NOT NULL THEN 'extension'
            WHEN en.nspname IN ('pg_catalog', 'information_schema') THEN 'builtin'
            ELSE 'user' END AS kind,
       et.typname::text,
       c.dims::int,
       e.extname::text,
       c.elem,
       c.attrelid
  FROM cols c
  JOIN pg_catalog.pg_type et ON et.oid = c.elem
  JOIN pg_catalog.pg_namespace en ON en.oid = et.typnamespace
  LEFT JOIN pg_catalog.pg_depend dep ON dep.classid = 'pg_catalog.pg_type'::regclass
        AND dep.objid = c.elem AND dep.deptype = 'e'
  LEFT JOIN pg_catalog.pg_extension e ON e.oid = dep.refobjid
 ORDER BY c.attnum
