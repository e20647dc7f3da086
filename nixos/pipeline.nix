# services.cdc-lake: the whole pipeline on one host. PostgreSQL 15 with
# logical replication, Kafka 4.1 in KRaft mode, Kafka Connect with Debezium,
# MinIO with the lake bucket, the generator and the sink.
#
# Credentials are generated at first boot into `secretsDir` (root-only) and
# handed to each service as a systemd credential; none is in the Nix store.
#
# MinIO is marked insecure in nixos-26.05 (upstream stopped maintaining it).
# This module does not touch nixpkgs.config: that would break every host that
# passes its own pkgs (nixpkgs.pkgs) and would replace the host's predicate.
# The host permits the package itself, e.g. with
#   nixpkgs.config.permittedInsecurePackages = [ "minio-<version>" ];
# as the VM (nixos/vm.nix) and the tests (nix/checks.nix) do by name.
self: {
  config,
  lib,
  pkgs,
  ...
}: let
  cfg = config.services.cdc-lake;
  secrets = cfg.secretsDir;
  pg = config.services.postgresql.package;
  captured = import ./captured-tables.nix lib;
  capturedFile = pkgs.writeText "captured-tables" (lib.concatLines cfg.capturedTables);
  # db/capture.sh with the publication and slot the connector is told to use.
  connector = let
    dbz = config.services.debezium;
  in
    builtins.fromJSON (builtins.readFile dbz.connectorConfig) // dbz.connectorOverrides;
  capture = phase: ''
    CDC_PUBLICATION=${lib.escapeShellArg connector."publication.name"} \
    CDC_SLOT=${lib.escapeShellArg connector."slot.name"} \
    CDC_SIGNAL_TABLE=${lib.escapeShellArg (connector."signal.data.collection" or "public.cdc_signal")} \
    PGDATABASE=twitter ${pkgs.runtimeShell} ${../db/capture.sh} ${phase} ${capturedFile}'';
  # `sudo -u postgres cdc-lake-snapshot users tweets`: an incremental
  # snapshot of captured tables on demand (docs/operations.md).
  snapshotCommand = pkgs.writeShellScriptBin "cdc-lake-snapshot" ''
    export PATH=${lib.makeBinPath [pg pkgs.coreutils]}:$PATH
    ${capture "snapshot"} "$@"
  '';
  kafkaLog4j2 = pkgs.writeText "kafka-log4j2.properties" ''
    rootLogger.level=INFO
    rootLogger.appenderRef.stdout.ref=STDOUT
    appender.stdout.type=Console
    appender.stdout.name=STDOUT
    appender.stdout.layout.type=PatternLayout
    appender.stdout.layout.pattern=%p %m (%c)%n
  '';
