# services.cdc-lake.monitoring and services.cdc-lake.pgadmin, imported by
# the pipeline module: Prometheus scraping the sink, the generator and the
# nixpkgs exporters for PostgreSQL and Kafka, with the alert rules of
# nixos/monitoring/alerts.yml; Grafana with a provisioned Prometheus
# datasource and the dashboard nixos/monitoring/dashboards/cdc-lake.json;
# pgAdmin on request. Everything listens on 127.0.0.1 (addresses are
# mkDefault, so a host such as the VM can widen them).
#
# Secrets (Grafana's admin password and secret key, pgAdmin's password) are
# generated at first boot into services.cdc-lake.secretsDir, or come from
# files the host names; they reach the services as systemd credentials,
# never through the store.
{
  config,
  lib,
  pkgs,
  ...
}: let
  cfg = config.services.cdc-lake;
  mon = cfg.monitoring;
  secretFile = import ./secret-file.nix lib;
  prom = config.services.prometheus;
  exporters = prom.exporters;
  sinkMetrics = config.services.cdc-sink.metrics;
  genMetrics = config.services.tweetgen.metrics;

  # The uid the dashboard's panels name; tests/promtool.sh checks that every
  # panel of the dashboard uses exactly this one.
  datasourceUid = "cdc-lake-prometheus";

  # The slot WAL threshold: alerts.yml holds the default, and the module
  # puts the option's value in its place (an assertion below requires the
  # text exactly once).
  walMarker = "> 1073741824";
  alertsText = builtins.readFile ./monitoring/alerts.yml;
  alertsFile =
    pkgs.writeText "cdc-lake-alerts.yml"
    (lib.replaceStrings [walMarker] ["> ${toString mon.slotWalAlertBytes}"] alertsText);

  # A listener on every address is scraped through loopback.
  scrapeAddress = address: port: let
    host =
      if lib.elem address ["" "0.0.0.0" "::" "[::]"]
      then "127.0.0.1"
      else if lib.hasInfix ":" address && !lib.hasPrefix "[" address
      then "[${address}]"
      else address;
  in "${host}:${toString port}";
  job = name: target: {
    job_name = name;
    static_configs = [{targets = [target];}];
  };

  # Grafana reads its secrets through its `$__file{}` provider from the
  # credentials systemd hands the unit (LoadCredential below).
  grafanaCredential = name: "$__file{/run/credentials/grafana.service/${name}}";
