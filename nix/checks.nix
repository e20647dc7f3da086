# `nix flake check`: the NixOS VM tests in tests/, plus clippy, rustfmt and
# the unit tests (the package build runs those).
{
  pkgs,
  self,
}: let
  inherit (pkgs) lib;
  ours = self.packages.${pkgs.stdenv.hostPlatform.system};
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [../crates ../.rustfmt.toml];
  };
  vmTests = lib.optionalAttrs pkgs.stdenv.hostPlatform.isx86_64 {
    pipeline-e2e = pkgs.testers.runNixOSTest (import ../tests/nixos-pipeline.nix {inherit self pkgs;});
    sink-restart = pkgs.testers.runNixOSTest (import ../tests/nixos-sink-restart.nix {inherit self pkgs;});
  };
in
  vmTests
  // {
    unit-tests = ours.cdc-lake;

    clippy = ours.cdc-lake.overrideAttrs (old: {
      pname = "cdc-lake-clippy";
      nativeBuildInputs = old.nativeBuildInputs ++ [pkgs.clippy];
      buildPhase = ''
        runHook preBuild
        cargo clippy --offline --workspace --all-targets --no-default-features -- -D warnings
        runHook postBuild
      '';
      doCheck = false;
      installPhase = "touch $out";
    });

    rustfmt =
      pkgs.runCommand "cdc-lake-rustfmt" {
        nativeBuildInputs = [pkgs.rustfmt pkgs.findutils];
      } ''
        cd ${src}
        find crates -name '*.rs' -print0 | xargs -0 rustfmt --check --edition 2024
        touch $out
      '';
  }
