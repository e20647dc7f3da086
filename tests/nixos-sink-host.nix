# NixOS VM test of the README's deployment: a host that imports only
# nixosModules.cdc-sink, configured like the README's host example, drains
# Debezium events from another machine's Kafka into Delta tables in that
# machine's MinIO.
#
# `lake` runs Kafka and MinIO straight from the nixpkgs modules (none of
# ours); its topics get the real Debezium events captured from the local
# stack (crates/cdc-sink/tests/fixtures), so no PostgreSQL or Connect is
# needed here. `sink` is the host under test.
{
  self,
  pkgs,
}: let
  common = import ./nixos-common.nix {inherit self pkgs;};
  inherit (common) kafka python s3;
  secrets = "/var/lib/lake-secrets";
  fixtures = ../crates/cdc-sink/tests/fixtures/twitter.jsonl;
in {
  name = "cdc-lake-sink-host";

  nodes.lake = {
    services.apache-kafka = {
      enable = true;
      package = kafka;
      # Made by `kafka-storage.sh random-uuid`.
      clusterId = "Gyst-Ly3QJ6BCeNq0Zb2Gw";
      formatLogDirs = true;
      jvmOptions = ["-Xms128m" "-Xmx512m"];
      settings = {
        "node.id" = 1;
        "process.roles" = ["broker" "controller"];
        "controller.quorum.voters" = "1@127.0.0.1:9093";
        "controller.listener.names" = ["CONTROLLER"];
        "listeners" = ["PLAINTEXT://0.0.0.0:9092" "CONTROLLER://127.0.0.1:9093"];
        # The name the sink host resolves (the test network's /etc/hosts).
        "advertised.listeners" = ["PLAINTEXT://lake:9092"];
        "listener.security.protocol.map" = ["CONTROLLER:PLAINTEXT" "PLAINTEXT:PLAINTEXT"];
        "inter.broker.listener.name" = "PLAINTEXT";
        "log.dirs" = ["/var/lib/apache-kafka"];
        "offsets.topic.replication.factor" = 1;
        "transaction.state.log.replication.factor" = 1;
        "transaction.state.log.min.isr" = 1;
        "share.coordinator.state.topic.replication.factor" = 1;
        "share.coordinator.state.topic.min.isr" = 1;
        "group.initial.rebalance.delay.ms" = 0;
      };
    };
    systemd.services.apache-kafka.serviceConfig.StateDirectory = "apache-kafka";

    # MinIO's root credentials, made at boot so that none is in the store.
    systemd.services.lake-secrets = {
      wantedBy = ["multi-user.target"];
      before = ["minio.service"];
      requiredBy = ["minio.service"];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        UMask = "0077";
      };
      path = [pkgs.openssl];
      script = ''
        mkdir -p ${secrets}
        [ -s ${secrets}/minio-root-password ] || openssl rand -hex 24 > ${secrets}/minio-root-password
        printf 'MINIO_ROOT_USER=cdclake\nMINIO_ROOT_PASSWORD=%s\n' "$(cat ${secrets}/minio-root-password)" \
          > ${secrets}/minio-root.env
      '';
    };
    services.minio = {
      enable = true;
      rootCredentialsFile = "${secrets}/minio-root.env";
    };

    networking.firewall.allowedTCPPorts = [9000 9092];
    environment.systemPackages = [kafka python];
    virtualisation.memorySize = 2048;
  };

  # Exactly the README's host example, with this test's addresses.
  nodes.sink = {
    imports = [self.nixosModules.cdc-sink];
    services.cdc-sink = {
      enable = true;
      secretAccessKeyFile = "/run/secrets/lake-s3-secret";
      settings = {
        kafka.brokers = "lake:9092";
        s3 = {
          endpoint = "http://lake:9000";
          bucket = "lake";
          access_key_id = "cdclake";
        };
        flush.max_age_ms = 2000;
      };
    };
  };

  testScript = ''
    ${common.prelude}
    LAKE_S3 = "${s3} http://127.0.0.1:9000 ${secrets}/minio-root-password"
    BOOTSTRAP = "--bootstrap-server 127.0.0.1:9092"

    lake.start()
    lake.wait_for_unit("apache-kafka.service")
    lake.wait_for_unit("minio.service")

    with subtest("the lake machine has a bucket and Debezium events"):
        lake.wait_until_succeeds(f"{LAKE_S3} mb lake", timeout=120)
        for table in ["users", "tweets", "likes"]:
            lake.wait_until_succeeds(
                f"{KAFKA_BIN}/kafka-topics.sh {BOOTSTRAP} --create --if-not-exists "
                f"--topic twitter.{table} --partitions 3 --replication-factor 1",
                timeout=120,
            )
        # Captured events: lines 1-2 are users (create, update), 3-4 tweets
        # (create, delete).
        lake.succeed(
            f"sed -n 1,2p ${fixtures} | {KAFKA_BIN}/kafka-console-producer.sh {BOOTSTRAP} --topic twitter.users"
        )
        lake.succeed(
            f"sed -n 3,4p ${fixtures} | {KAFKA_BIN}/kafka-console-producer.sh {BOOTSTRAP} --topic twitter.tweets"
        )

    with subtest("the sink host gets its secret, as sops-nix or agenix would deliver it"):
        sink.start()
        sink.wait_for_unit("multi-user.target")
        secret = lake.succeed("cat ${secrets}/minio-root-password").strip()
        # Through a here-document: the secret never is a process argument.
        sink.succeed(
            "install -d -m 0700 /run/secrets && (umask 077; cat > /run/secrets/lake-s3-secret) <<'EOF'\n"
            + secret + "\nEOF"
        )
        # Until now the unit failed on its missing credential and was being
        # restarted every 5 s; start it now rather than wait for the timer.
        sink.succeed("systemctl restart cdc-sink.service")
        sink.wait_for_unit("cdc-sink.service")

    with subtest("hardening on the sink host"):
        check_hardening(sink, [("cdc-sink.service", 20)])

    with subtest("Delta tables land in the lake machine's bucket, every event committed"):
        # Table name = the topic's last dot-part; version 0 creates the
        # table, the events come in a later commit.
        for table in ["users", "tweets"]:
            wait_for_delta_commit(lake, LAKE_S3, table, 0)
        lake.wait_until_succeeds(lag_is_zero("cdc-sink"), timeout=180)
        offsets = lake.succeed(
            f"{KAFKA_BIN}/kafka-consumer-groups.sh {BOOTSTRAP} --describe --group cdc-sink 2>/dev/null"
        )
        print(offsets)
        committed: dict[str, int] = {}
        for line in offsets.splitlines():
            f = line.split()
            if len(f) > 4 and f[1].startswith("twitter.") and f[3] != "-":
                committed[f[1]] = committed.get(f[1], 0) + int(f[3])
        assert committed.get("twitter.users") == 2 and committed.get("twitter.tweets") == 2, committed

    with subtest("the Delta tables hold exactly the fixture's changes"):
        # Read through the log: users got a create and an update of id 1
        # (2 changes, 1 live row), tweets a create and a delete (2 changes,
        # none live); every live file is Parquet, no offset twice, and each
        # partition with rows has its txn version in the log.
        print(lake.succeed(
            "${python}/bin/python3 ${./lake_check.py} --endpoint http://127.0.0.1:9000 "
            "--secret-file ${secrets}/minio-root-password --no-pg --tables users,tweets "
            "--expect users=2:1 --expect tweets=2:0 --restart-checks"
        ))
  '';
}
