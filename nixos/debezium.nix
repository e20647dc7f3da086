# services.debezium: a Kafka Connect distributed worker with the Debezium
# PostgreSQL connector on its plugin.path, and a oneshot that registers the
# connector from debezium/*.json idempotently (PUT /connectors/NAME/config),
# with the tables of `capturedTables` as its table.include.list.
self: {
  config,
  lib,
  pkgs,
  ...
}: let
  cfg = config.services.debezium;
  ours = self.packages.${pkgs.stdenv.hostPlatform.system};
  properties = pkgs.formats.javaProperties {};
  workerProperties = properties.generate "connect-distributed.properties" cfg.settings;
  log4j = pkgs.writeText "connect-log4j2.properties" ''
    rootLogger.level=INFO
    rootLogger.appenderRef.stdout.ref=STDOUT
    appender.stdout.type=Console
    appender.stdout.name=STDOUT
    appender.stdout.layout.type=PatternLayout
    appender.stdout.layout.pattern=%p %m (%c)%n
    logger.reflections.name=org.reflections
    logger.reflections.level=ERROR
  '';
  restUrl = "http://127.0.0.1:${toString cfg.restPort}";
  captured = import ./captured-tables.nix lib;
  includeList = captured.includeList cfg.capturedTables;
in {
  options.services.debezium = {
    enable = lib.mkEnableOption "Kafka Connect with the Debezium PostgreSQL connector";

    kafkaPackage = lib.mkPackageOption pkgs "Kafka" {
      default = "apacheKafka_4_1";
      extraDescription = "Its Connect runtime runs the worker.";
    };

    plugin = lib.mkPackageOption ours "debezium-connector-postgres" {
      pkgsText = "cdc-lake.packages.\${system}";
      extraDescription = "Its share/kafka-connect is the worker's plugin.path.";
    };

    restPort = lib.mkOption {
      type = lib.types.port;
      default = 8083;
      description = "Port of the Connect REST API (bound to 127.0.0.1).";
    };

    heapSize = lib.mkOption {
      type = lib.types.str;
      default = "768m";
      description = "JVM maximum heap of the worker.";
    };

    settings = lib.mkOption {
      type = properties.type;
      default = {};
      description = ''
        Extra Connect worker properties, merged over the defaults (one broker:
        every replication factor is 1).
      '';
    };

    connectorName = lib.mkOption {
      type = lib.types.str;
      default = "twitter-postgres";
      description = "Name the connector is registered under.";
    };

    connectorConfig = lib.mkOption {
      type = lib.types.path;
      default = ../debezium/twitter-postgres.json;
      description = ''
        Connector configuration JSON. Its `database.password` should stay
        `''${env:DEBEZIUM_DB_PASSWORD}`, which the worker resolves from
        {option}`services.debezium.databasePasswordFile`.
      '';
    };

    capturedTables = lib.mkOption {
      type = captured.type;
      default = captured.default;
      defaultText = lib.literalMD "the tables listed in `db/captured-tables`";
      example = ["users" "tweets" "likes" "follows"];
      description = ''
        Tables of schema `public` the connector captures: its
        `table.include.list`. Each lands in Kafka as `<topic.prefix>.<table>`.
        When the list changes, the connector is stopped, updated and resumed,
        so that no task still running with the old list drops a new table's
        changes. The PostgreSQL publication must carry the same tables;
        {option}`services.cdc-lake.capturedTables` keeps both in step.
      '';
    };

    connectorOverrides = lib.mkOption {
      type = lib.types.attrsOf lib.types.str;
      default = {};
      example = {
        "database.hostname" = "db.example.org";
        "value.converter.format" = "json";
      };
      description = ''
        Keys replaced in the connector JSON at registration.
        The values are written in Avro's binary encoding by default;
        `"value.converter.format" = "json"` writes JSON payloads instead
        (more bytes and CPU in Connect and the sink, which reads both; see
        docs/design.md, "The message format").
      '';
    };

    databasePasswordFile = lib.mkOption {
      type = lib.types.nullOr (import ./secret-file.nix lib);
      default = null;
      description = "File with the PostgreSQL password of the Debezium role, outside the Nix store.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = !(cfg.connectorOverrides ? "table.include.list");
        message = "services.debezium.connectorOverrides.\"table.include.list\" would bypass the captured-tables list: set services.debezium.capturedTables.";
      }
      {
        assertion = lib.length (lib.unique cfg.capturedTables) == lib.length cfg.capturedTables;
        message = "services.debezium.capturedTables lists a table twice.";
      }
      {
        # The signal table's events are dropped before Kafka by a predicate
        # on their topic name, which must follow the prefix and the table.
        assertion = let
          c = builtins.fromJSON (builtins.readFile cfg.connectorConfig) // cfg.connectorOverrides;
        in
          !(c ? "signal.data.collection")
          || (c."predicates.isSignal.pattern" or "")
          == lib.escapeRegex "${c."topic.prefix"}.${c."signal.data.collection"}";
        message = "services.debezium: predicates.isSignal.pattern must match the topic of signal.data.collection (<topic.prefix>.<schema>.<table>, dots escaped), or the signal table's events reach Kafka and the lake.";
      }
    ];

    services.debezium.settings = lib.mapAttrs (_: lib.mkDefault) {
      "bootstrap.servers" = "127.0.0.1:9092";
      "group.id" = "cdc-lake-connect";
      "listeners" = "http://127.0.0.1:${toString cfg.restPort}";
      "rest.advertised.host.name" = "127.0.0.1";
      "key.converter" = "org.apache.kafka.connect.json.JsonConverter";
      "value.converter" = "org.apache.kafka.connect.json.JsonConverter";
      "config.storage.topic" = "connect-configs";
      "offset.storage.topic" = "connect-offsets";
      "status.storage.topic" = "connect-status";
      "config.storage.replication.factor" = "1";
      "offset.storage.replication.factor" = "1";
      "status.storage.replication.factor" = "1";
      "offset.flush.interval.ms" = "5000";
      "plugin.path" = "${cfg.plugin}/share/kafka-connect";
      "config.providers" = "env";
      "config.providers.env.class" = "org.apache.kafka.common.config.provider.EnvVarConfigProvider";
    };

    systemd.services.kafka-connect = {
      description = "Kafka Connect worker with Debezium";
      wantedBy = ["multi-user.target"];
      after = ["apache-kafka.service" "network-online.target"];
      wants = ["apache-kafka.service" "network-online.target"];
      # The password reaches the JVM through its environment, read from the
      # credential at start; it is never in the store or on a command line.
      script = ''
        ${lib.optionalString (cfg.databasePasswordFile != null) ''
          DEBEZIUM_DB_PASSWORD=$(cat "$CREDENTIALS_DIRECTORY/db-password")
          export DEBEZIUM_DB_PASSWORD
        ''}
        exec ${cfg.kafkaPackage.passthru.jre}/bin/java -Xms256m -Xmx${cfg.heapSize} \
          -Dlog4j2.configurationFile=${log4j} \
          -cp "${cfg.kafkaPackage}/libs/*" \
          org.apache.kafka.connect.cli.ConnectDistributed ${workerProperties}
      '';
      # The sandbox of our Rust services (hardening.nix) minus what a JVM
      # cannot live with: MemoryDenyWriteExecute (the JIT writes and then
      # executes code), ~@resources (the JVM raises RLIMIT_NOFILE with
      # setrlimit at start) and ProcSubset=pid (it reads /proc/meminfo and
      # /proc/cpuinfo to size itself).
      serviceConfig = {
        DynamicUser = true;
        LoadCredential = lib.optional (cfg.databasePasswordFile != null) "db-password:${cfg.databasePasswordFile}";
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        PrivateMounts = true;
        NoNewPrivileges = true;
        CapabilityBoundingSet = [""];
        AmbientCapabilities = [""];
        SystemCallFilter = ["@system-service" "~@privileged"];
        # A call outside the filter fails with EPERM instead of killing the
        # JVM outright: HotSpot probes for optional syscalls and falls back.
        SystemCallErrorNumber = "EPERM";
        SystemCallArchitectures = "native";
        RestrictAddressFamilies = ["AF_INET" "AF_INET6" "AF_UNIX"];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        ProtectClock = true;
        ProtectControlGroups = true;
        ProtectHostname = true;
        ProtectKernelLogs = true;
        ProtectKernelModules = true;
        ProtectKernelTunables = true;
        ProtectProc = "invisible";
        UMask = "0077";
        Restart = "on-failure";
        RestartSec = 10;
        SuccessExitStatus = "0 143";
      };
    };

    systemd.services.debezium-connector = {
      description = "Register the Debezium connector with Kafka Connect";
      wantedBy = ["multi-user.target"];
      after = ["kafka-connect.service" "postgresql.service"];
      requires = ["kafka-connect.service"];
      path = [pkgs.curl pkgs.jq];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        DynamicUser = true;
        Restart = "on-failure";
        RestartSec = 10;
      };
      # RUNNING only counts once the task list is non-empty: right after
      # the PUT the connector is RUNNING with no task started yet. A FAILED
      # connector or task (say PostgreSQL was not ready, or an earlier boot
      # left it FAILED) stays FAILED until restarted, so restart the failed
      # parts a few times before giving up to systemd's Restart=.
      script = ''
        for _ in $(seq 120); do
          curl -fsS ${restUrl}/connectors >/dev/null && break
          sleep 1
        done
        url=${restUrl}/connectors/${cfg.connectorName}
        # The schema-id converter publishes schemas to the worker's Kafka
        # unless an override says otherwise.
        body=$(jq --argjson o ${lib.escapeShellArg (builtins.toJSON cfg.connectorOverrides)} \
          --arg kafka ${lib.escapeShellArg cfg.settings."bootstrap.servers"} \
          '. + {"table.include.list": ${builtins.toJSON includeList},
                "value.converter.schema.bootstrap.servers": $kafka} + $o' ${cfg.connectorConfig})
        # A change of tables stops the connector before the PUT and resumes
        # it after, so the tasks that run afterwards are new ones with the
        # new list: after a plain PUT the old task may run on for a while and
        # drop the changes of a table the publication already carries.
        current=$(curl -fsS "$url/config" 2>/dev/null | jq -r '."table.include.list" // empty') || current=
        stopped=
        if [ -n "$current" ] && [ "$current" != ${lib.escapeShellArg includeList} ]; then
          echo "connector tables change: $current -> ${includeList}" >&2
          curl -fsS -X PUT "$url/stop" >/dev/null
          for _ in $(seq 120); do
            [ "$(curl -fsS "$url/status" | jq -r '.connector.state + ":" + (.tasks | length | tostring)')" = STOPPED:0 ] && break
            sleep 1
          done
          stopped=1
        fi
        curl -fsS -X PUT -H 'Content-Type: application/json' --data "$body" "$url/config" >/dev/null
        if [ -n "$stopped" ] || [ "$(curl -fsS "$url/status" | jq -r .connector.state)" = STOPPED ]; then
          curl -fsS -X PUT "$url/resume" >/dev/null
        fi
        restarts=0
        state=
        for _ in $(seq 240); do
          state=$(curl -fsS ${restUrl}/connectors/${cfg.connectorName}/status | jq -r '
            ([.connector.state] + [.tasks[].state]) as $s
            | if ($s | index("FAILED")) then "FAILED"
              elif (.tasks | length) > 0 and ($s | all(. == "RUNNING")) then "RUNNING"
              else "waiting: " + ($s | join(",")) end') || state=unreachable
          case $state in
            RUNNING) exit 0 ;;
            FAILED)
              if [ "$restarts" -ge 3 ]; then
                curl -fsS ${restUrl}/connectors/${cfg.connectorName}/status \
                  | jq -r '[.connector.trace, .tasks[].trace] | map(select(.)) | .[0]' | head -n 20 >&2
                echo "connector still FAILED after $restarts restarts" >&2
                exit 1
              fi
              restarts=$((restarts + 1))
              echo "connector FAILED, restarting its failed parts ($restarts)" >&2
              curl -fsS -X POST \
                "${restUrl}/connectors/${cfg.connectorName}/restart?includeTasks=true&onlyFailed=true" >/dev/null || true
              sleep 5
              ;;
            *) sleep 1 ;;
          esac
        done
        echo "connector not RUNNING: $state" >&2
        exit 1
      '';
    };
  };
}
