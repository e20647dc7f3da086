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
  metrics = import ./metrics-options.nix lib {
    service = "tweetgen";
    port = 9465;
  };
  listen = metrics.listen cfg.metrics;
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
        tweetgen configuration, rendered to TOML (see docs/operations.md for every
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

    metrics = metrics.options;

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
      {
        assertion = cfg.settings.metrics.listen == listen;
        message = "services.tweetgen.settings.metrics.listen is set from services.tweetgen.metrics.{enable,address,port}: set those instead.";
      }
    ];

    services.tweetgen.settings.metrics.listen = lib.mkDefault listen;

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
          # READY=1 once connected to PostgreSQL, then WATCHDOG=1 from the
          # batch loop (sd-notify): a loop stuck for 30 s is restarted.
          Type = "notify";
          NotifyAccess = "main";
          WatchdogSec = "30s";
          # Longer than database.connect_timeout_secs (120) of its start-up
          # retries, so that its own error is what ends a failed start.
          TimeoutStartSec = "180s";
        };
    };
  };
}
