"""Reads the lake's Delta tables with an independent reader, for the tests.

    lake_read.py rows   --reader deltalake|duckdb --prefix P TABLE...
    lake_read.py state  --prefix P [--app-id ID]... TABLE...
    lake_read.py latest --prefix P --key COL [--key COL]... [--sql] TABLE
    lake_read.py schema --prefix P TABLE...
    lake_read.py table  --reader deltalake|duckdb|polars --prefix P TABLE...

`table` prints each row of the current-state table of TABLE
(`_current/TABLE`), opened with no options, one JSON object per row: its
columns (without `_cdc_*`) as canonical text.

`schema` prints each table's columns and their Arrow types as the
`deltalake` reader sees them. `latest` runs, in DuckDB, the query that gives the latest state of each
key (see `latest_state_sql`) and prints its rows like `rows` does; with
--sql it prints the query instead.

`rows` prints one JSON object per change row, every value as canonical
text (the form tests compare with PostgreSQL's): timestamps as epoch
microseconds, decimals with their scale, floats as PostgreSQL spells them
(NaN, Infinity), booleans as true/false, bytes as \\x hex, lists as
[a, b]. `state` prints, per table, the Delta version, the files the log
holds, the `txn` version of each --app-id, and the table's properties.
S3 settings come from the CDC_SINK_S3__* environment variables
(tests/stack.sh env). The reader runs only through the Delta log: files a
crashed attempt left behind are not seen.
"""

import argparse
import datetime
import decimal
import json
import math
import os
import sys

import pyarrow as pa
import pyarrow.compute as pc

ENDPOINT = os.environ.get("CDC_SINK_S3__ENDPOINT", "http://127.0.0.1:9000")
BUCKET = os.environ.get("CDC_SINK_S3__BUCKET", "lake")
KEY = os.environ.get("CDC_SINK_S3__ACCESS_KEY_ID", "")
SECRET = os.environ.get("CDC_SINK_S3__SECRET_ACCESS_KEY", "")


def uri(prefix, table):
    return f"s3://{BUCKET}/{prefix.strip('/')}/{table}" if prefix else f"s3://{BUCKET}/{table}"


