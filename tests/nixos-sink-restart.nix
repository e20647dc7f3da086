# NixOS VM test: the sink is killed with SIGKILL twice mid-stream; systemd
# restarts it, and the lake still has no loss and no duplicates.
{
  self,
  pkgs,
}: let
  common = import ./nixos-common.nix {inherit self pkgs;};
in {
  name = "cdc-lake-sink-restart";
  # The pipeline module allows the (insecure) minio package by name, which
  # needs the node to evaluate its own nixpkgs config.
  node.pkgsReadOnly = false;
  nodes.machine = common.node;
  testScript = ''
    ${common.prelude}
    start_and_wait()
    for _ in range(2):
        machine.sleep(7)
        machine.succeed("systemctl kill --signal=KILL cdc-sink.service")
        machine.wait_until_succeeds("systemctl is-active cdc-sink.service", timeout=60)
    settle_and_check()
  '';
}
