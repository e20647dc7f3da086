# NixOS VM test: the pipeline module boots, the generator's rows reach the
# lake as Delta tables, the lake's latest state (read through the Delta log)
# matches PostgreSQL, and our units keep their systemd sandbox. Monitoring:
# Prometheus scrapes the sink, the generator and both exporters and loaded
# the alert rules, Grafana serves the provisioned dashboard and datasource,
# the sink reports ready and committed rows for every captured table.
{
  self,
  pkgs,
}: let
  common = import ./nixos-common.nix {inherit self pkgs;};
in {
  name = "cdc-lake-pipeline";
  nodes.machine = common.node;
  testScript = ''
    ${common.prelude}
    start_and_wait(machine)

    with subtest("hardening"):
        # Goal "OK" (<= 2.0) for our Rust services; the JVM worker cannot
        # deny writable-executable memory and gets more room.
        check_hardening(machine, [("cdc-sink.service", 20), ("tweetgen.service", 20),
                                  ("kafka-connect.service", 30)])

    with subtest("Delta tables appear for tweets and users"):
        # Version 0 of the log, then a commit with data (version 1 on).
        for table in ["tweets", "users"]:
            wait_for_delta_commit(machine, LOCAL_S3, table, 0)

    with subtest("Prometheus scrapes the services and the exporters"):
        for job in ["cdc-sink", "tweetgen", "cdc-slot-guard", "postgres", "kafka", "prometheus"]:
            wait_for_query(machine, f'up{{job="{job}"}} == 1')
        # The connector's slot, from postgres_exporter: WAL retained
        # (pg_current_wal_lsn() - restart_lsn); the sink's group, from kminion.
        print(wait_for_query(machine, 'pg_replication_slots_pg_wal_lsn_diff{slot_name="twitter_cdc"}'))
        print(wait_for_query(machine, 'kminion_kafka_consumer_group_topic_lag{group_id="cdc-sink"}'))
        rules = json.loads(machine.succeed("curl -fsS http://127.0.0.1:9090/api/v1/rules"))
        names = sorted(r["name"] for g in rules["data"]["groups"] if g["name"] == "cdc-lake" for r in g["rules"])
        assert names == sorted(["CdcSinkConsumerLagGrowing", "CdcSinkQuarantinedMessages", "CdcSinkNoCommit",
                                "CdcSinkNotReady", "CdcSinkMirrorStuck", "CdcSinkMirrorValuesUnavailable", "PostgresSlotWalRetained", "PostgresSlotInactive",
                                "ReplicationSlotLost", "SlotGuardRecoveryFailed", "TargetDown"]), names
        # The guard watches the connector's slot, which it sees reserved.
        print(wait_for_query(machine, 'cdc_slot_guard_wal_status{status="reserved"} == 1'))

    with subtest("the sink, the generator and the slot guard are healthy and ready while data flows"):
        for port in [9464, 9465, 9466]:
            machine.succeed(f"curl -fsS http://127.0.0.1:{port}/healthz")
            machine.wait_until_succeeds(
                f"test $(curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/readyz) = 200",
                timeout=120,
            )

    with subtest("Grafana serves the provisioned datasource and dashboard"):
        machine.wait_until_succeeds("curl -fsS http://127.0.0.1:3000/api/health", timeout=120)
        # The admin password reaches curl on stdin (-K -), never its command line.
        grafana = ("printf 'user = \"admin:%s\"\\n' \"$(cat /var/lib/cdc-lake/secrets/grafana-admin-password)\" "
                   "| curl -fsS -K - ")
        dashboard = json.loads(machine.succeed(grafana + "http://127.0.0.1:3000/api/dashboards/uid/cdc-lake"))
        assert dashboard["dashboard"]["title"] == "CDC lake", dashboard["dashboard"]["title"]
        proxied = json.loads(machine.succeed(
            grafana + "'http://127.0.0.1:3000/api/datasources/proxy/uid/cdc-lake-prometheus/api/v1/query?query=up'"
        ))
        assert proxied["status"] == "success", proxied

    with subtest("the lake equals PostgreSQL"):
        # All four tables: every file the log holds is Parquet, no Kafka
        # offset twice, latest state per key == PostgreSQL's rows; and each
        # current-state table (mirrors are on by default) holds PostgreSQL's
        # rows, keys and count.
        settle_and_check(machine, "--mirrors")

    with subtest("the sink's metrics count committed rows for every captured table"):
        written = rows_written(machine)
        print(written)
        missing = [t for t in CAPTURED if written.get(t, 0.0) <= 0]
        assert not missing, f"cdc_sink_rows_written_total is not above 0 for {missing}: {written}"
        # And Prometheus still scrapes the sink (up{job="cdc-sink"} == 1).
        wait_for_query(machine, 'up{job="cdc-sink"} == 1', timeout=60)
  '';
}
