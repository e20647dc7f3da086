#!/usr/bin/env bash
# Installs the independent Delta Lake readers the tests read the lake with
# (the `deltalake` Python package and DuckDB with its delta extension) into a
# virtualenv outside the clone, from tests/readers-requirements.txt (pinned
# versions and wheel hashes). Prints the venv's python. Idempotent: a stamp
# holding the requirements' hash skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${CDC_LAKE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-lake}
VENV=$CACHE/readers-venv
want=$(sha256sum tests/readers-requirements.txt | cut -d' ' -f1)
if [ "$(cat "$VENV/.requirements-sha256" 2>/dev/null || true)" != "$want" ]; then
  command -v python3 >/dev/null || { echo "[readers] python3 not found" >&2; exit 1; }
  echo "[readers] installing the lake readers into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --require-hashes --only-binary :all: \
    -r tests/readers-requirements.txt >&2
  echo "$want" >"$VENV/.requirements-sha256"
fi
echo "$VENV/bin/python"
