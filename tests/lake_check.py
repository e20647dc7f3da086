"""Checks the lake's Delta tables against PostgreSQL (the NixOS VM tests).

Every table is read through its Delta log with the `deltalake` package:
only the files the log names are data. Files a crashed attempt uploaded
but never committed are invisible to it, as to any Delta reader.

For each captured table:
  - it is partitioned by `date`, and every live file is a `.parquet`
    under `_cdc_date=YYYY-MM-DD/`;
  - every file the log holds is Parquet (`PAR1` at both ends);
  - no Kafka (partition, offset) is in the table twice;
  - the latest state per primary key (changes ordered by Kafka partition
    and offset, which is per-key commit order since Debezium keys messages
    by primary key; deletes removed) has exactly PostgreSQL's rows: the
    same count and the same keys.
With --mirrors, also: the table's current-state table (`_current/<table>`)
has exactly PostgreSQL's rows: the same count and keys, no key twice.
With --restart-checks, also:
  - each Kafka partition that has rows has a `txn` version (app id
    `cdc-sink:<group>:<topic>:<partition>`) at or past its last row's
    offset, read both with deltalake and straight from the log files;
  - the count of Parquet objects under the table that its current
    snapshot does not reference (uploads of attempts that never
    committed, or files compaction replaced): informational only.

Usage (in the VM, as the postgres user, so that psql gets in by peer auth):
    lake_check.py --secret-file /tmp/minio-pw [--restart-checks]
With fixed input (the sink-host test, no PostgreSQL):
    lake_check.py --secret-file F --no-pg --tables users,tweets \\
        --expect users=2:1 --expect tweets=2:0 --restart-checks
Against another lake, read-only (e.g. a prefix an e2e test wrote):
    lake_check.py --endpoint http://127.0.0.1:9000 --prefix e2e-123 \\
        --secret-file F --no-pg
--pg-dsn is handed to `psql -d` (a database name or a conninfo string;
the password, if any, comes from PGPASSWORD or ~/.pgpass). Nothing is
ever written to the bucket or the database.
"""

import argparse
import json
import posixpath
import re
import subprocess
import sys

from deltalake import DeltaTable

KEYS = {
    "users": ["id"],
    "tweets": ["id"],
    "likes": ["user_id", "tweet_id"],
    "follows": ["follower_id", "followee_id"],
}
CDC = ["_cdc_op", "_cdc_kafka_partition", "_cdc_kafka_offset"]


class Store:
    """Read-only S3 access for what deltalake does not expose: object
    listings and raw bytes. boto3 when it is installed (the VM tests),
    else pyarrow's S3 filesystem."""

    def __init__(self, endpoint, bucket, key, secret):
        self.bucket = bucket
        try:
            import boto3
        except ImportError:
            boto3 = None
        if boto3 is not None:
            self.s3 = boto3.client(
                "s3", endpoint_url=endpoint, aws_access_key_id=key,
                aws_secret_access_key=secret, region_name="us-east-1",
            )
            self.fs = None
        else:
            import pyarrow.fs as pfs

            scheme, host = endpoint.split("://", 1)
            self.s3 = None
            self.fs = pfs.S3FileSystem(
                access_key=key, secret_key=secret, endpoint_override=host,
                scheme=scheme, region="us-east-1",
            )

    def ls(self, prefix):
        """Keys under prefix (which ends with "/")."""
        if self.s3 is not None:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            return [o["Key"] for page in pages for o in page.get("Contents", [])]
        import pyarrow.fs as pfs

        sel = pfs.FileSelector(f"{self.bucket}/{prefix}", recursive=True, allow_not_found=True)
        return [
            i.path[len(self.bucket) + 1:]
            for i in self.fs.get_file_info(sel)
            if i.type == pfs.FileType.File
        ]

    def read(self, key, rng=None):
        """The object's bytes; rng "bytes=0-3" or "bytes=-4" for a part."""
        if self.s3 is not None:
            extra = {"Range": rng} if rng else {}
            return self.s3.get_object(Bucket=self.bucket, Key=key, **extra)["Body"].read()
        path = f"{self.bucket}/{key}"
        if rng is None:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        with self.fs.open_input_file(path) as f:
            if rng == "bytes=-4":
                f.seek(f.size() - 4)
            return f.read(4)


