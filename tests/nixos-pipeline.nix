# NixOS VM test: the pipeline module boots, the generator's rows reach the
# lake as Delta tables, the lake's latest state (read through the Delta log)
# matches PostgreSQL, and our units keep their systemd sandbox.
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

    with subtest("the lake equals PostgreSQL"):
        # All four tables: every file the log holds is Parquet, no Kafka
        # offset twice, latest state per key == PostgreSQL's rows.
        settle_and_check(machine)
  '';
}
