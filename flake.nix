{
  description = "CDC lake: PostgreSQL -> Debezium -> Kafka -> Parquet on S3, exactly once";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs = {
    self,
    nixpkgs,
  }: let
    inherit (nixpkgs) lib;
    systems = ["x86_64-linux" "aarch64-linux"];
    forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
  in {
    packages = forAllSystems (pkgs: let
      ours = import ./nix/packages.nix {inherit pkgs;};
    in
      ours // {default = ours.cdc-lake;});

    nixosModules = {
      tweetgen = import ./nixos/tweetgen.nix self;
      cdc-sink = import ./nixos/cdc-sink.nix self;
      debezium = import ./nixos/debezium.nix self;
      pipeline = import ./nixos/pipeline.nix self;
      default = self.nixosModules.pipeline;
    };

    nixosConfigurations.vm = lib.nixosSystem {
      system = "x86_64-linux";
      modules = [self.nixosModules.pipeline ./nixos/vm.nix];
    };

    apps.x86_64-linux.vm = {
      type = "app";
      program = "${self.nixosConfigurations.vm.config.system.build.vm}/bin/run-cdc-lake-vm";
    };

    checks = forAllSystems (pkgs:
      import ./nix/checks.nix {
        inherit pkgs self;
      });

    formatter = forAllSystems (pkgs: pkgs.alejandra);
  };
}
