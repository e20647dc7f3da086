#!/usr/bin/env python3
"""Helpers of tests/promtool.sh, for the files in nixos/monitoring/.

  monitoring_check.py dashboard DASHBOARD.json DATASOURCE_UID OUT.yml
      Checks the Grafana dashboard's structure (unique panel ids, grid
      positions inside 24 columns, every panel and target on the one
      provisioned Prometheus datasource, the panels the README promises) and
      writes every target's expression, Grafana's interval macros replaced
      by a duration, as a recording rule into OUT.yml, for
      `promtool check rules` to parse.

  monitoring_check.py marker ALERTS.yml MARKER
      The text the NixOS module replaces (the slot WAL threshold) occurs
      exactly once.

  monitoring_check.py mutants ALERTS.yml OUTDIR
      Writes broken copies of the alert rules, one per directory (each with
      alerts.yml), that `promtool test rules` must reject: the unit tests
      have to notice each change.
"""

import json
import os
import re
import sys

# Grafana's macros, and the duration promtool sees in their place.
MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}

# What the README says the dashboard shows: each must be in some panel.
REQUIRED = [
    "cdc_sink_consumer_lag",
    "cdc_sink_rows_written_total",
    "cdc_sink_lake_source_timestamp_seconds",
    "cdc_sink_quarantined_total",
    "cdc_sink_commit_duration_seconds_bucket",
    "pg_replication_slots_pg_wal_lsn_diff",
    "tweetgen_rows_total",
]

# (what, original text, replacement): each must make a unit test fail.
MUTANTS = [
    ("lag alert without its 5 minutes", "        for: 5m\n        labels:\n          severity: warning\n        annotations:\n          summary: \"cdc-sink falls", "        for: 1m\n        labels:\n          severity: warning\n        annotations:\n          summary: \"cdc-sink falls"),
    ("lag alert on a steady lag", "sum by (topic) (deriv(cdc_sink_consumer_lag[2m])) > 0", "sum by (topic) (deriv(cdc_sink_consumer_lag[2m])) >= 0"),
    ("quarantine alert blind to increases", "(increase(cdc_sink_quarantined_total[10m])) > 0", "(increase(cdc_sink_quarantined_total[10m])) > 5"),
    ("quarantine alert blind to a first sample above 0", "          or\n          sum by (topic, reason) (cdc_sink_quarantined_total unless", "          and\n          sum by (topic, reason) (cdc_sink_quarantined_total unless"),
    ("no-commit alert with a 10 minute limit", "(cdc_sink_last_commit_timestamp_seconds) > 60", "(cdc_sink_last_commit_timestamp_seconds) > 600"),
    ("no-commit alert blind to tables never committed", "            or on (table)", "            and on (table)"),
    ("no-commit alert on input that just arrived", "min_over_time(cdc_sink_consumer_lag[1m])", "cdc_sink_consumer_lag"),
    ("not-ready alert never firing", "expr: cdc_sink_ready == 0", "expr: cdc_sink_ready < 0"),
    ("slot WAL threshold of 2 GB", "> 1073741824", "> 2000000000"),
    ("inactive-slot alert on active slots", "expr: pg_replication_slots_active == 0", "expr: pg_replication_slots_active == 1"),
    ("target-down alert never firing", "expr: up == 0", "expr: up == 2"),
    ("lost-slot alert without its 5 minutes", 'lost|absent"}[5m]) == 1', 'lost|absent"}[30s]) == 1'),
    ("lost-slot alert never firing", 'lost|absent"}[5m]) == 1', 'lost|absent"}[5m]) == 2'),
    ("lost-slot alert blind to a slot never replaced", 'min_over_time(cdc_slot_guard_wal_status{status=~"lost|absent"}', 'min_over_time(cdc_slot_guard_wal_status{status=~"lost"}'),
    ("lost-slot alert that a restarting guard resets", 'expr: |\n          min_over_time(cdc_slot_guard_wal_status{status=~"lost|absent"}[5m]) == 1\n          and\n          count_over_time(cdc_slot_guard_wal_status{status=~"lost|absent"}[5m]) >= 10\n', 'expr: cdc_slot_guard_wal_status{status=~"lost|absent"} == 1\n        for: 5m\n'),
    ("failed-recovery alert blind to one failure", '{outcome="failed"}[15m]) > 0', '{outcome="failed"}[15m]) > 1'),
    ("mirror alert blind to a mirror standing still", "changes(cdc_sink_mirror_changelog_version[10m]) == 0", "changes(cdc_sink_mirror_changelog_version[10m]) < 0"),
    ("unavailable-values alert blind to one", "(increase(cdc_sink_mirror_unavailable_values_total[15m])) > 0", "(increase(cdc_sink_mirror_unavailable_values_total[15m])) > 1"),
    ("mirror alert on quiet changelogs", "changes(cdc_sink_changelog_version[10m]) > 0", "changes(cdc_sink_changelog_version[10m]) >= 0"),
    ("mirror alert blind to failing syncs", "(increase(cdc_sink_mirror_errors_total[10m])) >= 2", "(increase(cdc_sink_mirror_errors_total[10m])) >= 200"),
]


