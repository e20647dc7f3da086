# What the VM tests share: the node and the Python helpers of the test
# script. Kept separate so that the scenarios assert the same things.
#
# `pkgs` is the instance nix/checks.nix runs the tests with; it permits the
# insecure MinIO package, and the nodes get it read-only (node.pkgs), so the
# modules are tested as a host with its own pkgs would use them.
{
  self,
  pkgs,
}: let
  python = pkgs.python3.withPackages (ps: [ps.boto3 ps.pyarrow]);
  kafka = pkgs.apacheKafka_4_1;

  # `s3 ENDPOINT SECRET_FILE ls PREFIX` lists object keys under a prefix of
  # the lake bucket; `... mb BUCKET` creates a bucket; `... head KEY` prints
  # an object's first four bytes. A store path, so the Python test scripts
  # can embed the command without quoting trouble; the secret is read from a
  # file, never passed on a command line.
  s3 = let
    script = pkgs.writeText "s3.py" ''
      import sys, boto3
      endpoint, secret_file, cmd, arg = sys.argv[1:5]
      secret = open(secret_file).read().strip()
      s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="cdclake",
                        aws_secret_access_key=secret, region_name="us-east-1")
      if cmd == "ls":
          for page in s3.get_paginator("list_objects_v2").paginate(Bucket="lake", Prefix=arg):
              for o in page.get("Contents", []):
                  print(o["Key"])
      elif cmd == "mb":
          try:
              s3.create_bucket(Bucket=arg)
          except s3.exceptions.BucketAlreadyOwnedByYou:
              pass
      elif cmd == "head":
          body = s3.get_object(Bucket="lake", Key=arg, Range="bytes=0-3")["Body"].read()
          print(body.decode("latin-1"))
      else:
          sys.exit(f"unknown command {cmd}")
    '';
  in "${python}/bin/python3 ${script}";
in {
  inherit python kafka s3;

  node = {
    imports = [self.nixosModules.pipeline];
    services.cdc-lake.enable = true;
    services.cdc-sink.settings.flush.max_age_ms = 2000;
    services.tweetgen.settings.workload.interval_ms = 1000;
    virtualisation = {
      memorySize = 6144;
      cores = 4;
      diskSize = 8192;
    };
    environment.systemPackages = [python kafka pkgs.postgresql_15];
  };

  # Helpers of the test scripts. Each takes the machine it works on: the
  # test driver lints the script against the nodes a test really has.
  prelude = ''
    LOCAL_S3 = "${s3} http://127.0.0.1:9000 /var/lib/cdc-lake/secrets/minio-root-password"
    KAFKA_BIN = "${kafka}/bin"


    def start_and_wait(m):
        m.start()
        for unit in ["postgresql.service", "apache-kafka.service", "minio.service",
                     "cdc-lake-db.service", "debezium-connector.service",
                     "tweetgen.service", "cdc-sink.service"]:
            m.wait_for_unit(unit, timeout=600)


    def object_count(m, prefix):
        return len(m.succeed(f"{LOCAL_S3} ls {prefix}").split())


    def wait_for_more_objects(m, prefix, than):
        """Waits until the sink has landed more than `than` objects under prefix."""
        m.wait_until_succeeds(f"test $({LOCAL_S3} ls {prefix} | wc -l) -gt {than}", timeout=300)


    def check_hardening(m, limits):
        """systemd-analyze reports exposure from 0.0 (best) to 10.0; its
        --threshold is on the internal scale, ten times that."""
        for unit, most in limits:
            out = m.succeed(f"systemd-analyze security --no-pager --threshold={most} {unit}")
            print(out.strip().splitlines()[-1])


    def lag_is_zero(group):
        """Shell test: group `group` committed every partition of the twitter
        topics up to its end. A partition with no committed offset (LAG "-")
        only counts as settled if it is empty; users and tweets must be there."""
        return (
            f"{KAFKA_BIN}/kafka-consumer-groups.sh --bootstrap-server 127.0.0.1:9092 "
            f"--describe --group {group} 2>/dev/null | awk '"
            '$2 ~ /^twitter[.]/ { seen[$2] = 1; '
            'if (!($6 == "0" || ($4 == "-" && $5 == "0"))) bad = 1 } '
            'END { exit (bad || !("twitter.users" in seen) || !("twitter.tweets" in seen)) }'
            "'"
        )


    def settle_and_check(m):
        # Stop the workload, then commit a barrier row after it: Debezium
        # publishes in commit order, so once the barrier is in Kafka every
        # change before it is too (one broker, one producer connection, sends
        # in order). Then wait until the sink committed everything (lag 0),
        # and compare the lake with PostgreSQL.
        m.succeed("systemctl stop tweetgen.service")
        m.succeed(
            "sudo -u postgres psql -v ON_ERROR_STOP=1 -d twitter -c "
            "\"INSERT INTO users (username, display_name) VALUES ('nixos_test_barrier', 'Barrier')\""
        )
        # (The driver runs commands with pipefail: no `| grep -q`, whose early
        # exit would fail the consumer with SIGPIPE.)
        m.wait_until_succeeds(
            f"{KAFKA_BIN}/kafka-console-consumer.sh --bootstrap-server 127.0.0.1:9092 "
            "--topic twitter.users --from-beginning --timeout-ms 10000 "
            ">/tmp/twitter.users 2>/dev/null || true; grep -q nixos_test_barrier /tmp/twitter.users",
            timeout=180,
        )
        m.wait_until_succeeds(lag_is_zero("cdc-sink"), timeout=300)
        print(m.succeed(
            "install -m 0400 -o postgres /var/lib/cdc-lake/secrets/minio-root-password /tmp/minio-pw && "
            "cd /tmp && sudo -u postgres ${python}/bin/python3 ${./lake_check.py} http://127.0.0.1:9000 lake /tmp/minio-pw"
        ))
  '';
}
