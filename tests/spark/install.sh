#!/usr/bin/env bash
# Spark 3.5 + delta-spark reader check for cdc-lake (issue 8, item 6). Exact versions used on 2026-11-27.
# Needs: python3.11, java 17 (/usr/bin/java), mvn; reaches only PyPI and Maven Central.
set -euo pipefail
D=${D:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-lake/spark}
mkdir -p "$D/jars"
python3 -m venv "$D/venv"
"$D/venv/bin/pip" install pyspark==3.5.9 delta-spark==3.3.3      # delta-spark 3.3.3 requires pyspark>=3.5.3,<3.6.0
for a in io.delta:delta-spark_2.12:3.3.3 io.delta:delta-storage:3.3.3; do
  mvn -q -B dependency:copy -Dartifact=$a -DoutputDirectory="$D/jars"
done
# Optional, only for reading straight from S3/MinIO (s3a://); Spark 3.5.9 bundles Hadoop 3.3.4:
#   for a in org.apache.hadoop:hadoop-aws:3.3.4 com.amazonaws:aws-java-sdk-bundle:1.12.262; do
#     mvn -q -B dependency:copy -Dartifact=$a -DoutputDirectory="$D/jars-s3"; done     # the bundle is 280 MB
export PATH="$D/venv/bin:$PATH"          # spark-submit/pyspark need the venv's python on PATH
spark-submit --version
python -c "import pyspark, importlib.metadata as m; print(pyspark.__version__, m.version('delta-spark'))"
# Run (tables copied locally, whole directories incl. _delta_log):
#   python spark_read.py --all-types /path/to/zoo --cdc /path/to/users \
#     --jars "$D/jars/delta-spark_2.12-3.3.3.jar,$D/jars/delta-storage-3.3.3.jar"
