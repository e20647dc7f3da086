# services.cdc-sink: Debezium change events from Kafka to Delta Lake tables on S3.
self: {
  config,
  lib,
  pkgs,
  ...
}: let
  cfg = config.services.cdc-sink;
  format = pkgs.formats.toml {};
  configFile =
    pkgs.runCommand "cdc-sink.toml" {
      raw = format.generate "cdc-sink-unchecked.toml" cfg.settings;
    } ''
      ${lib.getExe' cfg.package "cdc-sink"} --config "$raw" --check-config > /dev/null
      cp "$raw" "$out"
    '';
  ours = self.packages.${pkgs.stdenv.hostPlatform.system};
  exe = lib.getExe' cfg.package "cdc-sink";
  # The sink and its upkeep read the same checked file and the same secret.
  secretEnvironment = lib.mkIf (cfg.secretAccessKeyFile != null) {
    CDC_SINK_S3__SECRET_ACCESS_KEY_FILE = "%d/s3-secret";
  };
  loadCredential = lib.optional (cfg.secretAccessKeyFile != null) "s3-secret:${cfg.secretAccessKeyFile}";
  metrics = import ./metrics-options.nix lib {
    service = "cdc-sink";
    port = 9464;
  };
  listen = metrics.listen cfg.metrics;
in {
  options.services.cdc-sink = {
    enable = lib.mkEnableOption "the CDC Parquet sink";

    package = lib.mkPackageOption ours "cdc-lake" {
      pkgsText = "cdc-lake.packages.\${system}";
      extraDescription = "It provides the `cdc-sink` binary.";
    };

    settings = lib.mkOption {
      type = format.type;
      default = {};
      example = {
        kafka.brokers = "kafka1:9092,kafka2:9092";
        s3 = {
          endpoint = "https://s3.example.org";
          bucket = "lake";
          access_key_id = "cdc-sink";
        };
        flush.max_age_ms = 10000;
      };
      description = ''
        cdc-sink configuration, rendered to TOML (see docs/operations.md for every
        key). Checked with `cdc-sink --check-config` at build time. Never put
        the S3 secret here: use {option}`services.cdc-sink.secretAccessKeyFile`.
      '';
    };

    secretAccessKeyFile = lib.mkOption {
      type = lib.types.nullOr (import ./secret-file.nix lib);
      default = null;
      example = "/run/secrets/cdc-sink-s3-secret";
      description = ''
        File holding the S3 secret access key, outside the Nix store. It is
        handed to the service with systemd's `LoadCredential`.
      '';
    };

    metrics = metrics.options;

    mirrors.enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Keep a current-state table of every captured table with a primary
        key at `<prefix>/_current/<table>`, beside its changelog (the
        `mirror.*` settings). Off, the lake holds the changelogs only.
      '';
    };

    upkeep = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          Run `cdc-sink upkeep` on a timer while the sink is enabled: it
          compacts small files, vacuums files no table version references
          (including those of flushes that never committed) and writes
          checkpoints. Its thresholds and retentions are the `lake.*`
          settings.
        '';
      };
      schedule = lib.mkOption {
        type = lib.types.str;
        default = "hourly";
        example = "*-*-* 03:00:00";
        description = "When upkeep runs, as a systemd `OnCalendar` expression.";
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = !(cfg.settings ? s3 && cfg.settings.s3 ? secret_access_key);
        message = "services.cdc-sink.settings.s3.secret_access_key would land in the Nix store: use secretAccessKeyFile.";
      }
      {
        assertion = cfg.settings.metrics.listen == listen;
        message = "services.cdc-sink.settings.metrics.listen is set from services.cdc-sink.metrics.{enable,address,port}: set those instead.";
      }
    ];

    services.cdc-sink.settings.metrics.listen = lib.mkDefault listen;
    services.cdc-sink.settings.mirror.enabled = lib.mkDefault cfg.mirrors.enable;

    systemd.services.cdc-sink = {
      description = "Debezium to Delta Lake sink (cdc-sink)";
      wantedBy = ["multi-user.target"];
      wants = ["network-online.target"];
      after = ["network-online.target" "apache-kafka.service" "minio.service"];
      environment = secretEnvironment;
      serviceConfig =
        import ./hardening.nix
        // {
          ExecStart = lib.escapeShellArgs [exe "--config" configFile];
          LoadCredential = loadCredential;
          # The sink sends READY=1 once its consumer exists and the lake
          # answers, then WATCHDOG=1 from its main loop (sd-notify): a loop
          # stuck for 30 s is killed and restarted (Restart=on-failure).
          Type = "notify";
          NotifyAccess = "main";
          WatchdogSec = "30s";
          # Longer than the default give_up_after_secs (120) of its start-up
          # retries, so that its own error is what ends a failed start.
          TimeoutStartSec = "180s";
          # SIGTERM flushes every open segment and commits; give it time.
          TimeoutStopSec = 120;
        };
    };

    # Safe next to a running sink (its appends never conflict with a
    # compaction), and the timer never starts a second run while one is
    # active.
    systemd.services.cdc-sink-upkeep = lib.mkIf cfg.upkeep.enable {
      description = "Delta table upkeep for cdc-sink: compaction, vacuum, checkpoints";
      wants = ["network-online.target"];
      after = ["network-online.target" "minio.service"];
      environment = lib.mkMerge [
        secretEnvironment
        # The same config file as the sink, but no metrics endpoint: the
        # running sink holds that port.
        {CDC_SINK_METRICS__LISTEN = "";}
      ];
      serviceConfig =
        import ./hardening.nix
        // {
          Type = "oneshot";
          ExecStart = lib.escapeShellArgs [exe "--config" configFile "upkeep"];
          LoadCredential = loadCredential;
          # A failed run is retried by the next timer tick, not in a loop
          # against a store that is down.
          Restart = "no";
        };
    };
    systemd.timers.cdc-sink-upkeep = lib.mkIf cfg.upkeep.enable {
      description = "Run cdc-sink upkeep (${cfg.upkeep.schedule})";
      wantedBy = ["timers.target"];
      timerConfig = {
        OnCalendar = cfg.upkeep.schedule;
        # A run missed while the machine was off happens at boot.
        Persistent = true;
        # Several sinks on one bucket do not all start at the same second.
        RandomizedDelaySec = "5m";
      };
    };
  };
}
