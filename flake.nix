{
  description = "CDC lake: PostgreSQL -> Debezium -> Kafka -> Delta Lake on S3, exactly once";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs = {
    self,
    nixpkgs,
  }: let
    inherit (nixpkgs) lib;
    systems = ["x86_64-linux" "aarch64-linux"];
    forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

    # Each module file is a function of this flake (for its packages), so
    # importApply hands it `self` while keeping the file as its location.
    # The key lets the module system deduplicate: `pipeline` imports
    # `cdc-sink`, and a host importing both must not declare its options
    # twice. The key is the file's path, which differs between two
    # revisions of this flake, so those still conflict loudly.
    module = file:
      lib.modules.importApply file self
      // {
        key = toString file;
        _class = "nixos";
      };
  in {
    packages = forAllSystems (pkgs: let
      ours = import ./nix/packages.nix {inherit pkgs;};
    in
      ours // {default = ours.cdc-lake;});

    # Keep this a plain attribute set: .ci/nix-check reads the names from it
    # to check the README's host example.
    nixosModules = {
      tweetgen = module ./nixos/tweetgen.nix;
      cdc-sink = module ./nixos/cdc-sink.nix;
      debezium = module ./nixos/debezium.nix;
      pipeline = module ./nixos/pipeline.nix;
      default = self.nixosModules.pipeline;
    };

    nixosConfigurations.vm = lib.nixosSystem {
      modules = [self.nixosModules.pipeline ./nixos/vm.nix];
    };

    apps.x86_64-linux.vm = {
      type = "app";
      program = "${self.nixosConfigurations.vm.config.system.build.vm}/bin/run-cdc-lake-vm";
      meta.description = "Boot the whole pipeline in a QEMU VM, its ports forwarded to 127.0.0.1";
    };

    checks = forAllSystems (pkgs:
      import ./nix/checks.nix {
        inherit pkgs self nixpkgs;
      });

    formatter = forAllSystems (pkgs: pkgs.alejandra);
  };
}