in {
  options.services.cdc-lake = {
    monitoring = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          Whether to run Prometheus (scraping cdc-sink, tweetgen and the
          nixpkgs PostgreSQL and Kafka exporters, with the pipeline's alert
          rules) and Grafana with the pipeline's dashboard, all on
          127.0.0.1. Ports are the nixpkgs options:
          {option}`services.prometheus.port` (9090),
          {option}`services.grafana.settings.server.http_port` (3000),
          {option}`services.prometheus.exporters.postgres.port` (9187) and
          {option}`services.prometheus.exporters.kafka.port` (9308 here).
        '';
      };

      slotWalAlertBytes = lib.mkOption {
        type = lib.types.ints.positive;
        default = 1073741824;
        example = 536870912;
        description = ''
          The `PostgresSlotWalRetained` alert fires when the connector's
          replication slot has retained more WAL than this many bytes
          (`pg_current_wal_lsn() - restart_lsn`) for 5 minutes. Keep it
          below `max_slot_wal_keep_size` (2GB here), past which PostgreSQL
          invalidates the slot.
        '';
      };

      grafana = {
        adminPasswordFile = lib.mkOption {
          type = secretFile;
          default = "${cfg.secretsDir}/grafana-admin-password";
          defaultText = lib.literalExpression ''"''${config.services.cdc-lake.secretsDir}/grafana-admin-password"'';
          description = ''
            File with the password of Grafana's `admin` user, outside the
            Nix store; generated at first boot when it is the default. Grafana
            applies it when it creates its database (first start); change the
            password of an existing installation with
            `grafana cli admin reset-admin-password`.
          '';
        };

        secretKeyFile = lib.mkOption {
          type = secretFile;
          default = "${cfg.secretsDir}/grafana-secret-key";
          defaultText = lib.literalExpression ''"''${config.services.cdc-lake.secretsDir}/grafana-secret-key"'';
          description = ''
            File with Grafana's `secret_key` (it signs and encrypts secrets
            in Grafana's database), outside the Nix store; generated at first
            boot when it is the default. Keep it: Grafana cannot decrypt what
            it stored with another key.
          '';
        };
      };
    };

    pgadmin = {
      enable = lib.mkEnableOption "pgAdmin 4 (nixpkgs' services.pgadmin) on 127.0.0.1, port {option}`services.pgadmin.port` (5050)";

      email = lib.mkOption {
        type = lib.types.str;
        default = "admin@example.org";
        description = "Login (an email address) of pgAdmin's initial user.";
      };

      passwordFile = lib.mkOption {
        type = secretFile;
        default = "${cfg.secretsDir}/pgadmin-password";
        defaultText = lib.literalExpression ''"''${config.services.cdc-lake.secretsDir}/pgadmin-password"'';
        description = ''
          File with the password of pgAdmin's initial user, outside the Nix
          store; generated at first boot when it is the default.
        '';
      };
    };
  };

  config = lib.mkMerge [
    (lib.mkIf (cfg.enable && mon.enable) {
      assertions = [
        {
          assertion = lib.length (lib.splitString walMarker alertsText) == 2;
          message = "nixos/monitoring/alerts.yml must contain \"${walMarker}\" exactly once: it is the slot WAL threshold that services.cdc-lake.monitoring.slotWalAlertBytes replaces.";
        }
      ];

      systemd.services.cdc-lake-secrets = {
        before = ["grafana.service"];
        script = lib.mkAfter ''
          gen grafana-admin-password
          gen grafana-secret-key
        '';
      };

      services.prometheus = {
        enable = true;
        listenAddress = lib.mkDefault "127.0.0.1";
        retentionTime = lib.mkDefault "15d";
        globalConfig = {
          scrape_interval = "15s";
          evaluation_interval = "15s";
        };
        scrapeConfigs =
          [
            (job "prometheus" (scrapeAddress prom.listenAddress prom.port))
            (job "postgres" (scrapeAddress exporters.postgres.listenAddress exporters.postgres.port))
            (job "kafka" (scrapeAddress exporters.kafka.listenAddress exporters.kafka.port))
          ]
          ++ lib.optional sinkMetrics.enable (job "cdc-sink" (scrapeAddress sinkMetrics.address sinkMetrics.port))
          ++ lib.optional (cfg.generator.enable && genMetrics.enable)
          (job "tweetgen" (scrapeAddress genMetrics.address genMetrics.port))
          ++ lib.optional cfg.slotGuard.enable (job "cdc-slot-guard" "127.0.0.1:${toString cfg.slotGuard.metricsPort}");
        # nixpkgs checks it with `promtool check rules` at build time.
        ruleFiles = [alertsFile];
      };

      # postgres_exporter as its own role, through the socket with peer
      # authentication (no password), with pg_monitor's read access. Its
      # replication slot metrics include pg_replication_slots_pg_wal_lsn_diff
      # {slot_name, database}, pg_current_wal_lsn() - restart_lsn per slot
      # (postgres_exporter 0.17 to 0.20, in its default metrics).
      services.prometheus.exporters.postgres = {
        enable = true;
        listenAddress = lib.mkDefault "127.0.0.1";
        dataSourceName = "user=postgres-exporter database=twitter host=/run/postgresql sslmode=disable";
      };
      services.postgresql.ensureUsers = [{name = "postgres-exporter";}];
      systemd.services.cdc-lake-db.script = lib.mkAfter ''
        psql -v ON_ERROR_STOP=1 -d twitter -c 'GRANT pg_monitor TO "postgres-exporter"'
      '';
      systemd.services.prometheus-postgres-exporter.after = ["cdc-lake-db.service"];

      # nixpkgs' Kafka exporter is kminion. Its module passes no address or
      # port: kminion reads them (and the brokers) from its environment.
      services.prometheus.exporters.kafka = {
        enable = true;
        listenAddress = lib.mkDefault "127.0.0.1";
        port = lib.mkDefault 9308;
      };
      systemd.services.prometheus-kafka-exporter.environment = {
        KAFKA_BROKERS = "127.0.0.1:9092";
        EXPORTER_HOST = exporters.kafka.listenAddress;
        EXPORTER_PORT = toString exporters.kafka.port;
      };

      services.grafana = {
        enable = true;
        settings = {
          server = {
            http_addr = lib.mkDefault "127.0.0.1";
            http_port = lib.mkDefault 3000;
          };
          security = {
            admin_user = "admin";
            admin_password = grafanaCredential "admin-password";
            secret_key = grafanaCredential "secret-key";
            disable_gravatar = true;
          };
          analytics.reporting_enabled = false;
          users.allow_sign_up = false;
        };
        provision = {
          enable = true;
          datasources.settings.datasources = [
            {
              name = "Prometheus";
              type = "prometheus";
              uid = datasourceUid;
              access = "proxy";
              url = "http://${scrapeAddress prom.listenAddress prom.port}";
              isDefault = true;
              jsonData.timeInterval = "15s";
            }
          ];
          dashboards.settings.providers = [
            {
              name = "cdc-lake";
              disableDeletion = true;
              allowUiUpdates = false;
              options.path = ./monitoring/dashboards;
            }
          ];
        };
      };
      systemd.services.grafana = {
        after = ["cdc-lake-secrets.service" "prometheus.service"];
        requires = ["cdc-lake-secrets.service"];
        serviceConfig.LoadCredential = [
          "admin-password:${mon.grafana.adminPasswordFile}"
          "secret-key:${mon.grafana.secretKeyFile}"
        ];
      };
    })

    (lib.mkIf (cfg.enable && cfg.pgadmin.enable) {
      systemd.services.cdc-lake-secrets = {
        before = ["pgadmin.service"];
        script = lib.mkAfter ''
          gen pgadmin-password
        '';
      };
      services.pgadmin = {
        enable = true;
        initialEmail = cfg.pgadmin.email;
        # nixpkgs' module hands it over with LoadCredential.
        initialPasswordFile = cfg.pgadmin.passwordFile;
        settings.DEFAULT_SERVER = lib.mkDefault "127.0.0.1";
      };
      systemd.services.pgadmin = {
        after = ["cdc-lake-secrets.service"];
        requires = ["cdc-lake-secrets.service"];
      };
    })
  ];
}
