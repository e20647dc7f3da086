"""Freshness of the lake, per row: from its PostgreSQL commit to the Delta
commit that made it visible. The analysis half of tests/bench/freshness.sh.

    freshness.py --prefix P --from-ms A --to-ms B [--kafka FILE] TABLE...

For every row of the Delta tables under s3://<bucket>/<P>/ whose PostgreSQL
commit time lies in [A, B] (epoch ms):

- commit time: `_cdc_commit_ts`, Debezium's `source.ts_ms`, the commit
  time PostgreSQL decoded from the WAL (millisecond precision);
- visible time: the moment the log entry `_delta_log/<version>.json` of the
  version whose `add` action names the row's file came into existence in
  S3, i.e. that object's Last-Modified as the S3 listing reports it (in
  milliseconds). A Delta reader sees the row from that moment on.

Why Last-Modified and not `commitInfo.timestamp`: delta-rs (deltalake-core
1.1, `CommitData::new`) stamps `commitInfo.timestamp` from the writer's
clock when it builds the commit, before its conflict check and before it
sends the conditional PUT of the log entry; the row is not visible until
that PUT has completed. MinIO sets the object's modification time from its
own clock while it handles that PUT (a probe put here landed between the
client's start and end of the request, a few ms apart), so it is the
closer, never earlier, bound. Both are printed; their difference is the
commit's own cost. Every clock here (PostgreSQL's, Kafka's, the sink's,
MinIO's) is the same machine's clock, so no skew enters the differences.

The rows' files are found through the Delta log itself (each version's
`add` actions), read with pyarrow, and checked against the snapshot the
`deltalake` package reads (the same reader the tests use): every file of
the snapshot must have been added by a logged version.

With --kafka (lines `topic partition offset create_time_ms value_size`,
from kcat), each row is also placed in Kafka: the latency is split into
PostgreSQL commit -> Kafka record (Debezium: WAL decoding, its poll
interval, Connect's producer), Kafka record -> the file's upload (the
sink: fetch, the segment waiting for `flush.max_age_ms`, encoding, the
PUT; `add.modificationTime`, stamped by the sink after that PUT) and
upload -> visible (the rest of that flush's uploads and the Delta commit).
Every non-tombstone event in the file must be in the lake.
"""

import argparse
import concurrent.futures
import json
import math
import os
import re
import sys
import urllib.parse

import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

ENDPOINT = os.environ.get("CDC_SINK_S3__ENDPOINT", "http://127.0.0.1:9000")
BUCKET = os.environ.get("CDC_SINK_S3__BUCKET", "lake")
KEY = os.environ.get("CDC_SINK_S3__ACCESS_KEY_ID", "")
SECRET = os.environ.get("CDC_SINK_S3__SECRET_ACCESS_KEY", "")
LOG_ENTRY = re.compile(r"^(\d{20})\.json$")


def s3():
    scheme, host = ENDPOINT.split("://", 1)
    return pafs.S3FileSystem(
        access_key=KEY,
        secret_key=SECRET,
        endpoint_override=host,
        scheme=scheme,
        region="us-east-1",
    )