in {
  imports = [
    self.nixosModules.tweetgen
    self.nixosModules.cdc-sink
    self.nixosModules.debezium
    # services.cdc-lake.{monitoring,pgadmin}: Prometheus, the exporters,
    # Grafana, pgAdmin.
    ./monitoring.nix
  ];

  options.services.cdc-lake = {
    enable = lib.mkEnableOption "the complete CDC lake pipeline with its demo workload";

    secretsDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/cdc-lake/secrets";
      description = ''
        Where first boot generates the PostgreSQL, MinIO and S3 credentials
        (mode 0700, root). Existing files are kept.
      '';
    };

    bucket = lib.mkOption {
      type = lib.types.str;
      default = "lake";
      description = "MinIO bucket that receives the Parquet files.";
    };

    kafkaClusterId = lib.mkOption {
      type = lib.types.strMatching "[A-Za-z0-9_-]{22}";
      # Made by `kafka-storage.sh random-uuid` (Kafka 4.1.1). A fixed default
      # is fine for a single-broker demo: the id only has to be stable.
      default = "PzJnTVlKQziRX9gc9_QGRQ";
      description = ''
        KRaft cluster id used to format the log dir on first start, as printed
        by `kafka-storage.sh random-uuid` (a UUID in URL-safe base64). An
        already formatted log dir keeps the id it was formatted with.
      '';
    };

    capturedTables = lib.mkOption {
      type = captured.type;
      default = captured.default;
      defaultText = lib.literalMD "the tables listed in `db/captured-tables`: users, tweets, likes";
      example = ["users" "tweets" "likes" "follows"];
      description = ''
        Tables of schema `public` captured into the lake, each as a Delta
        table at `s3://<bucket>/<table>/`. This one list drives the
        publication, the grants of the `debezium` role and the connector's
        `table.include.list` ({option}`services.debezium.capturedTables`);
        the sink subscribes to every `twitter.*` topic. A table must exist
        (create it in your own unit or migration) and have a primary key or
        REPLICA IDENTITY FULL. Tables are only added to the publication: one
        taken off the list stops being captured and stays published, which
        the `cdc-lake-publication` unit logs with the statement that drops
        it. Rows already in a newly captured table are backfilled by an
        incremental snapshot that `cdc-lake-publication` signals when it
        publishes the table; its changes stream meanwhile.
      '';
    };

    generator.enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Whether to run the demo workload generator.";
    };

    slotGuard.enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Whether to run `cdc-slot-guard`, which watches the connector's
        replication slot and, when PostgreSQL reports it `lost`, stops the
        connector, drops the slot, deletes the connector's offsets, resumes
        it on a new slot (`snapshot.mode=no_data`) and signals an incremental
        snapshot of every captured table.
      '';
    };

    slotGuard.metricsPort = lib.mkOption {
      type = lib.types.port;
      default = 9466;
      description = "Port of the slot guard's /metrics, /healthz and /readyz, on 127.0.0.1.";
    };
  };

  config = lib.mkIf cfg.enable {
    environment.systemPackages = [snapshotCommand];

    systemd.services.cdc-lake-secrets = {
      description = "Generate the CDC lake credentials on first boot";
      wantedBy = ["multi-user.target"];
      before = ["postgresql.service" "minio.service" "kafka-connect.service" "tweetgen.service" "cdc-sink.service"];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        UMask = "0077";
      };
      path = [pkgs.openssl pkgs.coreutils];
      # monitoring.nix appends `gen` lines for the credentials of Grafana
      # and pgAdmin.
      script = ''
        mkdir -p ${secrets}
        chmod 0700 ${secrets}
        gen() { [ -s "${secrets}/$1" ] || openssl rand -hex 24 > "${secrets}/$1"; }
        gen tweetgen-db-password
        gen debezium-db-password
        gen minio-root-password
        if [ ! -s ${secrets}/minio-root.env ]; then
          printf 'MINIO_ROOT_USER=cdclake\nMINIO_ROOT_PASSWORD=%s\n' "$(cat ${secrets}/minio-root-password)" \
            > ${secrets}/minio-root.env
        fi
      '';
    };

    services.postgresql = {
      enable = true;
      package = pkgs.postgresql_15;
      settings = {
        wal_level = "logical";
        max_replication_slots = 8;
        max_wal_senders = 8;
        max_slot_wal_keep_size = "2GB";
      };
      ensureDatabases = ["twitter"];
      ensureUsers = [
        {name = "tweetgen";}
        {
          name = "debezium";
          ensureClauses.replication = true;
        }
      ];
      authentication = ''
        host twitter     tweetgen 127.0.0.1/32 scram-sha-256
        host twitter     debezium 127.0.0.1/32 scram-sha-256
        host replication debezium 127.0.0.1/32 scram-sha-256
      '';
    };

    # Schema and grants from db/, the role passwords from the generated
    # credentials, and the checks, grants and (before the connector's slot
    # exists) publication of the captured tables; every statement is
    # idempotent. Tables new to a running connector are published by
    # cdc-lake-publication, once the connector captures them.
    systemd.services.cdc-lake-db = {
      description = "Apply the CDC lake schema and role passwords";
      wantedBy = ["multi-user.target"];
      after = ["postgresql-setup.service" "cdc-lake-secrets.service"];
      requires = ["postgresql-setup.service" "cdc-lake-secrets.service"];
      before = ["tweetgen.service" "debezium-connector.service"];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        User = "postgres";
        LoadCredential = [
          "tweetgen:${secrets}/tweetgen-db-password"
          "debezium:${secrets}/debezium-db-password"
        ];
      };
      path = [pg];
      script = ''
        psql -v ON_ERROR_STOP=1 -d twitter \
          -v tg="$(cat "$CREDENTIALS_DIRECTORY/tweetgen")" \
          -v dz="$(cat "$CREDENTIALS_DIRECTORY/debezium")" <<'SQL'
        ALTER ROLE tweetgen PASSWORD :'tg';
        ALTER ROLE debezium PASSWORD :'dz';
        SQL
        for f in ${../db}/*.sql; do
          psql -v ON_ERROR_STOP=1 -d twitter -f "$f"
        done
        ${capture "before-connector"}
      '';
    };

    # The second half of db/capture.sh: publish the listed tables the
    # publication lacks, after debezium-connector has returned with the
    # connector's tasks running on the new list. A rebuild that changes the
    # list restarts debezium-connector, and Requires= restarts this unit
    # after it.
    systemd.services.cdc-lake-publication = {
      description = "Publish the captured tables the connector now includes";
      wantedBy = ["multi-user.target"];
      after = ["debezium-connector.service"];
      requires = ["debezium-connector.service"];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        User = "postgres";
      };
      path = [pg];
      script = capture "after-connector";
    };

    services.apache-kafka = {
      enable = true;
      package = pkgs.apacheKafka_4_1;
      clusterId = cfg.kafkaClusterId;
      formatLogDirs = true;
      formatLogDirsIgnoreFormatted = true;
      # Kafka 4 logs through log4j2 and ignores the log4j-1 option the
      # nixpkgs module passes; without its own configuration log4j2 falls
      # back to ERROR only.
      jvmOptions = ["-Xms256m" "-Xmx512m" "-Dlog4j2.configurationFile=${kafkaLog4j2}"];
      settings = {
        "node.id" = 1;
        "process.roles" = ["broker" "controller"];
        "controller.quorum.voters" = "1@127.0.0.1:9093";
        "controller.listener.names" = ["CONTROLLER"];
        "listeners" = ["PLAINTEXT://127.0.0.1:9092" "CONTROLLER://127.0.0.1:9093"];
        # 127.0.0.1 is also right for a host client through the VM's
        # forwarded port 9092.
        "advertised.listeners" = ["PLAINTEXT://127.0.0.1:9092"];
        "listener.security.protocol.map" = ["CONTROLLER:PLAINTEXT" "PLAINTEXT:PLAINTEXT"];
        "inter.broker.listener.name" = "PLAINTEXT";
        "log.dirs" = ["/var/lib/apache-kafka"];
        "num.partitions" = 3;
        "offsets.topic.replication.factor" = 1;
        "transaction.state.log.replication.factor" = 1;
        "transaction.state.log.min.isr" = 1;
        "share.coordinator.state.topic.replication.factor" = 1;
        "share.coordinator.state.topic.min.isr" = 1;
        "group.initial.rebalance.delay.ms" = 0;
      };
    };
    systemd.services.apache-kafka.serviceConfig = {
      StateDirectory = "apache-kafka";
      Restart = "on-failure";
      # The default 100 ms would exhaust the start limit (5 starts in 10 s)
      # within a second of a crash loop and leave the broker down for good.
      RestartSec = 5;
    };

    services.minio = {
      enable = true;
      listenAddress = "127.0.0.1:9000";
      consoleAddress = "127.0.0.1:9001";
      region = "us-east-1";
      rootCredentialsFile = "${secrets}/minio-root.env";
    };
    systemd.services.minio = {
      after = ["cdc-lake-secrets.service"];
      requires = ["cdc-lake-secrets.service"];
    };

    systemd.services.cdc-lake-bucket = {
      description = "Create the lake bucket in MinIO";
      wantedBy = ["multi-user.target"];
      after = ["minio.service"];
      requires = ["minio.service"];
      before = ["cdc-sink.service"];
      path = [pkgs.curl];
      # MinIO may take longer than one attempt's minute on a cold, loaded
      # boot: retry until it answers instead of failing for good.
      unitConfig.StartLimitIntervalSec = 0;
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        LoadCredential = "minio:${secrets}/minio-root-password";
        Restart = "on-failure";
        RestartSec = 5;
        # Retry without passing through "failed", so units ordered after
        # this one wait for the outcome instead of seeing a failure.
        RestartMode = "direct";
      };
      script = ''
        for _ in $(seq 60); do
          curl -fsS http://127.0.0.1:9000/minio/health/live && break
          sleep 1
        done
        # The secret reaches curl on stdin (-K -), never on its command line.
        code=$(printf 'user = "cdclake:%s"\n' "$(cat "$CREDENTIALS_DIRECTORY/minio")" \
          | curl -s -K - -o /dev/null -w '%{http_code}' -X PUT \
            --aws-sigv4 "aws:amz:us-east-1:s3" http://127.0.0.1:9000/${cfg.bucket})
        case $code in 200|409) ;; *) echo "bucket creation failed: HTTP $code" >&2; exit 1 ;; esac
      '';
    };

    services.debezium = {
      enable = true;
      inherit (cfg) capturedTables;
      databasePasswordFile = "${secrets}/debezium-db-password";
    };
    systemd.services.kafka-connect.after = ["cdc-lake-secrets.service"];
    systemd.services.debezium-connector = {
      after = ["cdc-lake-db.service"];
      requires = ["cdc-lake-db.service"];
    };

    services.tweetgen = lib.mkIf cfg.generator.enable {
      enable = true;
      passwordFile = "${secrets}/tweetgen-db-password";
      settings.database = {
        host = "127.0.0.1";
        user = "tweetgen";
      };
    };
    systemd.services.tweetgen = lib.mkIf cfg.generator.enable {
      after = ["cdc-lake-db.service"];
      requires = ["cdc-lake-db.service"];
    };

    services.cdc-sink = {
      enable = true;
      # MinIO's root user; a dedicated S3 user is better outside a demo.
      secretAccessKeyFile = "${secrets}/minio-root-password";
      settings = {
        kafka.brokers = "127.0.0.1:9092";
        s3 = {
          endpoint = "http://127.0.0.1:9000";
          inherit (cfg) bucket;
          access_key_id = "cdclake";
        };
      };
    };
    # The guard connects as the connector's role (REPLICATION drops the
    # slot; INSERT on the signal table signals the snapshot) and reads the
    # slot, signal table and tables from the connector's own configuration;
    # after a recovery it writes a marker into the sink's topics.
    systemd.services.cdc-slot-guard = lib.mkIf cfg.slotGuard.enable {
      description = "Recover the Debezium connector when PostgreSQL loses its replication slot";
      wantedBy = ["multi-user.target"];
      after = ["debezium-connector.service" "postgresql.service"];
      wants = ["debezium-connector.service"];
      environment =
        {
          CDC_SLOT_GUARD_DATABASE__HOST = "127.0.0.1";
          CDC_SLOT_GUARD_DATABASE__USER = "debezium";
          CDC_SLOT_GUARD_DATABASE__DBNAME = "twitter";
          CDC_SLOT_GUARD_CONNECT__URL = "http://127.0.0.1:${toString config.services.debezium.restPort}";
          CDC_SLOT_GUARD_CONNECT__CONNECTOR = config.services.debezium.connectorName;
          CDC_SLOT_GUARD_METRICS__LISTEN = "127.0.0.1:${toString cfg.slotGuard.metricsPort}";
          # The recovery markers go to the topics the sink reads.
          CDC_SLOT_GUARD_KAFKA__BOOTSTRAP_SERVERS = config.services.cdc-sink.settings.kafka.brokers;
        }
        // lib.optionalAttrs (config.services.cdc-sink.settings.kafka ? topics) {
          # A TOML array (JSON's is one), as figment reads a list from the
          # environment.
          CDC_SLOT_GUARD_KAFKA__TOPICS = builtins.toJSON config.services.cdc-sink.settings.kafka.topics;
        };
      serviceConfig =
        import ./hardening.nix
        // {
          ExecStart = "${lib.getExe' config.services.cdc-sink.package "cdc-slot-guard"} --password-file %d/db-password";
          LoadCredential = "db-password:${secrets}/debezium-db-password";
          # READY=1 once it reads the slot, WATCHDOG=1 from its loop.
          Type = "notify";
          NotifyAccess = "main";
          WatchdogSec = "60s";
          # Up to 120 s for PostgreSQL and 120 s for Connect before READY.
          TimeoutStartSec = "300s";
        };
    };

    # Wants, not Requires: a bucket unit that failed or restarts must not
    # stop the sink; without the bucket the sink fails and systemd restarts
    # it until the bucket exists.
    systemd.services.cdc-sink = {
      after = ["cdc-lake-bucket.service" "debezium-connector.service"];
      wants = ["cdc-lake-bucket.service"];
    };
  };
}
