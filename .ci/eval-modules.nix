# Evaluates the flake's NixOS modules with nixpkgs' real module system and
# types, but stub NixOS options and stub packages: for a machine with a
# nixpkgs `lib` tree (e.g. a checkout of nix-community/nixpkgs.lib) and no
# nixpkgs. It catches what the module system itself decides (duplicate
# declarations, option types, mkIf/mkMerge, keys) and nothing that needs the
# real NixOS options. Not part of .ci/nix-check, which has no lib tree.
#
#   nix-instantiate --eval --strict --json .ci/eval-modules.nix \
#     --arg nixpkgsLib /path/to/nixpkgs.lib/lib -A ok
#
# `modules` replaces the default composition (default + pipeline + cdc-sink,
# pipeline enabled), e.g. `--arg modules 'self: [ self.nixosModules.cdc-sink
# { services.cdc-sink.enable = true; } ]'`.
{
  nixpkgsLib,
  flake ? ../.,
  modules ? null,
}: let
  lib = import nixpkgsLib;
  stubPath = name: "/nix/store/00000000000000000000000000000000-${name}";
  drv = name: {
    type = "derivation";
    inherit name;
    outPath = stubPath name;
    meta.mainProgram = name;
    passthru.jre = {
      type = "derivation";
      name = "jre";
      outPath = stubPath "jre";
    };
  };
  format = {
    type = lib.types.attrsOf lib.types.anything;
    generate = name: _: stubPath name;
  };
  pkgs = {
    stdenv.hostPlatform.system = "x86_64-linux";
    formats = {
      toml = _: format;
      javaProperties = _: format;
    };
    runCommand = name: _: _: stubPath name;
    runtimeShell = "${stubPath "bash"}/bin/bash";
    writeText = name: _: stubPath name;
    apacheKafka_4_1 = drv "kafka";
    postgresql_15 = drv "postgresql";
    curl = drv "curl";
    jq = drv "jq";
    openssl = drv "openssl";
    coreutils = drv "coreutils";
  };
  outputs = (import (flake + "/flake.nix")).outputs {
    inherit self;
    nixpkgs = {
      inherit lib;
      legacyPackages = {};
    };
  };
  self =
    outputs
    // {
      packages.x86_64-linux = {
        cdc-lake = drv "cdc-lake";
        debezium-connector-postgres = drv "debezium-connector-postgres";
      };
    };

  # Just enough of NixOS's options for our modules to be defined against.
  free = lib.types.submodule {freeformType = lib.types.lazyAttrsOf lib.types.anything;};
  list = lib.mkOption {
    type = lib.types.listOf lib.types.anything;
    default = [];
  };
  stubOptions = {
    options = {
      assertions = list;
      warnings = list;
      networking.hostName = lib.mkOption {
        type = lib.types.str;
        default = "nixos";
      };
      environment.systemPackages = list;
      services.postgresql = lib.mkOption {
        type = lib.types.submodule {
          freeformType = lib.types.lazyAttrsOf lib.types.anything;
          options.ensureUsers = list;
        };
        default = {};
      };
      services.apache-kafka = lib.mkOption {
        type = free;
        default = {};
      };
      services.minio = lib.mkOption {
        type = free;
        default = {};
      };
      services.prometheus = lib.mkOption {
        type = lib.types.submodule {
          freeformType = lib.types.lazyAttrsOf lib.types.anything;
          options = {
            listenAddress = lib.mkOption {
              type = lib.types.str;
              default = "0.0.0.0";
            };
            port = lib.mkOption {
              type = lib.types.port;
              default = 9090;
            };
            scrapeConfigs = list;
            ruleFiles = list;
            # With nixpkgs' default ports.
            exporters = lib.mapAttrs (_: port:
              lib.mkOption {
                default = {};
                type = lib.types.submodule {
                  freeformType = lib.types.lazyAttrsOf lib.types.anything;
                  options = {
                    listenAddress = lib.mkOption {
                      type = lib.types.str;
                      default = "0.0.0.0";
                    };
                    port = lib.mkOption {
                      type = lib.types.port;
                      default = port;
                    };
                  };
                };
              }) {
              postgres = 9187;
              kafka = 8080;
            };
          };
        };
        default = {};
      };
      services.grafana = lib.mkOption {
        type = free;
        default = {};
      };
      services.pgadmin = lib.mkOption {
        type = free;
        default = {};
      };
      systemd.services = lib.mkOption {
        default = {};
        type = lib.types.attrsOf (lib.types.submodule {
          freeformType = lib.types.lazyAttrsOf lib.types.anything;
          options = {
            after = list;
            before = list;
            wants = list;
            requires = list;
            wantedBy = list;
            path = list;
            script = lib.mkOption {
              type = lib.types.lines;
              default = "";
            };
            environment = lib.mkOption {
              type = lib.types.attrsOf lib.types.str;
              default = {};
            };
            serviceConfig = lib.mkOption {
              type = lib.types.lazyAttrsOf lib.types.anything;
              default = {};
            };
            unitConfig = lib.mkOption {
              type = lib.types.lazyAttrsOf lib.types.anything;
              default = {};
            };
          };
        });
      };
      systemd.timers = lib.mkOption {
        default = {};
        type = lib.types.attrsOf (lib.types.submodule {
          freeformType = lib.types.lazyAttrsOf lib.types.anything;
          options.wantedBy = list;
        });
      };
    };
    config._module.args.pkgs = pkgs;
  };

  composed = [
    self.nixosModules.default
    self.nixosModules.pipeline
    self.nixosModules.cdc-sink
    {services.cdc-lake.enable = true;}
  ];
  eval = lib.evalModules {
    class = "nixos";
    modules =
      [stubOptions]
      ++ (
        if modules == null
        then composed
        else modules self
      );
  };
  failed = map (a: a.message) (lib.filter (a: !a.assertion) eval.config.assertions);
  units = lib.attrNames eval.config.systemd.services;
  timers = lib.attrNames eval.config.systemd.timers;
in {
  inherit (eval) config options;
  inherit failed units timers;
  ok =
    if failed != []
    then throw "failed assertions: ${lib.concatStringsSep "; " failed}"
    else builtins.deepSeq [eval.config.systemd.services eval.config.systemd.timers] units;
}
