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
  # deltalake reads the tables through their log (lake_check.py); boto3
  # lists and reads raw objects; pyarrow is deltalake's optional reader
  # dependency (to_pyarrow_table), not pulled in by it.
  python = pkgs.python3.withPackages (ps: [ps.deltalake ps.boto3 ps.pyarrow]);
  kafka = pkgs.apacheKafka_4_1;
  # The tables the node captures (services.cdc-lake.capturedTables keeps
  # its default, db/captured-tables): lake_check.py checks each of them.
  captured = pkgs.lib.concatStringsSep "," (import ../nixos/captured-tables.nix pkgs.lib).default;

  # `s3 ENDPOINT SECRET_FILE ls PREFIX` lists object keys under a prefix of
  # the lake bucket; `... mb BUCKET` creates a bucket; `... version TABLE/`
  # prints the table's latest Delta version, from the commit file names in
  # its `_delta_log/` (-1: no table yet). A store path, so the Python test
  # scripts can embed the command without quoting trouble; the secret is
  # read from a file, never passed on a command line.
  s3 = let
    script = pkgs.writeText "s3.py" ''
      import re, sys, boto3
      endpoint, secret_file, cmd, arg = sys.argv[1:5]
      secret = open(secret_file).read().strip()
      s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="cdclake",
                        aws_secret_access_key=secret, region_name="us-east-1")
      def ls(prefix):
          for page in s3.get_paginator("list_objects_v2").paginate(Bucket="lake", Prefix=prefix):
              for o in page.get("Contents", []):
                  yield o["Key"]
      if cmd == "ls":
          for key in ls(arg):
              print(key)
      elif cmd == "mb":
          try:
              s3.create_bucket(Bucket=arg)
          except s3.exceptions.BucketAlreadyOwnedByYou:
              pass
      elif cmd == "version":
          found = [int(m.group(1)) for k in ls(arg + "_delta_log/")
                   if (m := re.fullmatch(r".*/(\d{20})[.]json", k))]
          print(max(found, default=-1))
      else:
          sys.exit(f"unknown command {cmd}")
    '';
  in "${python}/bin/python3 ${script}";

  # `promq QUERY` runs an instant query against the node's Prometheus, prints
  # the result vector as JSON and fails when it is empty; so
  # `promq 'up{job="cdc-sink"} == 1'` succeeds once the target is up.
  promq = let
    script = pkgs.writeText "promq.py" ''
      import json, sys, urllib.parse, urllib.request
      url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": sys.argv[1]})
      with urllib.request.urlopen(url, timeout=10) as response:
          result = json.load(response)["data"]["result"]
      print(json.dumps(result))
      sys.exit(0 if result else 1)
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
    environment.systemPackages = [python kafka pkgs.postgresql_15 pkgs.curl];
  };

  # Helpers of the test scripts. Each takes the machine it works on: the
  # test driver lints the script against the nodes a test really has.
  prelude = ''
    import json
    import re
    import shlex

    LOCAL_S3 = "${s3} http://127.0.0.1:9000 /var/lib/cdc-lake/secrets/minio-root-password"
    KAFKA_BIN = "${kafka}/bin"
    PROMQ = "${promq}"
    CAPTURED = "${captured}".split(",")


    def start_and_wait(m):
        m.start()
        for unit in ["postgresql.service", "apache-kafka.service", "minio.service",
                     "cdc-lake-db.service", "debezium-connector.service",
                     "tweetgen.service", "cdc-sink.service"]:
            m.wait_for_unit(unit, timeout=600)


    def delta_version(m, s3, table):
        """The latest version of `table`'s Delta log (-1: no table yet)."""
        return int(m.succeed(f"{s3} version {table}/").strip())


    def wait_for_delta_commit(m, s3, table, than=-1):
        """Waits until `table` has a Delta commit past version `than`; with
        the default, until the table exists. Data is only what a commit
        names: loose Parquet objects do not count."""
        m.wait_until_succeeds(f"test $({s3} version {table}/) -gt {than}", timeout=300)
        keys = m.succeed(f"{s3} ls {table}/_delta_log/").split()
        assert f"{table}/_delta_log/00000000000000000000.json" in keys, keys


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


    def wait_for_query(m, query, timeout=300):
        """Waits until the node's Prometheus answers `query` with a
        non-empty vector, and returns that vector."""
        m.wait_until_succeeds(f"{PROMQ} {shlex.quote(query)}", timeout=timeout)
        return json.loads(m.succeed(f"{PROMQ} {shlex.quote(query)}"))


    def rows_written(m):
        """cdc_sink_rows_written_total per table, from the sink's /metrics."""
        written = {}
        for line in m.succeed("curl -fsS http://127.0.0.1:9464/metrics").splitlines():
            sample = re.match(r"cdc_sink_rows_written_total[{]([^}]*)[}]\s+(\S+)$", line)
            table = sample and re.search(r'table="([^"]*)"', sample.group(1))
            if sample and table:
                written[table.group(1)] = written.get(table.group(1), 0.0) + float(sample.group(2))
        return written


    def settle_and_check(m, checks=""):
        # Stop the workload, then commit a barrier row after it: Debezium
        # publishes in commit order, so once the barrier is in Kafka every
        # change before it is too (one broker, one producer connection, sends
        # in order). Then wait until the sink committed everything (lag 0),
        # and compare the lake, read through each table's Delta log, with
        # PostgreSQL. `checks`: more lake_check.py arguments.
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
            "cd /tmp && sudo -u postgres ${python}/bin/python3 ${./lake_check.py} "
            f"--endpoint http://127.0.0.1:9000 --secret-file /tmp/minio-pw --tables ${captured} {checks}"
        ))
  '';
}