def storage_options():
    return {
        "AWS_ENDPOINT_URL": ENDPOINT,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def percentile(sorted_values, p):
    """Nearest rank: the smallest value with at least p % of values at or below it."""
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def summary(values_ms):
    v = sorted(values_ms)
    return {
        "rows": len(v),
        "p50": percentile(v, 50) / 1000,
        "p95": percentile(v, 95) / 1000,
        "p99": percentile(v, 99) / 1000,
        "max": (v[-1] / 1000) if v else float("nan"),
    }


def fmt(s):
    return (
        f"p50 {s['p50']:6.2f}  p95 {s['p95']:6.2f}  p99 {s['p99']:6.2f}  "
        f"max {s['max']:6.2f}  (rows {s['rows']})"
    )


def table_log(fs, root):
    """Per version: (Last-Modified ms, commitInfo.timestamp ms, [(path, modificationTime)])."""
    versions = {}
    for info in fs.get_file_info(pafs.FileSelector(f"{root}/_delta_log")):
        m = LOG_ENTRY.match(info.base_name)
        if not m:
            continue  # checkpoints, _last_checkpoint, temporary files
        # pyarrow reports the listing's LastModified, which MinIO gives in ms.
        last_modified = round(info.mtime.timestamp() * 1000)
        with fs.open_input_stream(info.path) as f:
            lines = f.read().decode().splitlines()
        commit_ts, adds = None, []
        for line in lines:
            if not line.strip():
                continue
            action = json.loads(line)
            if "commitInfo" in action:
                commit_ts = action["commitInfo"].get("timestamp")
            elif "add" in action and action["add"].get("dataChange", True):
                a = action["add"]
                adds.append((urllib.parse.unquote(a["path"]), a["modificationTime"]))
        versions[int(m.group(1))] = (last_modified, commit_ts, adds)
    return versions


def mirror_log(fs, root):
    """The current-state table's commits: (changelog version reflected,
    Last-Modified ms), oldest first; empty if there is no such table."""
    if fs.get_file_info(f"{root}/_delta_log").type == pafs.FileType.NotFound:
        return []
    out = []
    for info in fs.get_file_info(pafs.FileSelector(f"{root}/_delta_log")):
        if not LOG_ENTRY.match(info.base_name):
            continue
        with fs.open_input_stream(info.path) as f:
            for line in f.read().decode().splitlines():
                if line.strip() and "commitInfo" in line:
                    ci = json.loads(line).get("commitInfo", {})
                    if "cdc.changelogVersion" in ci:
                        out.append((int(ci["cdc.changelogVersion"]), round(info.mtime.timestamp() * 1000)))
    return sorted(out, key=lambda x: x[1])


def mirror_visible(log, version):
    """When the current-state table first reflected changelog `version`."""
    return next((ms for v, ms in log if v >= version), None)


def read_file(fs, path):
    t = pq.read_table(
        path,
        filesystem=fs,
        columns=["_cdc_commit_ts", "_cdc_op", "_cdc_kafka_partition", "_cdc_kafka_offset"],
    )
    ts = pc.cast(t.column("_cdc_commit_ts").cast("timestamp[us]"), "int64").to_pylist()
    return list(
        zip(
            (x // 1000 for x in ts),
            t.column("_cdc_op").to_pylist(),
            t.column("_cdc_kafka_partition").to_pylist(),
            t.column("_cdc_kafka_offset").to_pylist(),
        )
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prefix", required=True)
    p.add_argument("--from-ms", type=int, required=True)
    p.add_argument("--to-ms", type=int, required=True)
    p.add_argument("--kafka", help="kcat dump: topic partition offset create_time_ms value_size")
    p.add_argument("tables", nargs="+")
    args = p.parse_args()

    from deltalake import DeltaTable

    fs = s3()
    kafka = {}
    if args.kafka:
        with open(args.kafka) as f:
            for line in f:
                topic, part, off, ts, size = line.split()
                kafka[(topic.rsplit(".", 1)[-1], int(part), int(off))] = (int(ts), int(size))

    rows = []  # (table, commit_ms, visible_ms, commit_info_ms, file_put_ms, partition, offset, in_mirror_ms)
    seen = set()
    versions_in_window = {}
    for table in args.tables:
        root = f"{BUCKET}/{args.prefix.strip('/')}/{table}"
        if fs.get_file_info(f"{root}/_delta_log").type == pafs.FileType.NotFound:
            print(f"{table}: no Delta table under s3://{root}", file=sys.stderr)
            continue
        log = table_log(fs, root)
        mirror = mirror_log(fs, f"{BUCKET}/{args.prefix.strip('/')}/_current/{table}")
        added = {}
        for version, (last_modified, commit_ts, adds) in log.items():
            for path, put_ms in adds:
                added[path] = (version, last_modified, commit_ts, put_ms)
        # The reader's snapshot must consist of logged adds (nothing missed).
        snapshot = DeltaTable(f"s3://{root}", storage_options=storage_options())
        live = snapshot.get_add_actions(flatten=True).column("path").to_pylist()
        unknown = [x for x in live if urllib.parse.unquote(x) not in added]
        if unknown:
            sys.exit(f"{table}: {len(unknown)} live files not added by any log entry read, e.g. {unknown[0]}")
        paths = sorted(added)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            contents = pool.map(lambda path: read_file(fs, f"{root}/{path}"), paths)
            for path, file_rows in zip(paths, contents):
                version, last_modified, commit_ts, put_ms = added[path]
                for commit_ms, op, part, off in file_rows:
                    seen.add((table, part, off))
                    if op == "r" or not args.from_ms <= commit_ms <= args.to_ms:
                        continue  # snapshot reads, warm-up, after the run
                    versions_in_window.setdefault(table, set()).add(version)
                    rows.append((table, commit_ms, last_modified, commit_ts, put_ms, part, off,
                                 mirror_visible(mirror, version)))

    if not rows:
        sys.exit("no rows in the measured window")
    window_s = (args.to_ms - args.from_ms) / 1000
    txns = len({(r[1]) for r in rows})
    commits = sum(len(v) for v in versions_in_window.values())
    print(
        f"rows {len(rows)} ({len(rows) / window_s:.0f}/s) in {window_s:.0f} s, "
        f"{txns} distinct commit times, {commits} Delta commits over {len(versions_in_window)} tables"
    )
    print("PostgreSQL commit -> visible in the lake (s):")
    print(f"  all       {fmt(summary([r[2] - r[1] for r in rows]))}")
    for table in args.tables:
        of = [r[2] - r[1] for r in rows if r[0] == table]
        if of:
            print(f"  {table:9} {fmt(summary(of))}")
    in_mirror = [r[7] - r[1] for r in rows if r[7] is not None]
    if in_mirror:
        print("PostgreSQL commit -> visible in the current-state table _current/<table> (s):")
        print(f"  all       {fmt(summary(in_mirror))}")
        print(f"  rows never in a current-state table commit: {sum(1 for r in rows if r[7] is None)}")
    with_ci = [r[3] - r[1] for r in rows if r[3] is not None]
    print(f"same, to commitInfo.timestamp instead of Last-Modified:\n  all       {fmt(summary(with_ci))}")
    gap = sorted(r[2] - r[3] for r in rows if r[3] is not None)
    print(
        f"commitInfo.timestamp -> Last-Modified, per row: median {percentile(gap, 50)} ms, "
        f"max {gap[-1] if gap else float('nan')} ms"
    )

    if args.kafka:
        staged = [(r, kafka[(r[0], r[5], r[6])][0]) for r in rows if (r[0], r[5], r[6]) in kafka]
        print(f"stages (s), {len(staged)} rows matched in Kafka:")
        print(f"  PG commit -> Kafka record   {fmt(summary([k - r[1] for r, k in staged]))}")
        print(f"  Kafka record -> file upload {fmt(summary([r[4] - k for r, k in staged]))}")
        print(f"  file upload -> visible      {fmt(summary([r[2] - r[4] for r, k in staged]))}")
        missing = [k for k, (ts, size) in kafka.items() if size >= 0 and k not in seen]
        print(f"Kafka events (not tombstones) since the start offsets: {sum(1 for v in kafka.values() if v[1] >= 0)}, "
              f"not in the lake: {len(missing)}")
        if missing:
            print(f"  e.g. {sorted(missing)[:5]}")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    # deltalake and pyarrow can abort in their exit handlers now and then,
    # after the output is complete (see tests/lake_read.py).
    os._exit(0)
