# NixOS VM test: the pipeline module boots, the generator's rows reach the
# lake as Parquet, the lake's latest state matches PostgreSQL, and our units
# keep their systemd sandbox.
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

    with subtest("Parquet lands under tweets/ and users/"):
        wait_for_more_objects(machine, "tweets/", 0)
        wait_for_more_objects(machine, "users/", 0)
        keys = [k for k in machine.succeed(f"{LOCAL_S3} ls tweets/").split() if k.endswith(".parquet")]
        assert keys, "no .parquet object under tweets/"
        for key in keys[:3]:
            assert machine.succeed(f"{LOCAL_S3} head {key}").strip() == "PAR1", key

    with subtest("the lake equals PostgreSQL"):
        settle_and_check(machine)
  '';
}
