-- The sequences the columns of one source table ($1 schema, $2 table) take
-- their values from: owned by the column (serial: deptype 'a'; identity:
-- deptype 'i') or named in its default (nextval('s'): a dependency of the
-- column's pg_attrdef entry), with the sequence's parameters from
-- pg_sequence (PostgreSQL 10 and later). Owned first for each column.
SELECT a.attname::text,
       sn.nspname::text,
       s.relname::text,
       d.owned,
       pg_catalog.format_type(q.seqtypid, NULL),
       q.seqstart,
       q.seqincrement,
       q.seqmin,
       q.seqmax,
       q.seqcache,
       q.seqcycle
  FROM pg_catalog.pg_class t
  JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
  JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
  JOIN (SELECT dep.refobjid AS relid, dep.refobjsubid AS attnum, dep.objid AS seqid, true AS owned
          FROM pg_catalog.pg_depend dep
         WHERE dep.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
           AND dep.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
           AND dep.deptype IN ('a', 'i')
        UNION ALL
        SELECT ad.adrelid, ad.adnum, dep.refobjid, false
          FROM pg_catalog.pg_attrdef ad
          JOIN pg_catalog.pg_depend dep
            ON dep.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND dep.objid = ad.oid
           AND dep.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass) d
    ON d.relid = t.oid AND d.attnum = a.attnum
  JOIN pg_catalog.pg_class s ON s.oid = d.seqid AND s.relkind = 'S'
  JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace
  JOIN pg_catalog.pg_sequence q ON q.seqrelid = s.oid
 WHERE tn.nspname = $1 AND t.relname = $2
 ORDER BY a.attnum, d.owned DESC, sn.nspname, s.relname