def log_txns(store, table_key):
    """app id -> txn version, read from the table's log files themselves
    (the last checkpoint, then every JSON commit after it)."""
    log = f"{table_key}_delta_log/"
    keys = store.ls(log)
    txns, since = {}, -1
    if f"{log}_last_checkpoint" in keys:
        import io

        import pyarrow.parquet as pq

        last = json.loads(store.read(f"{log}_last_checkpoint"))
        since = last["version"]
        parts = sorted(
            k for k in keys
            if posixpath.basename(k).startswith(f"{since:020d}.checkpoint")
            and k.endswith(".parquet")
        )
        for k in parts:
            t = pq.read_table(io.BytesIO(store.read(k)), columns=["txn"])
            for txn in t.column("txn").to_pylist():
                if txn:
                    txns[txn["appId"]] = txn["version"]
    commits = sorted(
        k for k in keys
        if k.endswith(".json") and posixpath.basename(k)[:20].isdigit()
        and int(posixpath.basename(k)[:20]) > since
    )
    for k in commits:
        for line in store.read(k).decode().splitlines():
            if line.strip():
                action = json.loads(line)
                if "txn" in action:
                    txns[action["txn"]["appId"]] = action["txn"]["version"]
    return txns


def pg(dsn, sql):
    out = subprocess.run(
        ["psql", "-X", "-tA", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", sql],
        check=True, capture_output=True, text=True,
    )
    return [line.split("\t") for line in out.stdout.splitlines() if line]


def pg_primary_key(dsn, table):
    """The primary key columns of a table KEYS does not know, in order."""
    return [r[0] for r in pg(dsn, (
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
        "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        f"WHERE i.indrelid = 'public.{table}'::regclass AND i.indisprimary "
        "ORDER BY array_position(i.indkey::int2[], a.attnum)"
    ))]


def check_table(args, store, table, key):
    root = f"{args.prefix.strip('/')}/" if args.prefix.strip("/") else ""
    table_key = f"{root}{table}/"
    uri = f"s3://{args.bucket}/{table_key}"
    listed = store.ls(table_key)
    if not any(k.startswith(f"{table_key}_delta_log/") for k in listed):
        # No Delta table yet: the lake has no row of it.
        assert table not in args.require, f"{table}: no Delta table at {uri}"
        if args.no_pg:
            print(f"{table}: no Delta table (skipped)")
            return
        expected = int(pg(args.pg_dsn, f"SELECT count(*) FROM {table}")[0][0])
        assert expected == 0, f"{table}: no Delta table at {uri}, PostgreSQL has {expected} rows"
        print(f"{table}: no Delta table, PostgreSQL has no rows either")
        return
    assert f"{table_key}_delta_log/{0:020d}.json" in listed or any(
        ".checkpoint" in k for k in listed
    ), f"{table}: neither version 0 nor a checkpoint in {table_key}_delta_log/"

    dt = DeltaTable(uri, storage_options=args.storage_options)
    parts = list(dt.metadata().partition_columns)
    assert parts == ["_cdc_date"], f"{table}: partition columns {parts}, expected ['_cdc_date']"
    live = []
    for f in dt.file_uris():
        assert f.startswith(f"s3://{args.bucket}/"), f
        live.append(f[len(f"s3://{args.bucket}/"):])
        name = live[-1][len(table_key):]
        assert re.fullmatch(r"_cdc_date=\d{4}-\d\d-\d\d/[^/]+\.parquet", name), (
            f"{table}: live file {name} is not under _cdc_date=YYYY-MM-DD/"
        )
    for k in live:
        head, tail = store.read(k, "bytes=0-3"), store.read(k, "bytes=-4")
        assert head == b"PAR1" and tail == b"PAR1", f"{k} (in the log) is not Parquet"

    data = dt.to_pyarrow_table(columns=key + CDC).to_pydict()
    n = len(data["_cdc_op"])
    seen, last_offset = set(), {}
    order = sorted(range(n), key=lambda i: (data["_cdc_kafka_partition"][i], data["_cdc_kafka_offset"][i]))
    state = {}
    for i in order:
        pos = (data["_cdc_kafka_partition"][i], data["_cdc_kafka_offset"][i])
        assert pos not in seen, f"{table}: Kafka offset {pos} in the table twice"
        seen.add(pos)
        last_offset[pos[0]] = pos[1]
        k = tuple(str(data[c][i]) for c in key)
        if data["_cdc_op"][i] == "d":
            state.pop(k, None)
        else:
            state[k] = True
    assert n or table not in args.require, f"{table}: the Delta table has no rows"
    line = f"{table}: version {dt.version()}, {len(live)} files, {n} changes, {len(state)} live keys"
    if table in args.expect:
        assert (n, len(state)) == args.expect[table], (
            f"{table}: {n} changes and {len(state)} live keys, expected {args.expect[table]}"
        )

    if args.restart_checks:
        from_log = log_txns(store, table_key)
        for part, offset in sorted(last_offset.items()):
            app = f"cdc-sink:{args.group}:{args.topic_prefix}.{table}:{part}"
            logged = from_log.get(app)
            assert logged is not None, f"{table}: no txn for {app} in the log"
            assert logged >= offset, f"{table}: txn {app} = {logged}, but offset {offset} is in the table"
            if hasattr(dt, "transaction_version"):
                assert dt.transaction_version(app) == logged, (
                    f"{table}: deltalake says txn {app} = {dt.transaction_version(app)}, the log {logged}"
                )
        txns = ", ".join(f"p{p}={from_log[f'cdc-sink:{args.group}:{args.topic_prefix}.{table}:{p}']}"
                         for p in sorted(last_offset))
        referenced = set(live)
        orphans = [k for k in listed
                   if k.endswith(".parquet") and "/_delta_log/" not in k and k not in referenced]
        line += f"; txn {txns}; {len(orphans)} Parquet objects not in the snapshot (informational)"

    if args.no_pg:
        print(line + "; PostgreSQL not compared (--no-pg)")
        return
    cols = ", ".join(key)
    pg_keys = {tuple(r) for r in pg(args.pg_dsn, f"SELECT {cols} FROM {table}")}
    lake_keys = set(state)
    missing, extra = sorted(pg_keys - lake_keys)[:5], sorted(lake_keys - pg_keys)[:5]
    assert len(lake_keys) == len(pg_keys) and not missing and not extra, (
        f"{table}: lake has {len(lake_keys)} keys, PostgreSQL {len(pg_keys)}; "
        f"only in PostgreSQL (first 5): {missing}; only in the lake: {extra}"
    )
    print(line + f" == PostgreSQL ({len(pg_keys)} rows, same keys)")
    if args.mirrors:
        mirror_uri = posixpath.join(f"s3://{args.bucket}", args.prefix, "_current", table)
        current = DeltaTable(mirror_uri, storage_options=args.storage_options).to_pyarrow_table()
        rows = list(zip(*([str(v) for v in current.column(k).to_pylist()] for k in key)))
        mirror_keys = set(rows)
        assert len(rows) == len(mirror_keys), f"{table}: a key twice in the current-state table"
        missing, extra = sorted(pg_keys - mirror_keys)[:5], sorted(mirror_keys - pg_keys)[:5]
        assert mirror_keys == pg_keys, (
            f"{table}: the current-state table has {len(mirror_keys)} keys, PostgreSQL "
            f"{len(pg_keys)}; only in PostgreSQL (first 5): {missing}; only in it: {extra}"
        )
        print(f"{table}: current-state table == PostgreSQL ({len(rows)} rows, same keys)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", default="http://127.0.0.1:9000")
    p.add_argument("--bucket", default="lake")
    p.add_argument("--prefix", default="", help="the sink's s3.prefix (default: none)")
    p.add_argument("--access-key", default="cdclake")
    p.add_argument("--secret-file", required=True)
    p.add_argument("--tables", default=",".join(KEYS),
                   help="comma-separated (default: the four of db/captured-tables); "
                        "a table not in KEYS takes its primary key from PostgreSQL")
    p.add_argument("--require", default="users,tweets",
                   help="tables that must exist and have rows (default: users,tweets)")
    p.add_argument("--group", default="cdc-sink", help="the sink's consumer group")
    p.add_argument("--topic-prefix", default="twitter")
    p.add_argument("--pg-dsn", default="twitter", help="psql -d argument")
    p.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL comparison")
    p.add_argument("--expect", action="append", default=[], metavar="TABLE=CHANGES:LIVE",
                   help="also require exactly this many change rows and live keys")
    p.add_argument("--mirrors", action="store_true",
                   help="also compare each current-state table with PostgreSQL")
    p.add_argument("--restart-checks", action="store_true",
                   help="also check txn versions and count unreferenced Parquet objects")
    args = p.parse_args()
    with open(args.secret_file) as f:
        secret = f.read().strip()
    args.require = {t for t in args.require.split(",") if t}
    args.expect = {
        e.split("=")[0]: tuple(int(x) for x in e.split("=")[1].split(":")) for e in args.expect
    }
    args.storage_options = {
        "AWS_ENDPOINT_URL": args.endpoint,
        "AWS_ACCESS_KEY_ID": args.access_key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": str(args.endpoint.startswith("http://")).lower(),
    }
    store = Store(args.endpoint, args.bucket, args.access_key, secret)
    for table in [t for t in args.tables.split(",") if t]:
        key = KEYS.get(table) or ([] if args.no_pg else pg_primary_key(args.pg_dsn, table))
        if not key:
            sys.exit(f"no primary key known for {table}: add it to KEYS")
        check_table(args, store, table, key)


if __name__ == "__main__":
    main()
