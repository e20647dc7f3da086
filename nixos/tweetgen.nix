# services.tweetgen: the demo workload, as a hardened systemd service.
self: {
  config,
  lib,
  pkgs,
  ...
}: let
  cfg = config.services.tweetgen;
  format = pkgs.formats.toml {};
  # Rendered settings, validated with the binary itself at build time.
  configFile =
    pkgs.runCommand "tweetgen.toml" {
      raw = format.generate "tweetgen-unchecked.toml" cfg.settings;
    } ''
      ${lib.getExe' cfg.package "tweetgen"} --config "$raw" --check-config > /dev/null
      cp "$raw" "$out"
    '';
  ours = self.packages.${pkgs.stdenv.hostPlatform.system};
in {
  options.services.tweetgen = {
    enable = lib.mkEnableOption "the tweetgen Twitter workload generator";

    package = lib.mkPackageOption ours "cdc-lake" {
      pkgsText = "cdc-lake.packages.\${system}";
      extraDescription = "It provides the `tweetgen` binary.";
    };

    settings = lib.mkOption {
      type = format.type;
      default = {};
      example = {
        database.host = "db.example.org";
        workload = {
          interval_ms = 1000;
          new_tweets = 50;
        };
      };
      description = ''
        tweetgen configuration, rendered to TOML (see the README for every
        key). Checked with `tweetgen --check-config` at build time. Never put
        the password here: use {option}`services.tweetgen.passwordFile`.
      '';
    };

    passwordFile = lib.mkOption {
      type = lib.types.nullOr (import ./secret-file.nix lib);
      default = null;
      example = "/run/secrets/tweetgen-db-password";
      description = ''
        File holding the PostgreSQL password, outside the Nix store. It is
        handed to the service with systemd's `LoadCredential`.
      '';
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [];
      example = ["--rate" "20000"];
      description = "Extra command-line flags, e.g. load mode.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = !(cfg.settings ? database && cfg.settings.database ? password);
        message = "services.tweetgen.settings.database.password would land in the Nix store: use passwordFile.";
      }
    ];

    systemd.services.tweetgen = {
      description = "Twitter workload generator (tweetgen)";
      wantedBy = ["multi-user.target"];
      wants = ["network-online.target"];
      after = ["network-online.target" "postgresql.service"];
      serviceConfig =
        import ./hardening.nix
        // {
          ExecStart = lib.escapeShellArgs (
            [(lib.getExe' cfg.package "tweetgen") "--config" configFile]
            ++ lib.optionals (cfg.passwordFile != null) ["--password-file" "%d/db-password"]
            ++ cfg.extraArgs
          );
          LoadCredential = lib.optional (cfg.passwordFile != null) "db-password:${cfg.passwordFile}";
        };
    };
  };
}
