# NixOS VM test: the pipeline module boots, the generator's rows reach the
# lake as Parquet, and the lake's latest state matches PostgreSQL.
{
  self,
  pkgs,
}: let
  common = import ./nixos-common.nix {inherit self pkgs;};
in {
  name = "cdc-lake-pipeline";
  # The pipeline module allows the (insecure) minio package by name, which
  # needs the node to evaluate its own nixpkgs config.
  node.pkgsReadOnly = false;
  nodes.machine = common.node;
  testScript = ''
    ${common.prelude}
    start_and_wait()
    machine.wait_until_succeeds(
        "${common.s3ls} tweets/ | grep -q parquet && ${common.s3ls} users/ | grep -q parquet",
        timeout=300,
    )
    settle_and_check()
  '';
}
