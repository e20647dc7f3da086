# `nix flake check`: the NixOS VM tests in tests/, an evaluation of the
# modules composed on a host that brings its own pkgs, plus clippy, rustfmt
# and the unit tests (the package build runs those).
{
  pkgs,
  self,
  nixpkgs,
}: let
  inherit (pkgs) lib;
  inherit (pkgs.stdenv.hostPlatform) system;
  ours = self.packages.${system};
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [../crates ../.rustfmt.toml];
  };

  # What a host that runs the pipeline does: permit the insecure MinIO by
  # name in its own nixpkgs instance. The modules never touch nixpkgs.config,
  # so they work with this read-only instance as they would with any other.
  pkgsWithMinio = import nixpkgs {
    inherit system;
    config.allowInsecurePredicate = pkg: lib.getName pkg == "minio";
  };

  # runNixOSTest hands its own pkgs to every node read-only (node.pkgs), the
  # way flake-parts hosts and `nixpkgs.pkgs` users do.
  vmTest = file:
    pkgsWithMinio.testers.runNixOSTest (import file {
      inherit self;
      pkgs = pkgsWithMinio;
    });
  vmTests = lib.optionalAttrs pkgs.stdenv.hostPlatform.isx86_64 {
    pipeline-e2e = vmTest ../tests/nixos-pipeline.nix;
    sink-restart = vmTest ../tests/nixos-sink-restart.nix;
    # The README's deployment: a host that imports only nixosModules.cdc-sink
    # and writes into another machine's Kafka and MinIO.
    sink-host = vmTest ../tests/nixos-sink-host.nix;
  };

  # default, pipeline and cdc-sink imported together (pipeline imports
  # cdc-sink again) on a host that sets nixpkgs.pkgs: the module keys must
  # deduplicate, and no module may configure nixpkgs. Evaluating the system's
  # drvPath runs every assertion without building anything.
  composed = nixpkgs.lib.nixosSystem {
    modules = [
      self.nixosModules.default
      self.nixosModules.pipeline
      self.nixosModules.cdc-sink
      {
        nixpkgs.pkgs = pkgsWithMinio;
        # As nixos-generate-config writes it into hardware-configuration.nix.
        nixpkgs.hostPlatform = system;
        services.cdc-lake.enable = true;
        boot.loader.grub.enable = false;
        fileSystems."/" = {
          device = "/dev/disk/by-label/nixos";
          fsType = "ext4";
        };
        system.stateVersion = "26.05";
      }
    ];
  };
in
  vmTests
  // {
    unit-tests = ours.cdc-lake;

    module-composition = pkgs.writeText "cdc-lake-module-composition" ''
      ${builtins.unsafeDiscardStringContext composed.config.system.build.toplevel.drvPath}
    '';

    clippy = ours.cdc-lake.overrideAttrs (old: {
      pname = "cdc-lake-clippy";
      nativeBuildInputs = old.nativeBuildInputs ++ [pkgs.clippy];
      buildPhase = ''
        runHook preBuild
        cargo clippy --offline --workspace --all-targets --no-default-features -- -D warnings
        runHook postBuild
      '';
      doCheck = false;
      installPhase = ''
        runHook preInstall
        touch $out
        runHook postInstall
      '';
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
