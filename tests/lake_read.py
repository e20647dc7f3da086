"""Reads the lake's Delta tables with an independent reader, for the tests.

    lake_read.py rows  --reader deltalake|duckdb --prefix P TABLE...
    lake_read.py state --prefix P TABLE...

`rows` prints one JSON object per change row, every value as canonical
text (the form tests compare with PostgreSQL's): timestamps as epoch
microseconds, decimals with their scale, floats as PostgreSQL spells them
(NaN, Infinity), booleans as true/false, bytes as \\x hex, lists as
[a, b]. `state` prints, per table, the Delta version, the files the log
holds, and the `txn` version of each --app-id. S3 settings come from the
CDC_SINK_S3__* environment variables (tests/stack.sh env). The reader runs
only through the Delta log: files a crashed attempt left behind are not
seen.
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


def read_duckdb(prefix, table):
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
    return con.execute(f"SELECT * FROM delta_scan('{uri(prefix, table)}')").arrow()


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
                    }
                )
            )


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
                }
            )
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["rows", "state"])
    p.add_argument("--reader", default="deltalake", choices=["deltalake", "duckdb"])
    p.add_argument("--prefix", default="")
    p.add_argument("--app-id", action="append", default=[], help="txn app ids to report")
    p.add_argument("tables", nargs="+")
    args = p.parse_args()
    {"rows": rows, "state": state}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