def fail(msg):
    sys.exit(f"monitoring_check: {msg}")


def panels_of(dashboard):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def dashboard(path, uid, out):
    with open(path) as f:
        dash = json.load(f)
    for key in ("uid", "title", "panels", "schemaVersion"):
        if key not in dash:
            fail(f"{path}: no {key!r}")
    ids, exprs, rules = set(), [], []
    for panel in panels_of(dash):
        pid, title = panel.get("id"), panel.get("title")
        if panel.get("type") == "row":
            continue
        if not isinstance(pid, int) or pid in ids:
            fail(f"{path}: panel {title!r} has a missing or repeated id {pid!r}")
        ids.add(pid)
        pos = panel.get("gridPos", {})
        if not all(isinstance(pos.get(k), int) for k in "xywh") or pos["x"] + pos["w"] > 24:
            fail(f"{path}: panel {title!r} has no grid position inside 24 columns: {pos}")
        if panel.get("datasource", {}).get("uid") != uid:
            fail(f"{path}: panel {title!r} does not use datasource {uid}")
        targets = panel.get("targets", [])
        if not targets:
            fail(f"{path}: panel {title!r} has no query")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs):
            fail(f"{path}: panel {title!r} repeats a refId: {refs}")
        for target in targets:
            if target.get("datasource", {}).get("uid", uid) != uid:
                fail(f"{path}: a query of panel {title!r} does not use datasource {uid}")
            expr = target.get("expr", "")
            if not expr.strip():
                fail(f"{path}: a query of panel {title!r} has no expression")
            exprs.append(expr)
            for macro, duration in MACROS.items():
                expr = expr.replace(macro, duration)
            if "$" in expr:
                fail(f"{path}: panel {title!r} uses a variable the dashboard does not define: {expr}")
            rules.append((f"dashboard:panel_{pid}:{target['refId'].lower()}", expr, title))
    for metric in REQUIRED:
        if not any(re.search(rf"\b{metric}\b", e) for e in exprs):
            fail(f"{path}: no panel queries {metric}")
    with open(out, "w") as f:
        f.write("# Generated by tests/monitoring_check.py from the dashboard's queries.\n")
        f.write("groups:\n  - name: dashboard\n    rules:\n")
        for record, expr, title in rules:
            f.write(f"      # {title}\n      - record: {record}\n        expr: {json.dumps(expr)}\n")
    print(f"  {path}: {len(ids)} panels, {len(rules)} queries, all on datasource {uid}")


def marker(path, text):
    count = open(path).read().count(text)
    if count != 1:
        fail(f"{path}: {text!r} occurs {count} times, the NixOS module needs it exactly once")
    print(f"  {path}: {text!r} occurs once")


def mutants(path, outdir):
    original = open(path).read()
    for n, (what, old, new) in enumerate(MUTANTS):
        if original.count(old) != 1:
            fail(f"{path}: mutant {what!r}: {old!r} does not occur exactly once")
        d = os.path.join(outdir, f"{n:02d}")
        os.makedirs(d)
        with open(os.path.join(d, "alerts.yml"), "w") as f:
            f.write(original.replace(old, new))
        with open(os.path.join(d, "what"), "w") as f:
            f.write(what)


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "dashboard":
        dashboard(*args)
    elif cmd == "marker":
        marker(*args)
    elif cmd == "mutants":
        mutants(*args)
    else:
        fail(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