def storage_options():
    return {
        "AWS_ENDPOINT_URL": ENDPOINT,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def canon(v):
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        # PostgreSQL's shortest form: no ".0" on whole numbers.
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return repr(v)
    if isinstance(v, decimal.Decimal):
        return format(v, "f")
    if isinstance(v, bytes):
        return "\\x" + v.hex()
    if isinstance(v, datetime.date):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join("NULL" if x is None else canon(x) for x in v) + "]"
    return str(v)


def columns(table):
    """Each column as a Python list, timestamps as epoch microseconds."""
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_timestamp(col.type):
            col = pc.cast(col.cast(pa.timestamp("us")), pa.int64())
        out[name] = col.to_pylist()
    return out


def read_deltalake(prefix, table):
    from deltalake import DeltaTable

    return DeltaTable(uri(prefix, table), storage_options=storage_options()).to_pyarrow_table()


def duckdb_connect():
    import duckdb
    import duckdb_ext

    # The extensions come from PyPI wheels (duckdb-ext-*): nothing is
    # downloaded at run time.
    ext = os.path.join(list(duckdb_ext.__path__)[0], "extensions")
    con = duckdb.connect(
        config={"extension_directory": ext, "autoinstall_known_extensions": False}
    )
    con.execute("LOAD httpfs; LOAD delta;")
    host = ENDPOINT.split("://", 1)[-1]
    con.execute(
        "CREATE SECRET (TYPE S3, KEY_ID ?, SECRET ?, ENDPOINT ?, URL_STYLE 'path', "
        "USE_SSL ?, REGION 'us-east-1')",
        [KEY, SECRET, host, ENDPOINT.startswith("https://")],
    )
    return con


def read_duckdb(prefix, table):
    con = duckdb_connect()
    return con.execute(f"SELECT * FROM delta_scan('{uri(prefix, table)}')").arrow()


def latest_state_sql(table_uri, columns, keys):
    """The latest state of each key, from the change history of a table.

    Per key, changes are ordered by source LSN (then Kafka offset, which
    breaks ties within one partition); the last one wins and a key whose
    last change is a delete is dropped, and so is every change older than
    the newest TRUNCATE (`_cdc_op` `t`). A column listed in
    `_cdc_unchanged_cols` (an unchanged TOASTed value Debezium did not
    send) takes the value of the latest earlier change that carried it;
    NULL if no such change is in the lake.
    """
    order = "ORDER BY _cdc_lsn, _cdc_kafka_offset"
    part = ", ".join(keys)
    carried = []
    for c in columns:
        if c in keys:
            carried.append(f"    {c}")
            continue
        # A struct is non-null even around a NULL value, so IGNORE NULLS
        # skips only the changes that did not carry the column.
        carried.append(
            f"    (last_value(CASE WHEN NOT list_contains(coalesce(_cdc_unchanged_cols, []), '{c}') "
            f"THEN struct_pack(v := {c}) END IGNORE NULLS)\n"
            f"       OVER (PARTITION BY {part} {order} ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)).v AS {c}"
        )
    cols = ",\n".join(carried)
    return (
        f"WITH changes AS (\n"
        f"  SELECT\n{cols},\n"
        f"    _cdc_op,\n"
        f"    row_number() OVER (PARTITION BY {part} ORDER BY _cdc_lsn DESC, _cdc_kafka_offset DESC) AS newest\n"
        f"  FROM delta_scan('{table_uri}')\n"
        f"  WHERE _cdc_op NOT IN ('recovery', 't')\n"
        f"    AND coalesce(_cdc_lsn >= (SELECT max(_cdc_lsn) FROM delta_scan('{table_uri}') WHERE _cdc_op = 't'), true)\n"
        f")\n"
        f"SELECT * EXCLUDE (_cdc_op, newest) FROM changes WHERE newest = 1 AND _cdc_op <> 'd'"
    )


def latest(args):
    table = args.tables[0]
    con = duckdb_connect()
    t = uri(args.prefix, table)
    names = [
        r[0]
        for r in con.execute(f"DESCRIBE SELECT * FROM delta_scan('{t}')").fetchall()
        if not r[0].startswith("_cdc_")
    ]
    sql = latest_state_sql(t, names, args.key)
    if args.sql:
        print(sql)
        return
    result = con.execute(sql).arrow()
    if isinstance(result, pa.RecordBatchReader):
        result = result.read_all()
    cols = columns(result)
    for i in range(result.num_rows):
        print(json.dumps({c: canon(v[i]) for c, v in cols.items()}))


def rows(args):
    read = {"deltalake": read_deltalake, "duckdb": read_duckdb}[args.reader]
    for table in args.tables:
        t = read(args.prefix, table)
        if isinstance(t, pa.RecordBatchReader):
            t = t.read_all()
        cols = columns(t)
        meta = {c for c in cols if c.startswith("_cdc_")}
        for i in range(t.num_rows):
            print(
                json.dumps(
                    {
                        "table": table,
                        "values": {
                            c: canon(v[i]) for c, v in cols.items() if c not in meta
                        },
                        "op": cols["_cdc_op"][i],
                        "lsn": cols["_cdc_lsn"][i],
                        "partition": cols["_cdc_kafka_partition"][i],
                        "offset": cols["_cdc_kafka_offset"][i],
                        "unchanged": cols["_cdc_unchanged_cols"][i] or [],
                        "key_update": (cols.get("_cdc_key_update") or [None] * t.num_rows)[i],
                    }
                )
            )


def read_polars(prefix, table):
    import polars as pl

    return pl.read_delta(uri(prefix, table), storage_options=storage_options()).to_arrow()


def table_rows(args):
    read = {"deltalake": read_deltalake, "duckdb": read_duckdb, "polars": read_polars}[args.reader]
    for table in args.tables:
        t = read(args.prefix, f"_current/{table}")
        if isinstance(t, pa.RecordBatchReader):
            t = t.read_all()
        cols = columns(t)
        for i in range(t.num_rows):
            print(
                json.dumps(
                    {
                        "table": table,
                        "values": {
                            c: canon(v[i]) for c, v in cols.items() if not c.startswith("_cdc_")
                        },
                        "lsn": cols["_cdc_lsn"][i],
                    }
                )
            )


def schema(args):
    for table in args.tables:
        t = read_deltalake(args.prefix, table)
        print(json.dumps({"table": table, "fields": {f.name: str(f.type) for f in t.schema}}))


def state(args):
    from deltalake import DeltaTable

    for table in args.tables:
        dt = DeltaTable(uri(args.prefix, table), storage_options=storage_options())
        print(
            json.dumps(
                {
                    "table": table,
                    "version": dt.version(),
                    "files": sorted(dt.file_uris()),
                    "txn": {a: dt.transaction_version(a) for a in args.app_id},
                    "configuration": dt.metadata().configuration,
                }
            )
        )


def exists(args):
    """Whether each table (or with --mirror its current-state table) has a
    Delta log yet: one JSON line per table, true or false."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    for table in args.tables:
        path = f"_current/{table}" if args.mirror else table
        try:
            DeltaTable(uri(args.prefix, path), storage_options=storage_options())
            print(json.dumps(True))
        except TableNotFoundError:
            print(json.dumps(False))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["rows", "state", "latest", "schema", "table", "exists"])
    p.add_argument("--mirror", action="store_true", help="exists: the current-state table")
    p.add_argument("--key", action="append", default=[], help="key columns, for latest")
    p.add_argument("--sql", action="store_true", help="latest: print the query only")
    p.add_argument("--reader", default="deltalake", choices=["deltalake", "duckdb", "polars"])
    p.add_argument("--prefix", default="")
    p.add_argument("--app-id", action="append", default=[], help="txn app ids to report")
    p.add_argument("tables", nargs="+")
    args = p.parse_args()
    {
        "rows": rows,
        "state": state,
        "latest": latest,
        "schema": schema,
        "table": table_rows,
        "exists": exists,
    }[args.command](args)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    # deltalake and pyarrow can abort in their exit handlers now and then,
    # after the output is complete; the exit status must not depend on it.
    os._exit(0)
