-- synchdb catalog: connector definitions and per-connector bookkeeping.

-- One row per connector. Users may edit "data" with jsonb_set; the next start
-- of the connector reads it again. Holds the source password: no access for
-- PUBLIC (superusers only), see synchdb_conninfo_view for the rest.
CREATE TABLE synchdb_conninfo (
    name     text PRIMARY KEY,
    isactive bool NOT NULL DEFAULT false,
    data     jsonb NOT NULL
);
REVOKE ALL ON synchdb_conninfo FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('synchdb_conninfo', '');

-- Source passwords set with synchdb_set_password: outside "data", and not
-- part of the extension's dumped configuration (pg_dump leaves them out).
CREATE TABLE synchdb_secrets (
    name text PRIMARY KEY REFERENCES synchdb_conninfo (name)
             ON DELETE CASCADE ON UPDATE CASCADE,
    pwd  text NOT NULL
);
REVOKE ALL ON synchdb_secrets FROM PUBLIC;

-- The name of each connector's slot and publication on the source and of its
-- replication origin here, chosen once when the connector is added (unique
-- per destination cluster and database; see synchdb_object_name()).
CREATE TABLE synchdb_objects (
    name        text PRIMARY KEY REFERENCES synchdb_conninfo (name)
                    ON DELETE CASCADE ON UPDATE CASCADE,
    object_name text NOT NULL UNIQUE
);
REVOKE ALL ON synchdb_objects FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('synchdb_objects', '');

-- The mode a connector was last started in (used when the server restarts it).
CREATE TABLE synchdb_runtime (
    name       text PRIMARY KEY REFERENCES synchdb_conninfo (name)
                   ON DELETE CASCADE ON UPDATE CASCADE,
    mode       text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON synchdb_runtime FROM PUBLIC;

-- Per captured table: where it lands and whether its snapshot is complete.
-- state 'ready' with sync_lsn L: the table holds every source transaction that
-- committed before L; the stream applies its changes from L on.
CREATE TABLE synchdb_table_state (
    name        text NOT NULL REFERENCES synchdb_conninfo (name)
                    ON DELETE CASCADE ON UPDATE CASCADE,
    src_schema  text NOT NULL,
    src_table   text NOT NULL,
    -- The source table's OID: follows renames made while streaming or stopped.
    src_relid   oid,
    -- The destination columns that mirror source columns (the others are
    -- the DBA's own: never dropped or renamed by the connector).
    src_columns text[],
    dst_schema  text NOT NULL,
    dst_table   text NOT NULL,
    -- 'copy': a copy is owed whatever the mode (the table joined the
    -- publication after rows were written to it; sources before 15).
    state       text NOT NULL CHECK (state IN ('ready', 'schema', 'copy')),
    sync_lsn    pg_lsn NOT NULL DEFAULT '0/0',
    rows_copied bigint NOT NULL DEFAULT 0,
    synced_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, src_schema, src_table)
);
REVOKE ALL ON synchdb_table_state FROM PUBLIC;

-- Object mappings (SynchDB's synchdb_add_objmap): per connector, a source
-- table's destination (objtype 'table'), a column's destination name
-- ('column') and type ('datatype'), and an expression applied to a column's
-- values ('transform'). Written through synchdb_add_objmap (validated),
-- synchdb_del_objmap disables a row; read by the worker at each start and
-- on synchdb_reload_objmap. See README, "Object mapping".
CREATE TABLE synchdb_objmap (
    name    text NOT NULL REFERENCES synchdb_conninfo (name)
                ON DELETE CASCADE ON UPDATE CASCADE,
    objtype text NOT NULL CHECK (objtype IN ('table', 'column', 'datatype', 'transform')),
    enabled bool NOT NULL DEFAULT true,
    srcobj  text NOT NULL,
    dstobj  text NOT NULL,
    PRIMARY KEY (name, objtype, srcobj)
);
REVOKE ALL ON synchdb_objmap FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('synchdb_objmap', '');

-- The source columns of each replicated table and the destination column
-- each became (kept by the worker; behind synchdb_att_view).
CREATE TABLE synchdb_attribute (
    name            text NOT NULL REFERENCES synchdb_conninfo (name)
                        ON DELETE CASCADE ON UPDATE CASCADE,
    src_schema      text NOT NULL,
    src_table       text NOT NULL,
    position        int NOT NULL,
    ext_tbname      text NOT NULL,
    ext_attname     text NOT NULL,
    ext_atttypename text,
    pg_attname      text NOT NULL,
    -- The column's srcobj as synchdb_objmap writes it (srcdb.schema.table.column).
    ext_colobj      text NOT NULL,
    PRIMARY KEY (name, src_schema, src_table, ext_attname)
);
REVOKE ALL ON synchdb_attribute FROM PUBLIC;

-- The ctid ranges of a table being copied in parallel (engine/parallel.rs):
-- each marked done in the transaction that loaded its rows.
CREATE TABLE synchdb_copy_range (
    name        text    NOT NULL REFERENCES synchdb_conninfo (name)
                    ON DELETE CASCADE ON UPDATE CASCADE,
    id          int     NOT NULL,
    snapshot    text    NOT NULL,
    src_schema  text    NOT NULL,
    src_table   text    NOT NULL,
    src_columns text[]  NOT NULL,
    dst_schema  text    NOT NULL,
    dst_table   text    NOT NULL,
    dst_columns text[]  NOT NULL,
    first_page  bigint  NOT NULL,
    end_page    bigint,
    rows        bigint,
    done        boolean NOT NULL DEFAULT false,
    -- COPY's binary format (both sides agree on every column's type).
    binary_rows boolean NOT NULL DEFAULT false,
    err         text,
    PRIMARY KEY (name, id)
);
REVOKE ALL ON synchdb_copy_range FROM PUBLIC;
