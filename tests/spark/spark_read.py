#!/usr/bin/env python3
"""Read cdc-sink Delta tables with Spark 3.5 + delta-spark, with no read options.

Usage:
  python spark_read.py [--all-types PATH] [--cdc PATH] [--current PATH] [--key id]
                       [--jars a.jar,b.jar]

  --all-types PATH  a table with every supported column type (the stack test's
                    `zoo` table): printSchema, count, every row.
  --cdc PATH        a CDC table (e.g. `users`): schema, count per _cdc_op,
                    history, txn actions, and the latest state of each key.
  --current PATH    a current-state table (`_current/<table>`): schema, row
                    count, distinct keys (must equal the count), its commits'
                    cdc.* position, and the first rows by key.
  --key COL         the table's key column(s), comma-separated (default: id).
  --datetime-rebase CORRECTED  opt-in session setting, see session().
  --jars LIST       delta-spark_2.12-<v>.jar,delta-storage-<v>.jar. Without it,
                    configure_spark_with_delta_pip resolves them from Maven.

PATH is any URI Spark's filesystem layer understands: a local directory, or
s3a://bucket/prefix/table when hadoop-aws is on the classpath and the
credentials come from the environment (nothing is hard-coded here).
"""
import argparse
import importlib.metadata

import pyspark
from pyspark.sql import SparkSession


def session(jars, rebase=None):
    b = (
        SparkSession.builder.appName("cdc-lake-spark-read")
        .master("local[1]")
        .config("spark.driver.memory", "1g")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "1")
        # Standard delta-spark session setup (needed for SQL such as DESCRIBE HISTORY);
        # the table reads below take no options.
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        # Display timestamptz columns in UTC so output is the same on every machine.
        .config("spark.sql.session.timeZone", "UTC")
    )
    if rebase:
        # Opt-in workaround: Parquet files without Spark's writer metadata holding
        # timestamps before 1900 (the -infinity sentinel 0001-01-01) fail with
        # INCONSISTENT_BEHAVIOR_CROSS_VERSION.READ_ANCIENT_DATETIME unless this is CORRECTED.
        b = b.config("spark.sql.parquet.datetimeRebaseModeInRead", rebase)
    if jars:
        b = b.config("spark.jars", jars)
    else:
        from delta import configure_spark_with_delta_pip
        b = configure_spark_with_delta_pip(b)
    return b.getOrCreate()


def banner(s):
    print(f"\n===== {s} =====", flush=True)


def all_types(spark, path):
    banner(f"all-types table {path}")
    df = spark.read.format("delta").load(path)  # no options
    df.printSchema()
    print("dtypes:", df.dtypes)
    print("count:", df.count())
    df.orderBy("id", "_cdc_lsn", "_cdc_kafka_offset").show(n=1000, truncate=False)
    # Floats: NaN / +-Infinity survive as floats.
    df.selectExpr(
        "id", "r", "d", "isnan(r) AS r_nan", "isnan(d) AS d_nan",
        "n", "CAST(n AS STRING) AS n_text", "ts", "lts", "dur",
    ).orderBy("id", "_cdc_lsn", "_cdc_kafka_offset").show(n=1000, truncate=False)
    # timestamp_ntz is wall-clock time: changing the session time zone must not move it.
    spark.conf.set("spark.sql.session.timeZone", "America/New_York")
    banner("same columns with session time zone America/New_York (lts must not move, ts must)")
    df.select("id", "ts", "lts").orderBy("id", "_cdc_lsn", "_cdc_kafka_offset").show(n=1000, truncate=False)
    spark.conf.set("spark.sql.session.timeZone", "UTC")


LATEST_STATE = """
SELECT * FROM (
  SELECT *, row_number() OVER (
    PARTITION BY {key}
    ORDER BY _cdc_lsn DESC NULLS LAST, _cdc_kafka_offset DESC) AS rn
  FROM delta.`{path}`
  WHERE _cdc_op NOT IN ('recovery', 't')
    AND coalesce(_cdc_lsn >= (SELECT max(_cdc_lsn) FROM delta.`{path}` WHERE _cdc_op = 't'), true))
WHERE rn = 1 AND _cdc_op <> 'd'
"""


def cdc(spark, path, key):
    banner(f"CDC table {path}")
    df = spark.read.format("delta").load(path)  # no options
    df.printSchema()
    print("count:", df.count())
    df.groupBy("_cdc_op").count().orderBy("_cdc_op").show()

    banner("DESCRIBE HISTORY")
    spark.sql(f"DESCRIBE HISTORY delta.`{path}`").select(
        "version", "timestamp", "operation", "operationParameters", "engineInfo"
    ).show(truncate=False)

    banner("txn (SetTransaction) actions in the log")
    log = spark.read.json(path.rstrip("/") + "/_delta_log/*.json")
    if "txn" in log.columns:
        log.where("txn IS NOT NULL").selectExpr(
            "input_file_name() AS file", "txn.appId", "txn.version"
        ).orderBy("file", "appId").show(truncate=False)

    banner("latest state per key (last by _cdc_lsn, _cdc_kafka_offset; deletes dropped)")
    q = LATEST_STATE.format(key=key, path=path)
    print(q)
    latest = spark.sql(q).drop("rn")  # Spark 3.5 SQL has no SELECT * EXCEPT
    print("latest-state count:", latest.count())
    latest.orderBy(*key.split(",")).show(5, truncate=False)


def current(spark, path, key):
    banner(f"current-state table {path}")
    df = spark.read.format("delta").load(path)  # no options
    df.printSchema()
    cols = key.split(",")
    n = df.count()
    keys = df.select(*cols).distinct().count()
    print("count:", n)
    print("distinct keys:", keys, "(one row per key)" if keys == n else "(KEYS REPEAT)")
    banner("how current: the last commits' cdc.* info")
    spark.sql(f"DESCRIBE HISTORY delta.`{path}`").selectExpr(
        "version", "operation", "userMetadata", "operationParameters"
    ).show(3, truncate=False)
    log = spark.read.json(path.rstrip("/") + "/_delta_log/*.json")
    if "commitInfo" in log.columns:
        log.where("commitInfo IS NOT NULL").selectExpr(
            "commitInfo.`cdc.changelogVersion` AS changelog_version",
            "commitInfo.`cdc.sourceLsn` AS source_lsn",
            "commitInfo.`cdc.sourceCommitTsMicros` AS source_commit_ts_us",
        ).orderBy("changelog_version", ascending=False).show(3)
    df.orderBy(*cols).show(5, truncate=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--all-types")
    ap.add_argument("--cdc")
    ap.add_argument("--current")
    ap.add_argument("--key", default="id")
    ap.add_argument("--jars")
    ap.add_argument("--datetime-rebase", choices=["CORRECTED", "LEGACY"],
                    help="set spark.sql.parquet.datetimeRebaseModeInRead (default: Spark's EXCEPTION)")
    a = ap.parse_args()
    spark = session(a.jars, a.datetime_rebase)
    try:
        print("pyspark", pyspark.__version__, "| spark", spark.version,
              "| delta-spark", importlib.metadata.version("delta-spark"))
        if a.all_types:
            all_types(spark, a.all_types)
        if a.cdc:
            cdc(spark, a.cdc, a.key)
        if a.current:
            current(spark, a.current, a.key)
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
