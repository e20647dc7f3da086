#!/usr/bin/env bash
# Checks the monitoring files of nixos/monitoring/ with the real promtool;
# needs no stack, no Nix.
#
#   - alerts.yml parses and type-checks (`promtool check rules`);
#   - every alert fires on synthetic series that should trigger it, with its
#     labels and rendered annotations, and stays quiet on healthy ones
#     (`promtool test rules alerts.test.yml`);
#   - each deliberately broken copy of alerts.yml (tests/monitoring_check.py
#     mutants) fails those tests, so they notice such changes;
#   - the text the NixOS module replaces with slotWalAlertBytes occurs once;
#   - the Grafana dashboard is valid JSON of the expected shape, every panel
#     is on the datasource uid nixos/monitoring.nix provisions, and every
#     query parses as PromQL (wrapped into a rule file for
#     `promtool check rules`: promtool has no bare expression checker).
#
# promtool is built once from the Prometheus module at a pinned version,
# fetched through the Go module proxy and verified against sum.golang.org,
# into a cache outside the repository. `go install ...@version` refuses this
# module (its go.mod has replace and exclude directives), so the script
# downloads the module and builds cmd/promtool inside it, with upstream's
# `remove_all_sd` tag (no service discovery plugins: rules need none).
set -euo pipefail
cd "$(dirname "$0")/.."

# Prometheus 3.x is the Go module github.com/prometheus/prometheus v0.3XX.Y.
# v0.311.3 is Prometheus 3.11.3, of the 3.x line nixos-26.05 packages (the
# NixOS module checks the same rule file with that promtool at build time).
PROMETHEUS_MODULE=github.com/prometheus/prometheus
PROMETHEUS_MODULE_VERSION=v0.311.3
PROMETHEUS_VERSION=3.11.3

CACHE=${CDC_LAKE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-lake}
GOBIN_DIR=$CACHE/go-bin
PROMTOOL=$GOBIN_DIR/promtool-$PROMETHEUS_MODULE_VERSION
MON=nixos/monitoring
DATASOURCE_UID=$(sed -n 's/^ *datasourceUid = "\([^"]*\)";.*/\1/p' nixos/monitoring.nix)
[ -n "$DATASOURCE_UID" ] || { echo "nixos/monitoring.nix names no datasourceUid" >&2; exit 1; }

if [ ! -x "$PROMTOOL" ]; then
  go=$(command -v go || echo /usr/local/go/bin/go)
  [ -x "$go" ] || { echo "promtool.sh needs Go (>= 1.25) to build promtool" >&2; exit 1; }
  echo "building promtool $PROMETHEUS_VERSION ($PROMETHEUS_MODULE@$PROMETHEUS_MODULE_VERSION) into $GOBIN_DIR (once; a few minutes)"
  dir=$(cd / && GOFLAGS=-mod=mod "$go" mod download -json "$PROMETHEUS_MODULE@$PROMETHEUS_MODULE_VERSION" | jq -r .Dir)
  [ -f "$dir/cmd/promtool/main.go" ] || { echo "no cmd/promtool in $dir" >&2; exit 1; }
  mkdir -p "$GOBIN_DIR"
  # GOWORK=off: the module ships a go.work naming directories its module
  # zip does not contain.
  (cd "$dir" && GOWORK=off GOFLAGS=-buildvcs=false "$go" build -trimpath -tags remove_all_sd \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION" \
    -o "$PROMTOOL.tmp" ./cmd/promtool)
  mv "$PROMTOOL.tmp" "$PROMTOOL"
fi
"$PROMTOOL" --version 2>&1 | head -n 1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail=0

echo "promtool check rules $MON/alerts.yml"
"$PROMTOOL" check rules "$MON/alerts.yml" || fail=1

echo "promtool test rules $MON/alerts.test.yml"
(cd "$MON" && "$PROMTOOL" test rules alerts.test.yml) || fail=1

echo "the slot WAL threshold the NixOS module replaces"
python3 tests/monitoring_check.py marker "$MON/alerts.yml" "> 1073741824" || fail=1

echo "broken copies of alerts.yml fail the unit tests"
python3 tests/monitoring_check.py mutants "$MON/alerts.yml" "$work/mutants" || fail=1
for d in "$work"/mutants/*/; do
  [ -d "$d" ] || continue
  cp "$MON/alerts.test.yml" "$d"
  # Still valid rules, so that what rejects it is the tests, not the parser.
  if ! "$PROMTOOL" check rules "$d/alerts.yml" >/dev/null 2>&1; then
    echo "  mutant does not parse: $(cat "$d/what")" >&2
    fail=1
  elif (cd "$d" && "$PROMTOOL" test rules alerts.test.yml >/dev/null 2>&1); then
    echo "  NOT caught: $(cat "$d/what")" >&2
    fail=1
  else
    echo "  caught: $(cat "$d/what")"
  fi
done

echo "dashboard $MON/dashboards/cdc-lake.json"
if python3 tests/monitoring_check.py dashboard "$MON/dashboards/cdc-lake.json" "$DATASOURCE_UID" "$work/dashboard-rules.yml"; then
  "$PROMTOOL" check rules "$work/dashboard-rules.yml" || fail=1
else
  fail=1
fi

[ $fail = 0 ] && echo "monitoring checks: OK"
exit $fail
