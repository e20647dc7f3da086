#!/usr/bin/env python3
"""Where a Java Flight Recorder recording's CPU samples were.

    jfr_top.py RECORDING.jfr [TOP]

Reads the `jdk.ExecutionSample` events (`jfr print --json`) and prints, as
shares of all samples: the threads; the frames that were running (self
time); and the libraries anywhere on the stack (inclusive time, each
counted once per sample), by package prefix. Used by
tests/bench/debezium.sh (DEBEZIUM_BENCH_JFR) to show where Kafka Connect's
time goes.
"""
import collections
import json
import subprocess
import sys

# Package prefixes, most specific first: the first that matches a frame names it.
LIBRARIES = [
    ("io.cdclake.", "cdclake converter"),
    ("io.debezium.connector.postgresql.connection.pgoutput", "debezium pgoutput decoding"),
    ("io.debezium.connector.postgresql", "debezium postgresql"),
    ("io.debezium.relational", "debezium relational"),
    ("io.debezium.", "debezium core"),
    ("org.postgresql.", "pgjdbc"),
    ("org.apache.kafka.connect.json", "connect json converter"),
    ("org.apache.kafka.connect.runtime", "connect runtime"),
    ("org.apache.kafka.connect.transforms", "connect transforms"),
    ("org.apache.kafka.connect.data", "connect data"),
    ("org.apache.kafka.common.compress", "kafka compression"),
    ("net.jpountz.", "lz4"),
    ("org.apache.kafka.clients.producer", "kafka producer"),
    ("org.apache.kafka.common.record", "kafka record batches"),
    ("org.apache.kafka.", "kafka other"),
    ("com.fasterxml.jackson", "jackson"),
    ("java.util.regex", "java regex"),
    ("java.", "jdk"),
    ("jdk.", "jdk"),
    ("sun.", "jdk"),
]


def library(frame):
    for prefix, name in LIBRARIES:
        if frame.startswith(prefix):
            return name
    return "other"


def main(argv):
    path = argv[1]
    top = int(argv[2]) if len(argv) > 2 else 25
    out = subprocess.run(
        ["jfr", "print", "--json", "--events", "jdk.ExecutionSample", path],
        check=True, capture_output=True, text=True,
    ).stdout
    events = json.loads(out)["recording"]["events"]
    threads, selfs, libs = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        v = e["values"]
        thread = (v.get("sampledThread") or {}).get("javaName") or "?"
        threads[thread] += 1
        # JFR spells classes with slashes (java/lang/String).
        frames = [
            f"{f['method']['type']['name'].replace('/', '.')}.{f['method']['name']}"
            for f in ((v.get("stackTrace") or {}).get("frames") or [])
        ]
        if frames:
            selfs[frames[0]] += 1
        for lib in {library(f) for f in frames}:
            libs[lib] += 1
    n = len(events) or 1
    print(f"{len(events)} CPU samples in {path}")
    by_thread = collections.defaultdict(collections.Counter)
    for e in events:
        v = e["values"]
        thread = (v.get("sampledThread") or {}).get("javaName") or "?"
        frames = (v.get("stackTrace") or {}).get("frames") or []
        if frames:
            top_frame = frames[0]["method"]["type"]["name"].replace("/", ".")
            by_thread[thread][library(top_frame)] += 1
    for title, counter in (("threads", threads), ("running frame (self)", selfs),
                           ("library on the stack (inclusive)", libs)):
        print(f"\n{title}:")
        for name, c in counter.most_common(top):
            print(f"  {100 * c / n:5.1f}%  {name}")
    print("\nlibrary of the running frame, per thread (share of all samples):")
    for thread, _ in threads.most_common(3):
        parts = ", ".join(f"{lib} {100 * c / n:.1f}%" for lib, c in by_thread[thread].most_common(6))
        print(f"  {thread}: {parts}")


if __name__ == "__main__":
    main(sys.argv)
