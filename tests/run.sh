#!/usr/bin/env bash
# The test command: brings the local stack up (installing prerequisites;
# a no-op when it already runs) and runs every cargo test in the workspace,
# including those that talk to PostgreSQL, Kafka, Connect and MinIO.
# The stack is left running; `tests/stack.sh down` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-lake/target}
bash tests/stack.sh up
# The end-to-end tests compare the lake with PostgreSQL: no other writer.
bash tests/stack.sh stop-pipeline
eval "$(bash tests/stack.sh env)"
# The crash tests hold the sink between upload and commit with a failpoint.
cargo test --workspace --locked --no-fail-fast --features cdc-sink/failpoints "$@"
