# NixOS VM test: the sink is killed with SIGKILL twice mid-stream; systemd
# restarts it, and the lake still has no loss and no duplicates. Read
# through the Delta log: every partition's `txn` version covers its rows,
# and the Parquet objects of attempts that never committed (which a kill
# may leave) are only counted, never read.
{
  self,
  pkgs,
}: let
  common = import ./nixos-common.nix {inherit self pkgs;};
in {
  name = "cdc-lake-sink-restart";
  nodes.machine = common.node;
  testScript = ''
    ${common.prelude}


    def sink_show(prop):
        return machine.succeed(
            f"systemctl show --property={prop} --value cdc-sink.service"
        ).strip()


    start_and_wait(machine)
    landed = 0
    for _ in range(2):
        # Kill only once this run of the sink has made a new Delta commit,
        # so the kill hits a sink that is busy, not one still starting.
        wait_for_delta_commit(machine, LOCAL_S3, "tweets", landed)
        landed = delta_version(machine, LOCAL_S3, "tweets")
        pid, restarts = sink_show("MainPID"), int(sink_show("NRestarts"))
        machine.succeed("systemctl kill --signal=KILL cdc-sink.service")
        # `is-active` alone can still answer for the killed process before
        # systemd has reaped it: require exactly one restart, and a new PID.
        machine.wait_until_succeeds(
            f"test $(systemctl show --property=NRestarts --value cdc-sink.service) -eq {restarts + 1} && "
            "pid=$(systemctl show --property=MainPID --value cdc-sink.service) && "
            f"test $pid -ne 0 && test $pid -ne {pid} && systemctl is-active cdc-sink.service",
            timeout=60,
        )
    settle_and_check(machine, "--restart-checks")
  '';
}
